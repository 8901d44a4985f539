"""Fake-only recorder for the fake Forge (not part of Forge), exposed by tests/fakeforge.py:

- `calls`: one dict per UNet call: "apply_model" (KModel.apply_model calling `diffusion_model`: which class it was,
  the x shape and timesteps, the transformer_options keys) and "torch" (the PyTorch UNet's own forward);
- `moves`: (class name, device) of every `.to(device)` made on a KModel (Forge's loader moves the patched KModel);
- `reached`: (class name, what) each time a device/dtype move (`Module._apply`) reaches the PyTorch UNet, whoever
  started it: a move of its parent KModel reaches it unless an object patch took it out of the module tree."""

from __future__ import annotations

import torch

calls: list[dict] = []
moves: list[tuple[str, str]] = []
reached: list[tuple[str, str]] = []


def _shape(t: object) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def record_call(where: str, module: object, x: torch.Tensor, timesteps: object, context: object,
                transformer_options: dict | None, extra: dict) -> None:
    calls.append({
        "where": where,
        "module": type(module).__name__,
        "x": _shape(x),
        "t_values": timesteps.detach().float().cpu().tolist() if isinstance(timesteps, torch.Tensor) else timesteps,
        "context": _shape(context),
        "options": sorted(transformer_options or {}),
        "extra": sorted(extra),
    })


class RecordsMoves:
    """Mixin for torch modules: records `.to(device)` calls made on this module itself."""

    def to(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            moves.append((type(self).__name__, str(device)))
        return super().to(*args, **kwargs)  # type: ignore[misc]


class RecordsReach:
    """Mixin for torch modules: records every `_apply` (the work behind `.to()`, `.float()`, ...) reaching it."""

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        reached.append((type(self).__name__, getattr(fn, "__name__", type(fn).__name__)))
        return super()._apply(fn, recurse)  # type: ignore[misc]


def clear() -> None:
    calls.clear()
    moves.clear()
    reached.clear()
