"""Forge's `CFGDenoiser.forward` (`modules/sd_samplers_cfg_denoiser.py`): per step, the refiner switch
(`sd_samplers_common.apply_refiner`; after it the refiner's conds), `on_cfg_denoiser` callbacks, the CFG scale
(`p.hr_cfg` in the hires pass), then `backend.sampling.sampling_function` (which runs the UNet patcher the loaded
model holds in `forge_objects.unet` now), mask blend, `on_cfg_after_cfg`. A cond is one (B, T, C) tensor (SDXL: a
{"crossattn", "vector"} dict) per batch (no AND/weights composition, no prompt schedules: the fake's prompt_parser
has none)."""

from __future__ import annotations

import torch
from backend.sampling.sampling_function import sampling_function

from modules import sd_samplers_common
from modules.script_callbacks import (
    AfterCFGCallbackParams,
    CFGDenoiserParams,
    cfg_after_cfg_callback,
    cfg_denoiser_callback,
)
from modules.shared import state


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):  # type: ignore[no-untyped-def]
        super().__init__()
        self.model_wrap = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.image_cfg_scale = None
        self.sampler = sampler
        self.p = None

    @property
    def inner_model(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def update_inner_model(self):  # type: ignore[no-untyped-def]
        self.model_wrap = None
        c, uc = self.p.get_conds()
        self.sampler.sampler_extra_args["cond"] = c
        self.sampler.sampler_extra_args["uncond"] = uc

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):  # type: ignore[no-untyped-def]
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        if sd_samplers_common.apply_refiner(self, x):
            cond = self.sampler.sampler_extra_args["cond"]
            uncond = self.sampler.sampler_extra_args["uncond"]
        rows = (cond["crossattn"] if isinstance(cond, dict) else cond).shape[0]  # (SDXL: a condition dict)
        cond_composition = [[(i, 1.0)] for i in range(rows)]
        if self.mask is not None:
            predictor = self.inner_model.inner_model.forge_objects.unet.model.predictor
            noisy = predictor.noise_scaling(sigma[:, None, None, None], torch.randn_like(self.init_latent),
                                            self.init_latent, max_denoise=False)
            x = x * self.nmask + noisy * self.mask
        params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond, uncond, self)
        cfg_denoiser_callback(params)
        if self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg
        denoised, _, _ = sampling_function(self, denoiser_params=params, cond_scale=cond_scale,
                                           cond_composition=cond_composition)
        if self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask
        self.sampler.last_latent = denoised
        sd_samplers_common.store_latent(denoised)
        after = AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cfg_after_cfg_callback(after)
        self.step += 1
        return after.x

