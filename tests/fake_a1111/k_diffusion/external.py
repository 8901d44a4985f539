"""CompVis denoisers: sigma <-> (fractional, float) timestep conversion over the model's `alphas_cumprod`, and
`apply_model(x * c_in, sigma_to_t(sigma), **kwargs)`; eps (`CompVisDenoiser`) or v (`CompVisVDenoiser`)."""

from __future__ import annotations

import torch
from torch import nn

from k_diffusion import sampling


class DiscreteSchedule(nn.Module):
    def __init__(self, sigmas, quantize):  # type: ignore[no-untyped-def]
        super().__init__()
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("log_sigmas", sigmas.log())
        self.quantize = quantize

    @property
    def sigma_min(self):  # type: ignore[no-untyped-def]
        return self.sigmas[0]

    @property
    def sigma_max(self):  # type: ignore[no-untyped-def]
        return self.sigmas[-1]

    def get_sigmas(self, n=None):  # type: ignore[no-untyped-def]
        if n is None:
            return sampling.append_zero(self.sigmas.flip(0))
        t_max = len(self.sigmas) - 1
        t = torch.linspace(t_max, 0, n, device=self.sigmas.device)
        return sampling.append_zero(self.t_to_sigma(t))

    def sigma_to_t(self, sigma, quantize=None):  # type: ignore[no-untyped-def]
        quantize = self.quantize if quantize is None else quantize
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = (low - log_sigma) / (low - high)
        w = w.clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t):  # type: ignore[no-untyped-def]
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()


class DiscreteEpsDDPMDenoiser(DiscreteSchedule):
    def __init__(self, model, alphas_cumprod, quantize):  # type: ignore[no-untyped-def]
        super().__init__(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, quantize)
        self.inner_model = model
        self.sigma_data = 1.0

    def get_scalings(self, sigma):  # type: ignore[no-untyped-def]
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        return c_out, c_in

    def get_eps(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.inner_model(*args, **kwargs)

    def forward(self, input, sigma, **kwargs):  # type: ignore[no-untyped-def]
        c_out, c_in = [sampling.append_dims(x, input.ndim) for x in self.get_scalings(sigma)]
        eps = self.get_eps(input * c_in, self.sigma_to_t(sigma), **kwargs)
        return input + eps * c_out


class CompVisDenoiser(DiscreteEpsDDPMDenoiser):
    def __init__(self, model, quantize=False, device="cpu"):  # type: ignore[no-untyped-def]
        super().__init__(model, model.alphas_cumprod, quantize=quantize)

    def get_eps(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.inner_model.apply_model(*args, **kwargs)


class DiscreteVDDPMDenoiser(DiscreteSchedule):
    def __init__(self, model, alphas_cumprod, quantize):  # type: ignore[no-untyped-def]
        super().__init__(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, quantize)
        self.inner_model = model
        self.sigma_data = 1.0

    def get_scalings(self, sigma):  # type: ignore[no-untyped-def]
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = -sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        return c_skip, c_out, c_in

    def get_v(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.inner_model(*args, **kwargs)

    def forward(self, input, sigma, **kwargs):  # type: ignore[no-untyped-def]
        c_skip, c_out, c_in = [sampling.append_dims(x, input.ndim) for x in self.get_scalings(sigma)]
        return self.get_v(input * c_in, self.sigma_to_t(sigma), **kwargs) * c_out + input * c_skip


class CompVisVDenoiser(DiscreteVDDPMDenoiser):
    def __init__(self, model, quantize=False, device="cpu"):  # type: ignore[no-untyped-def]
        super().__init__(model, model.alphas_cumprod, quantize=quantize)

    def get_v(self, x, t, cond, **kwargs):  # type: ignore[no-untyped-def]
        return self.inner_model.apply_model(x, t, cond)
