"""Stand-in for `sgm.models.diffusion.DiffusionEngine` (SDXL). A1111's `modules.sd_models_xl` adds
`get_learned_conditioning`, `apply_model`, `get_first_stage_encoding` to this class at import."""

from __future__ import annotations

import contextlib

import fake_vae
from ldm.models.diffusion.ddpm import make_alphas_cumprod
from torch import nn

from sgm.modules.diffusionmodules.wrappers import OpenAIWrapper
from sgm.modules.encoders.modules import GeneralConditioner


class DiffusionEngine(nn.Module):
    def __init__(self, diffusion_model: nn.Module, *, refiner: bool, parameterization: str = "eps"):
        super().__init__()
        self.model = OpenAIWrapper(diffusion_model)
        self.conditioner = GeneralConditioner(refiner)
        self.first_stage_model = nn.Identity()
        self.parameterization = parameterization
        self.scale_factor = 0.13025
        self.alphas_cumprod = make_alphas_cumprod()

    @contextlib.contextmanager
    def ema_scope(self, context=None):  # type: ignore[no-untyped-def]
        yield

    def encode_first_stage(self, x):  # type: ignore[no-untyped-def]
        return fake_vae.encode(x)

    def decode_first_stage(self, z):  # type: ignore[no-untyped-def]
        return fake_vae.decode(z)
