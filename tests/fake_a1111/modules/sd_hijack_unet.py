"""The dtype cast A1111 installs unconditionally around `LatentDiffusion.apply_model` and `OpenAIWrapper.forward`:
x, t and every tensor of the cond dict go to `devices.dtype_unet` (fp16 unless --no-half); the result is cast back
to float only with --upcast-sampling."""

from __future__ import annotations

import ldm.models.diffusion.ddpm
import sgm.modules.diffusionmodules.wrappers
import torch

from modules import devices, patches


def _cast_cond(cond):  # type: ignore[no-untyped-def]
    if isinstance(cond, dict):
        for y in list(cond.keys()):
            if isinstance(cond[y], list):
                cond[y] = [x.to(devices.dtype_unet) if isinstance(x, torch.Tensor) else x for x in cond[y]]
            else:
                cond[y] = cond[y].to(devices.dtype_unet) if isinstance(cond[y], torch.Tensor) else cond[y]
    return cond


def _make(orig_func):  # type: ignore[no-untyped-def]
    def apply_model(self, x_noisy, t, cond, **kwargs):  # type: ignore[no-untyped-def]
        cond = _cast_cond(cond)
        with devices.autocast():
            result = orig_func(self, x_noisy.to(devices.dtype_unet), t.to(devices.dtype_unet), cond, **kwargs)
            if devices.unet_needs_upcast:
                return result.float()
            return result

    return apply_model


_ldm = ldm.models.diffusion.ddpm.LatentDiffusion
_sgm = sgm.modules.diffusionmodules.wrappers.OpenAIWrapper
patches.patch(__name__, _ldm, "apply_model", _make(_ldm.apply_model))
patches.patch(__name__, _sgm, "forward", _make(_sgm.forward))
