"""Fake `backend/modules/k_prediction.py`: the discrete eps/v `Prediction` Forge builds from a diffusers scheduler
config ("scaled_linear" betas -> `sigmas`), with Forge's conversions:
`calculate_input(sigma, x) = x / sqrt(sigma^2 + sigma_data^2)`; `timestep(sigma)` = index of the nearest
log-sigma (an integer step, 0..999); `sigma(t)` interpolates log-sigmas; `calculate_denoised` = x - out * sigma
(eps) or the v formula; `noise_scaling(sigma, noise, latent)` = latent + noise * sigma."""

from __future__ import annotations

import torch


class Prediction(torch.nn.Module):
    def __init__(self, sigma_data=1.0, prediction_type="epsilon", linear_start=0.00085, linear_end=0.012,  # type: ignore[no-untyped-def]
                 timesteps=1000):
        super().__init__()
        self.sigma_data = sigma_data
        self.prediction_type = prediction_type
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.set_sigmas(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)

    def set_sigmas(self, sigmas):  # type: ignore[no-untyped-def]
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    @property
    def sigma_min(self):  # type: ignore[no-untyped-def]
        return self.sigmas[0]

    @property
    def sigma_max(self):  # type: ignore[no-untyped-def]
        return self.sigmas[-1]

    def calculate_input(self, sigma, noise):  # type: ignore[no-untyped-def]
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):  # type: ignore[no-untyped-def]
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        if self.prediction_type == "v_prediction":
            norm = sigma ** 2 + self.sigma_data ** 2
            return model_input * self.sigma_data ** 2 / norm - model_output * sigma * self.sigma_data / norm ** 0.5
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):  # type: ignore[no-untyped-def]
        scale = torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else sigma
        return noise * scale + latent_image

    def timestep(self, sigma):  # type: ignore[no-untyped-def]
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):  # type: ignore[no-untyped-def]
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp().to(timestep.device)

    def percent_to_sigma(self, percent):  # type: ignore[no-untyped-def]
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


def k_prediction_from_diffusers_scheduler(scheduler):  # type: ignore[no-untyped-def]
    config = scheduler.config
    if getattr(config, "prediction_type", None) in ("epsilon", "v_prediction") and \
            config.beta_schedule == "scaled_linear":
        return Prediction(sigma_data=1.0, prediction_type=config.prediction_type, linear_start=config.beta_start,
                          linear_end=config.beta_end, timesteps=config.num_train_timesteps)
    raise NotImplementedError(f"Failed to recognize {scheduler}")
