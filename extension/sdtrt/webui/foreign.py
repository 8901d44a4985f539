"""What other code did to the host's PyTorch UNet that an engine cannot reproduce, read off the module itself.

An engine is the UNet as exported: plain `forward`, zero-padded convolutions, no patched layers. When the host or
another extension changed the live module for this generation, the engine would silently compute something else,
so the service sends that pass to PyTorch (with a notice) instead:

- a live `forward` on the instance (sd-webui-controlnet's hook, and anything like it): the hook runs the UNet's
  blocks itself and calls the class forward only for side passes (reference-only's "write" pass, whose attention
  banks must be written by the PyTorch modules). A hook that was *restored* leaves the instance attribute behind,
  bound to the class's own forward: that one is harmless and must not count.
- circular padding (A1111's tiling sets `padding_mode = "circular"` on every Conv2d), or a convolution whose
  `_conv_forward`/`forward` was replaced on the instance (asymmetric tiling extensions).
"""

from __future__ import annotations

from typing import Any

import torch

FOREIGN_FORWARD = ("another extension (e.g. ControlNet) runs the UNet itself in this pass; the engine cannot "
                   "reproduce what it changes, so this pass runs on PyTorch")
TILING = ("tiling is on: the UNet's convolutions pad circularly, which the engine does not; this generation runs "
          "on PyTorch")
PATCHED_CONV = ("another extension replaced the UNet's convolutions (e.g. asymmetric tiling); this generation runs "
                "on PyTorch")


def live_forward_hook(unet: torch.nn.Module) -> bool:
    """True when `unet.forward` is an instance attribute other than the class's own forward bound to `unet`."""
    inst = vars(unet).get("forward")
    if inst is None:
        return False
    return not (getattr(inst, "__self__", None) is unet
                and getattr(inst, "__func__", None) is getattr(type(unet), "forward", None))


def conv_problem(unet: torch.nn.Module) -> str | None:
    """TILING or PATCHED_CONV when any convolution of `unet` does not compute what the engine's graph does."""
    for module in unet.modules():
        if not isinstance(module, torch.nn.Conv2d):
            continue
        if module.padding_mode != "zeros":
            return TILING if module.padding_mode == "circular" else PATCHED_CONV
        own: dict[str, Any] = vars(module)
        if "_conv_forward" in own or "forward" in own:
            return PATCHED_CONV
    return None


def unservable(unet: torch.nn.Module) -> str | None:
    """Why the engine must not serve calls for this UNet right now, or None."""
    if live_forward_hook(unet):
        return FOREIGN_FORWARD
    return conv_problem(unet)
