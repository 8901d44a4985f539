"""Stand-in for `ldm.modules.diffusionmodules.openaimodel`: the UNet is sdtrt's LDM-key-compatible UNet (same
module tree, state-dict keys and numerics as A1111's), so an engine built from the same checkpoint must match it.
Its class `forward` is replaced at import of `modules.sd_hijack`, as in the real host."""

from __future__ import annotations

import fake_trace

from sdtrt.models.torch_unet import UNetModel as _CoreUNet
from sdtrt.models.torch_unet import UNetSpec

__all__ = ["UNetModel", "UNetSpec"]


class UNetModel(fake_trace.RecordsMoves, _CoreUNet):
    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):  # type: ignore[no-untyped-def,override]
        fake_trace.record_call("torch", x, timesteps, context, y, kwargs, timesteps_positional=False)
        return _CoreUNet.forward(self, x, timesteps, context, y, **kwargs)
