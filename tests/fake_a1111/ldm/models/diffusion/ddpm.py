"""Stand-ins for `ldm.models.diffusion.ddpm.LatentDiffusion` and `DiffusionWrapper` (SD1/SD2).

`DiffusionWrapper.forward` calls the UNet exactly as LDM does: timesteps positionally, `context=` as a keyword,
no `y` ("crossattn"); inpainting ("hybrid") concatenates `c_concat` to x first."""

from __future__ import annotations

import contextlib

import fake_trace
import fake_vae
import torch
from torch import nn


def make_alphas_cumprod(linear_start: float = 0.00085, linear_end: float = 0.012, n: int = 1000) -> torch.Tensor:
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


def _routed_call(diffusion_model: nn.Module, x, t, context, y=None, *, keyword_t: bool):  # type: ignore[no-untyped-def]
    from modules import sd_unet  # the module global the routed forward reads

    cur = sd_unet.current_unet
    label = getattr(getattr(cur, "option", None), "label", type(cur).__name__) if cur is not None else None
    kwargs = {"context": context} | ({"y": y} if y is not None else {})
    fake_trace.record_call("routed", x, t, context, y, {k: v for k, v in kwargs.items() if k != "context"},
                           timesteps_positional=not keyword_t, engine=label)
    if keyword_t:
        return diffusion_model(x, timesteps=t, **kwargs)
    return diffusion_model(x, t, **kwargs)


class DiffusionWrapper(fake_trace.RecordsMoves, nn.Module):
    def __init__(self, diffusion_model: nn.Module, conditioning_key: str):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key
        self.sequential_cross_attn = False

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):  # type: ignore[no-untyped-def]
        if self.conditioning_key == "crossattn":
            return _routed_call(self.diffusion_model, x, t, torch.cat(c_crossattn, 1), keyword_t=False)
        if self.conditioning_key == "hybrid":
            xc = torch.cat([x] + list(c_concat), dim=1)
            return _routed_call(self.diffusion_model, xc, t, torch.cat(c_crossattn, 1), keyword_t=False)
        if self.conditioning_key == "crossattn-adm":
            return _routed_call(self.diffusion_model, x, t, torch.cat(c_crossattn, 1), c_adm, keyword_t=False)
        raise NotImplementedError(f"conditioning_key {self.conditioning_key!r}")


class LatentDiffusion(nn.Module):
    """SD1/SD2 model: `model` (DiffusionWrapper), `cond_stage_model`, `first_stage_model`, `alphas_cumprod`."""

    def __init__(self, diffusion_model: nn.Module, cond_stage_model: nn.Module, *, conditioning_key: str,
                 parameterization: str = "eps", scale_factor: float = 0.18215):
        super().__init__()
        self.model = DiffusionWrapper(diffusion_model, conditioning_key)
        self.cond_stage_model = cond_stage_model
        self.first_stage_model = nn.Identity()
        self.parameterization = parameterization
        self.scale_factor = scale_factor
        self.cond_stage_key = "txt"
        self.alphas_cumprod = make_alphas_cumprod()

    @contextlib.contextmanager
    def ema_scope(self, context=None):  # type: ignore[no-untyped-def]
        yield

    def get_learned_conditioning(self, c):  # type: ignore[no-untyped-def]
        return self.cond_stage_model(c)

    def apply_model(self, x_noisy, t, cond, return_ids=False):  # type: ignore[no-untyped-def]
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        x_recon = self.model(x_noisy, t, **cond)
        if isinstance(x_recon, tuple) and not return_ids:
            return x_recon[0]
        return x_recon

    def encode_first_stage(self, x):  # type: ignore[no-untyped-def]
        return fake_vae.encode(x)

    def get_first_stage_encoding(self, encoder_posterior):  # type: ignore[no-untyped-def]
        return encoder_posterior

    def decode_first_stage(self, z):  # type: ignore[no-untyped-def]
        return fake_vae.decode(z)
