from __future__ import annotations

from collections import namedtuple

import torch

from modules import devices, sd_models, shared
from modules.shared import opts

SamplerDataTuple = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])


class SamplerData(SamplerDataTuple):
    def total_steps(self, steps):  # type: ignore[no-untyped-def]
        if self.options.get("second_order", False):
            steps = steps * 2
        return steps


class InterruptedException(BaseException):
    pass


def setup_img2img_steps(p, steps=None):  # type: ignore[no-untyped-def]
    if opts.img2img_fix_steps or steps is not None:
        requested_steps = steps or p.steps
        steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc


def apply_refiner(cfg_denoiser, sigma=None):  # type: ignore[no-untyped-def]
    """Switch to `p.refiner_checkpoint_info` once `refiner_switch_at` of the schedule is done (by model timestep
    unless opts.refiner_switch_by_sample_steps), through `reload_model_weights(info=...)`. Returns True on switch."""
    if opts.refiner_switch_by_sample_steps or sigma is None:
        completed_ratio = cfg_denoiser.step / cfg_denoiser.total_steps
        cfg_denoiser.p.extra_generation_params["Refiner switch by sampling steps"] = True
    else:
        try:
            timestep = torch.argmin(torch.abs(cfg_denoiser.inner_model.sigmas.to(sigma.device) - torch.max(sigma)))
        except AttributeError:
            timestep = torch.max(sigma).to(dtype=int)
        completed_ratio = (999 - timestep) / 1000

    refiner_switch_at = cfg_denoiser.p.refiner_switch_at
    refiner_checkpoint_info = cfg_denoiser.p.refiner_checkpoint_info
    if refiner_switch_at is not None and completed_ratio < refiner_switch_at:
        return False
    if refiner_checkpoint_info is None or shared.sd_model.sd_checkpoint_info == refiner_checkpoint_info:
        return False
    if getattr(cfg_denoiser.p, "enable_hr", False):
        is_second_pass = cfg_denoiser.p.is_hr_pass
        if opts.hires_fix_refiner_pass == "first pass" and is_second_pass:
            return False
        if opts.hires_fix_refiner_pass == "second pass" and not is_second_pass:
            return False
        if opts.hires_fix_refiner_pass != "second pass":
            cfg_denoiser.p.extra_generation_params["Hires refiner"] = opts.hires_fix_refiner_pass

    cfg_denoiser.p.extra_generation_params["Refiner"] = refiner_checkpoint_info.short_title
    cfg_denoiser.p.extra_generation_params["Refiner switch at"] = refiner_switch_at
    with sd_models.SkipWritingToConfig():
        sd_models.reload_model_weights(info=refiner_checkpoint_info)
    devices.torch_gc()
    cfg_denoiser.p.setup_conds()
    cfg_denoiser.update_inner_model()
    return True


class Sampler:
    def __init__(self, funcname):  # type: ignore[no-untyped-def]
        self.funcname = funcname
        self.func = funcname
        self.extra_params: list = []
        self.sampler_noises = None
        self.stop_at = None
        self.eta = None
        self.config = None
        self.last_latent = None
        self.s_min_uncond = None
        self.s_churn = 0.0
        self.s_tmin = 0.0
        self.s_tmax = float("inf")
        self.s_noise = 1.0
        self.eta_option_field = "eta_ancestral"
        self.eta_infotext_field = "Eta"
        self.eta_default = 1.0
        self.conditioning_key = getattr(shared.sd_model.model, "conditioning_key", "crossattn")
        self.p = None
        self.model_wrap_cfg = None
        self.sampler_extra_args = None
        self.options: dict = {}

    def callback_state(self, d):  # type: ignore[no-untyped-def]
        step = d["i"]
        if self.stop_at is not None and step > self.stop_at:
            raise InterruptedException
        shared.state.sampling_step = step

    def launch_sampling(self, steps, func):  # type: ignore[no-untyped-def]
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps) if self.config else steps
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def initialize(self, p):  # type: ignore[no-untyped-def]
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = p.mask if hasattr(p, "mask") else None
        self.model_wrap_cfg.nmask = p.nmask if hasattr(p, "nmask") else None
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.image_cfg_scale = getattr(p, "image_cfg_scale", None)
        self.eta = p.eta if p.eta is not None else getattr(opts, self.eta_option_field, 0.0)
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0)
        return {}
