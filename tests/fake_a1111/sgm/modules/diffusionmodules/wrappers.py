"""Stand-in for `sgm.modules.diffusionmodules.wrappers.OpenAIWrapper`: every UNet argument is a keyword
(`timesteps=`, `context=`, `y=`), x is concatenated with `c["concat"]` when present."""

from __future__ import annotations

import fake_trace
import torch
from ldm.models.diffusion.ddpm import _routed_call
from torch import nn


class IdentityWrapper(fake_trace.RecordsMoves, nn.Module):
    def __init__(self, diffusion_model: nn.Module, compile_model: bool = False):
        super().__init__()
        self.diffusion_model = diffusion_model


class OpenAIWrapper(IdentityWrapper):
    def forward(self, x, t, c, **kwargs):  # type: ignore[no-untyped-def]
        if "concat" in c:
            x = torch.cat((x, c["concat"]), dim=1)
        return _routed_call(self.diffusion_model, x, t, c.get("crossattn"), c.get("vector"), keyword_t=True)
