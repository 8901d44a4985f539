"""Stand-in of Forge's sd_forge_lora `network.py`: `NetworkOnDisk` (name, filename, metadata, alias, hash) and
`Network` (what `networks.loaded_networks` holds: name, the file, multipliers, `mtime`; its `modules` stay empty -
Forge applies LoRA through the UNet patcher, not through per-layer network modules)."""

from __future__ import annotations

import os

from modules import hashes, sd_models


class NetworkOnDisk:
    def __init__(self, name, filename):  # type: ignore[no-untyped-def]
        self.name = name
        self.filename = filename
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        self.metadata = {}
        if self.is_safetensors:
            try:
                self.metadata = sd_models.read_metadata_from_safetensors(filename)
            except Exception:  # noqa: BLE001, S110
                pass
        self.alias = self.metadata.get("ss_output_name", self.name)
        self.hash = None
        self.shorthash = None
        self.set_hash(self.metadata.get("sshs_model_hash") or hashes.sha256_from_cache(self.filename, "lora/" + name)
                      or "")

    def set_hash(self, v):  # type: ignore[no-untyped-def]
        self.hash = v
        self.shorthash = self.hash[0:12]

    def read_hash(self):  # type: ignore[no-untyped-def]
        if not self.hash:
            self.set_hash(hashes.sha256(self.filename, "lora/" + self.name) or "")


class Network:
    def __init__(self, name, network_on_disk):  # type: ignore[no-untyped-def]
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules: dict = {}
        self.bundle_embeddings: dict = {}
        self.mtime = None
        self.mentioned_name = None
