"""What the WebUI glue needs from its host, as one interface, plus the extension's settings.

`Host` declares every host operation the extension uses; `HostDefaults` gives the optional ones (reading and saving
options, styles, the token counter, A1111's closest-match checkpoint lookup, the files of the active networks) a
behaviour that works without them, so a host adapter (A1111's in scripts/, a second host next, the tests' own)
subclasses it and overrides what its host offers. Everything else in sdtrt.webui talks to a `Host`, never to a
host's modules, and never probes a host for methods.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from sdtrt.backends import CHOICES
from sdtrt.errors import SdtrtError
from sdtrt.locations import default_cache_dir
from sdtrt.models.convention import A1111
from sdtrt.profiles import token_chunks
from sdtrt.serving.server import FallbackPolicy

#: Setting keys (A1111 `shared.opts`) and their defaults. One place for both.
OPT_ENABLED = "sdtrt_enabled"
OPT_BACKEND = "sdtrt_backend"
OPT_CACHE_DIR = "sdtrt_cache_dir"
OPT_FALLBACK = "sdtrt_fallback"
OPT_CUDA_GRAPHS = "sdtrt_cuda_graphs"

BACKEND_CHOICES = CHOICES  # "auto" and every backend, from the one table in sdtrt.backends
#: pytorch: run calls no engine covers on the PyTorch UNet and say so once; error: fail the generation instead.
FALLBACK_CHOICES = tuple(p.value for p in FallbackPolicy)

#: Label prefix of our entries in the SD Unet dropdown.
LABEL_PREFIX = "[TRT]"


@dataclass(frozen=True)
class Settings:
    enabled: bool = True
    backend: str = "auto"
    cache_dir: str = ""  # empty: the default (models/Unet-sdtrt, or $SDTRT_CACHE)
    fallback: FallbackPolicy = FallbackPolicy.PYTORCH
    cuda_graphs: bool = True  # replay captured CUDA graphs (TensorRT, TensorRT-RTX); applies to engines loaded next

    def __post_init__(self) -> None:
        if not isinstance(self.fallback, FallbackPolicy):  # "error" as a host or a test wrote it
            object.__setattr__(self, "fallback", FallbackPolicy.read(self.fallback, FallbackPolicy.PYTORCH))

    @classmethod
    def from_options(cls, get: Callable[[str, Any], Any]) -> Settings:
        """Read settings through `get(key, default)`, repairing values a hand-edited config may hold."""
        d = cls()
        backend = str(get(OPT_BACKEND, d.backend) or d.backend)
        return cls(
            enabled=bool(get(OPT_ENABLED, d.enabled)),
            backend=backend if backend in BACKEND_CHOICES else d.backend,
            cache_dir=str(get(OPT_CACHE_DIR, d.cache_dir) or "").strip(),
            fallback=FallbackPolicy.read(get(OPT_FALLBACK, d.fallback), d.fallback),
            cuda_graphs=bool(get(OPT_CUDA_GRAPHS, d.cuda_graphs)),
        )

    def overridden(self, overrides: Mapping[str, Any]) -> Settings:
        """These settings with a request's `override_settings` applied (repaired as `from_options` repairs)."""
        current = {OPT_ENABLED: self.enabled, OPT_BACKEND: self.backend, OPT_CACHE_DIR: self.cache_dir,
                   OPT_FALLBACK: self.fallback, OPT_CUDA_GRAPHS: self.cuda_graphs}
        return Settings.from_options(lambda key, default: overrides.get(key, current.get(key, default)))

    def cache_path(self, models_dir: Path) -> Path:
        if self.cache_dir:
            return Path(os.path.expanduser(self.cache_dir))
        return default_cache_dir(models_dir)


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint as the host lists it. `model_name` is what "Automatic" matches on."""

    title: str
    model_name: str
    filename: str
    sha256: str | None = None
    config: str | None = None  # yaml beside the checkpoint, when any


class Host(Protocol):
    """The host operations the extension uses. Implementations must not raise from the read-only queries."""

    def settings(self) -> Settings: ...

    def models_dir(self) -> Path: ...

    def device(self) -> torch.device: ...

    def torch_unet(self) -> torch.nn.Module | None:
        """The loaded model's PyTorch UNet, or None when no model is loaded (never loads one)."""

    def torch_forward(self, unet: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """The UNet's own forward, bypassing the host's routing to the active SdUnet."""

    def lowvram(self) -> bool: ...

    def loaded_checkpoint(self) -> CheckpointRef | None: ...

    def checkpoints(self) -> list[CheckpointRef]: ...

    def resolve_checkpoint(self, name: str) -> CheckpointRef:
        """A listed checkpoint by title, name or model_name; raises SdtrtError naming the choices otherwise."""

    def refresh_unet_list(self) -> None: ...

    def quiet_torch(self, waiting: Callable[[str], None]) -> AbstractContextManager[object]:
        """Held while a build touches torch (creating and exporting the UNet; on a GPU the whole build): no
        generation and no model load runs meanwhile. A host changes torch globally while it loads a model (A1111
        creates modules on the meta device and disables `Module.to`), so a module made then is broken. Calls
        `waiting(why)` before it blocks, so the build's job can say what it waits for. Not reentrant."""

    def tell_user(self, p: object, text: str) -> None:
        """Show `text` with the generation's result (A1111: p.comment)."""

    def network_key(self) -> Hashable:
        """Identity of the active LoRA set and strengths (() when none); equal keys mean equal weight updates."""

    def network_weights(self, base: Callable[[Sequence[str]], Mapping[str, torch.Tensor]]
                       ) -> Mapping[str, torch.Tensor]:
        """{UNet weight name: new value} for every weight the active LoRA set changes, computed by the host's own
        code from the base weights `base(names)` of the checkpoint in the engine."""

    # ---- optional: HostDefaults gives each a behaviour that works without it ------------------------------------
    def option(self, key: str, default: Any) -> Any:
        """A WebUI option's value (the host's default when it is not set)."""

    def set_option(self, key: str, value: Any) -> None:
        """Set and save a WebUI option as its Settings tab does; raises SdtrtError when the host cannot."""

    def closest_checkpoint(self, name: str) -> CheckpointRef | None:
        """A checkpoint as the host looks up hires and refiner checkpoints (A1111: its closest match), or None."""

    def apply_styles(self, text: str, styles: list[str], negative: bool) -> str:
        """`text` with the named prompt styles applied, as the host's processing applies them."""

    def prompt_chunks(self, text: str, negative: bool, steps: int) -> int:
        """77-row chunks of a prompt's conditioning as the host's token counter counts them."""

    def network_files(self) -> list[str]:
        """The files the active networks came from (the engine takes safetensors LoRAs only)."""

    def apply_unet(self) -> None:
        """Apply the SD Unet the WebUI's setting picks for the loaded model now, as a generation's start would
        (readiness loads the engine this way); called holding `quiet_torch`."""

    def unet_convention(self) -> str:
        """How this host's UNet upsamples to its skip connections (`sdtrt.models.convention`: A1111 or FORGE): what
        builds default to, and what an engine must follow to serve sizes that are not multiples of 64 px here."""

    def lora_refusal(self) -> str | None:
        """Why generations with LoRAs run on PyTorch in this host, or None (their weights go into the engine)."""

    def controlnet_refusal(self) -> str | None:
        """Why ControlNet units run on PyTorch in this host, or None (the engine's ControlNet inputs serve them)."""


class HostDefaults:
    """The optional Host operations for a host that lacks them: options read as their defaults and cannot be saved,
    no styles, prompt chunks counted by words, checkpoints looked up exactly, no network files to check."""

    def option(self, key: str, default: Any) -> Any:
        return default

    def set_option(self, key: str, value: Any) -> None:
        raise SdtrtError("this WebUI host cannot change settings; use its Settings tab")

    def closest_checkpoint(self, name: str) -> CheckpointRef | None:
        resolve = cast(Host, self).resolve_checkpoint
        return resolve(name)

    def apply_styles(self, text: str, styles: list[str], negative: bool) -> str:
        return text

    def prompt_chunks(self, text: str, negative: bool, steps: int) -> int:
        return token_chunks(len(text.split()))

    def network_files(self) -> list[str]:
        return []

    def apply_unet(self) -> None:
        raise SdtrtError("this WebUI host applies the SD Unet only when a generation starts")

    def unet_convention(self) -> str:
        return A1111

    def lora_refusal(self) -> str | None:
        return None

    def controlnet_refusal(self) -> str | None:
        return None
