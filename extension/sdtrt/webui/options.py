"""The SD Unet options the WebUI offers and the engine rows it shows: which engines can serve here, the loaded
model's architecture, and the options "Automatic" picks per checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdtrt.errors import SdtrtError
from sdtrt.serving.catalog import EngineRow, engine_rows
from sdtrt.storage.manifest import Manifest
from sdtrt.webui.host import LABEL_PREFIX, CheckpointRef
from sdtrt.webui.reports import EngineListing
from sdtrt.webui.state import ServiceState


@dataclass(frozen=True)
class OptionSpec:
    """One entry of the SD Unet dropdown: `model_name` is the checkpoint "Automatic" picks it for (None: only
    when chosen by label); `engine_ids` are tried in order for each call."""

    label: str
    model_name: str | None
    engine_ids: tuple[str, ...]


@dataclass(frozen=True)
class LoadedArch:
    family: str | None
    arch_hash: str | None
    problem: str | None  # why no engine can serve this model (unknown architecture), else None


class UnetOptions:
    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self._arch: tuple[int, LoadedArch] | None = None

    # ---- engine table -------------------------------------------------------------------------------------
    def catalog(self) -> list[EngineRow]:
        """Every engine in the cache and whether it can serve here (see sdtrt.serving.catalog), refusals included."""
        return engine_rows(self.state.registry(), self.state.probe, self.state.sessions.refusal)

    def engine_rows(self) -> list[EngineListing]:
        """Every engine in the cache with ok/stale and the reason, for the tab and GET /engines (the catalog's rows,
        plus whether the active SD Unet uses each)."""
        active = {s.id for s in self.state.active.slots} if self.state.active is not None else set()
        return [EngineListing.of(row, row.id in active) for row in self.catalog()]

    def usable_manifests(self) -> list[Manifest]:
        backend = self.state.settings().backend
        return [row.manifest for row in self.catalog()
                if row.manifest is not None and row.ok and backend in ("auto", row.manifest.key.backend)]

    # ---- the loaded model ---------------------------------------------------------------------------------
    def loaded_arch(self) -> LoadedArch | None:
        """Family and architecture hash of the host's loaded UNet, from its weights' shapes (cached per model)."""
        host = self.state.require_host()
        unet = host.torch_unet()
        if unet is None:
            return None
        if self._arch is not None and self._arch[0] == id(unet):
            return self._arch[1]
        from sdtrt.pipeline.families import ConfigHints, detect, read_config

        ckpt = host.loaded_checkpoint()
        try:
            hints = read_config(Path(ckpt.config)) if ckpt and ckpt.config else ConfigHints()
        except SdtrtError:
            hints = ConfigHints()
        try:
            info = detect(unet.state_dict(), hints)
            arch = LoadedArch(info.family_id, info.arch_hash, None)
        except SdtrtError as e:
            arch = LoadedArch(None, None, f"the loaded model cannot use an engine: {e}")
        self._arch = (id(unet), arch)
        return arch

    @staticmethod
    def checkpoint_sha256(ref: CheckpointRef) -> str | None:
        """The host's hash when it has one, else the file's (remembered per path, size and mtime)."""
        from sdtrt.pipeline.checkpoint import file_sha256

        if ref.sha256:
            return ref.sha256
        try:
            return file_sha256(Path(ref.filename))
        except OSError:
            return None

    # ---- SD Unet options ----------------------------------------------------------------------------------
    def unet_options(self) -> list[OptionSpec]:
        """Per checkpoint with engines built from it: `[TRT] <model_name>` (what "Automatic" picks). For the loaded
        checkpoint without one of its own: `[TRT] <model_name>` over same-architecture engines, refitted with its
        weights. Per usable engine: `[TRT] <engine id>`, picked by name only."""
        self.state.watcher.listed(self.state.registry().root)  # before listing: a publish meanwhile is a change
        return self.options_with(self.state.require_host().loaded_checkpoint(), self.loaded_arch)

    def options_with(self, loaded: CheckpointRef | None, arch_of: Callable[[], LoadedArch | None]
                     ) -> list[OptionSpec]:
        """`unet_options` as they are listed while `loaded` (of architecture `arch_of()`) is the loaded
        checkpoint."""
        host = self.state.require_host()
        manifests = self.usable_manifests()
        if not manifests:
            return []
        by_arch: dict[str, list[Manifest]] = {}
        for m in manifests:
            by_arch.setdefault(m.key.arch_hash, []).append(m)
        specs: list[OptionSpec] = []
        seen: set[str] = set()

        def add(model_name: str, own: Sequence[Manifest], arch_hash: str) -> None:
            if model_name in seen:
                return
            rest = [m for m in by_arch.get(arch_hash, []) if m not in own]
            seen.add(model_name)
            specs.append(OptionSpec(f"{LABEL_PREFIX} {model_name}", model_name, tuple(m.id for m in [*own, *rest])))

        for ref in host.checkpoints():
            base = os.path.basename(ref.filename)
            own = [m for m in manifests if (ref.sha256 and m.source_checkpoint.get("sha256") == ref.sha256)
                   or m.source_checkpoint.get("name") == base]
            if own:
                add(ref.model_name, own, own[0].key.arch_hash)
        arch = arch_of() if loaded is not None else None
        if loaded is not None and arch is not None and arch.arch_hash in by_arch:
            add(loaded.model_name, [], arch.arch_hash)
        for m in manifests:
            specs.append(OptionSpec(f"{LABEL_PREFIX} {m.id}", None, (m.id,)))
        return specs
