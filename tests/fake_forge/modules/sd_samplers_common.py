"""Forge's `modules/sd_samplers_common.py`, as far as the fake samplers use it: `SamplerData`,
`InterruptedException`, `setup_img2img_steps`, `store_latent`, and `Sampler` (conditioning_key always "crossattn":
Forge's model object has no `.model`). The refiner switch (`apply_refiner`) is not modelled: it never switches."""

from __future__ import annotations

from collections import namedtuple

from modules import shared
from modules.shared import opts

SamplerDataTuple = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])


class SamplerData(SamplerDataTuple):
    def total_steps(self, steps):  # type: ignore[no-untyped-def]
        return steps * 2 if self.options.get("second_order", False) else steps


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


def apply_refiner(cfg_denoiser, x):  # type: ignore[no-untyped-def]
    return False


def store_latent(decoded):  # type: ignore[no-untyped-def]
    shared.state.current_latent = decoded


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
        self.conditioning_key = "crossattn"
        self.p = None
        self.model_wrap_cfg = None
        self.sampler_extra_args = None
        self.options: dict = {}

    def callback_state(self, d):  # type: ignore[no-untyped-def]
        if self.stop_at is not None and d["i"] > self.stop_at:
            raise InterruptedException
        shared.state.sampling_step = d["i"]

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
        self.model_wrap_cfg.mask = getattr(p, "mask", None)
        self.model_wrap_cfg.nmask = getattr(p, "nmask", None)
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.image_cfg_scale = getattr(p, "image_cfg_scale", None)
        self.eta = p.eta if p.eta is not None else getattr(opts, self.eta_option_field, 0.0)
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0)
        return {}

    def add_infotext(self, p):  # type: ignore[no-untyped-def]
        pass
