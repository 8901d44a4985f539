"""Reading A1111-format checkpoints: safetensors only (nothing is ever unpickled), the UNet part of the state dict,
the config yaml beside the file, and the file's sha256 (A1111's checkpoint hash)."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrt.constants import UNET_PREFIX
from sdtrt.errors import CheckpointError
from sdtrt.models.convention import A1111
from sdtrt.pipeline.families import ConfigHints, ModelInfo, detect, read_config

if TYPE_CHECKING:
    import torch

#: A safetensors header larger than this is not a checkpoint (and would be a memory bomb).
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file on disk with its detected UNet."""

    path: Path
    config: Path | None
    info: ModelInfo

    @property
    def name(self) -> str:
        return self.path.stem


def check_safetensors(path: Path) -> dict[str, dict[str, object]]:
    """Validate the safetensors container (header and that the data covers every tensor) and return the header.

    Catches truncated downloads and renamed pickles before any tensor is read, with a message saying which."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise CheckpointError(
            f"{path.name}: only .safetensors checkpoints are loaded (pickle files can run code). "
            "Convert it to safetensors first (e.g. with A1111's checkpoint merger or `safetensors.torch.save_file`)."
        )
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name} is {size} bytes: too short to be a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n + 8 > size:
            raise CheckpointError(
                f"{path.name} is not a valid safetensors file (header length {n}, file {size} bytes): "
                "truncated download, or a pickle/other format renamed to .safetensors"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name} is not a valid safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} is not a valid safetensors file (header is not a mapping)")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path.name} is truncated: its tensors need {8 + n + end} bytes but the file has {size}. "
            "Download it again."
        )
    return header


def find_config(path: Path, explicit: Path | None = None) -> Path | None:
    """The config yaml for a checkpoint: the explicit one, or `<same name>.yaml` beside it (A1111's rule)."""
    if explicit is not None:
        if not Path(explicit).is_file():
            raise CheckpointError(f"config yaml {explicit} does not exist")
        return Path(explicit)
    near = Path(path).with_suffix(".yaml")
    return near if near.is_file() else None


def read_unet_state_dict(path: Path, device: str = "cpu", names: Sequence[str] | None = None
                         ) -> dict[str, torch.Tensor]:
    """The UNet weights of an A1111 checkpoint, keyed like the UNet module (prefix removed); only `names` when
    given (unknown names are left out).

    A file holding only a UNet (keys starting with `input_blocks.`) is accepted as is."""
    from safetensors import SafetensorError, safe_open

    header = check_safetensors(path)
    keys = [k for k in header if k != "__metadata__"]
    prefixed = [k for k in keys if k.startswith(UNET_PREFIX)]
    wanted = None if names is None else set(names)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            if prefixed:
                return {k[len(UNET_PREFIX):]: f.get_tensor(k) for k in prefixed
                        if wanted is None or k[len(UNET_PREFIX):] in wanted}
            if any(k.startswith("input_blocks.") for k in keys):
                return {k: f.get_tensor(k) for k in keys if wanted is None or k in wanted}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{Path(path).name} could not be read: {e}") from None
    raise CheckpointError(
        f"{Path(path).name} has no UNet weights (no '{UNET_PREFIX}*' keys): is it a VAE, LoRA or text encoder?"
    )


def open_checkpoint(path: Path, config: Path | None = None) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """Read and detect a checkpoint. Returns the description and the UNet state dict (CPU)."""
    path = Path(path)
    sd = read_unet_state_dict(path)
    cfg = find_config(path, config)
    hints = read_config(cfg) if cfg else ConfigHints()
    return Checkpoint(path, cfg, detect(sd, hints)), sd


def build_unet(info: ModelInfo, sd: dict[str, torch.Tensor] | None = None, *, share: bool = False,
               convention: str = A1111) -> torch.nn.Module:
    """Instantiate the PyTorch module of `info`'s architecture (its model contract's), computing in `convention`
    (`sdtrt.models.convention`), loading `sd` strictly when given. `share`: the module takes `sd`'s tensors themselves instead of copies (half the memory; for a caller
    that drops `sd` and never changes the module's weights in place, like an export)."""
    import torch

    if sd is not None and share and _assigns():
        # built without storage and given the checkpoint's tensors themselves: no second copy of the weights
        # (an SDXL UNet is 5 GB in fp16, 10 GB in fp32)
        with torch.device("meta"):
            unet = info.family.contract.build_module(info.spec, convention).eval().requires_grad_(False)
        _load(unet, sd, assign=True)
        unet.requires_grad_(False)
        if not any(t.is_meta for t in (*unet.parameters(), *unet.buffers())):
            return unet
    unet = info.family.contract.build_module(info.spec, convention).eval().requires_grad_(False)
    if sd is not None:
        _load(unet, sd)
    return unet


def _load(unet: torch.nn.Module, sd: dict[str, torch.Tensor], **kwargs: Any) -> None:
    try:
        unet.load_state_dict(sd, strict=True, **kwargs)
    except RuntimeError as e:
        raise CheckpointError(f"the UNet weights do not fit the detected architecture: {e}") from None


@functools.cache
def _assigns() -> bool:
    """load_state_dict takes assign= (torch 2.1+), so a module made on the meta device can take tensors as they are."""
    import torch

    return "assign" in inspect.signature(torch.nn.Module.load_state_dict).parameters


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, streamed (A1111 shows its first 10 hex digits as the checkpoint hash). Remembered per
    (path, size, modification time) for the life of the process: checkpoints are several GB, and builds that hit
    the cache, checks and the WebUI ask for the same file's hash again and again."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _HASHES_LOCK:
        known = _HASHES.get(key)
    if known is not None:
        return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    with _HASHES_LOCK:
        _HASHES[key] = h.hexdigest()
    return h.hexdigest()


_HASHES: dict[tuple[str, int, int], str] = {}
_HASHES_LOCK = threading.Lock()


@dataclass(frozen=True)
class _ShapeOnly:
    shape: tuple[int, ...]


def header_info(path: Path, config: Path | None = None) -> ModelInfo:
    """Family and architecture of a safetensors checkpoint from its header alone (no tensor is read): what a
    prediction needs for a checkpoint that is not loaded. Raises CheckpointError/UnknownArchitecture."""
    header = check_safetensors(path)
    shapes = {k[len(UNET_PREFIX):]: _ShapeOnly(tuple(int(d) for d in v["shape"]))  # type: ignore[index,union-attr]
              for k, v in header.items() if k.startswith(UNET_PREFIX)}
    hints = read_config(config) if config is not None else ConfigHints()
    return detect(shapes, hints)
