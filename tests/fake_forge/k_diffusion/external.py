"""Forge's `k_diffusion/external.ForgeScheduleLinker(predictor)`: the sampler's view of the KModel's predictor
(`sigmas`, `get_sigmas(n)` over the model's timesteps, `sigma_to_t` / `t_to_sigma` by the predictor). The CFG
denoiser sets `.inner_model` to the loaded model object."""

from __future__ import annotations

import torch
from torch import nn

from k_diffusion import sampling


class ForgeScheduleLinker(nn.Module):
    def __init__(self, predictor):  # type: ignore[no-untyped-def]
        super().__init__()
        self.predictor = predictor

    @property
    def sigmas(self):  # type: ignore[no-untyped-def]
        return self.predictor.sigmas

    @property
    def log_sigmas(self):  # type: ignore[no-untyped-def]
        return self.predictor.sigmas.log()

    def get_sigmas(self, n=None):  # type: ignore[no-untyped-def]
        if n is None:
            return sampling.append_zero(self.sigmas.flip(0))
        t = torch.linspace(len(self.sigmas) - 1, 0, n, device=self.sigmas.device)
        return sampling.append_zero(self.t_to_sigma(t))

    def sigma_to_t(self, sigma, quantize=None):  # type: ignore[no-untyped-def]
        return self.predictor.timestep(sigma)

    def t_to_sigma(self, t):  # type: ignore[no-untyped-def]
        return self.predictor.sigma(t)
