"""Forge's `modules/sd_samplers_common.py`, as far as the fake samplers use it: `SamplerData`,
`InterruptedException`, `setup_img2img_steps`, `store_latent`, and `Sampler` (conditioning_key always "crossattn":
Forge's model object has no `.model`), and the refiner switch `apply_refiner`."""

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
    """Forge's refiner switch, called by `CFGDenoiser.forward` before every step: once `refiner_switch_at` of the
    steps are done (by step count), `sampling_cleanup` of the current UNet patcher, `checkpoint_change` to the
    refiner (not saved), `refresh_model_loading_parameters` + `forge_model_reload()` (the refiner is loaded, the base
    unloaded; `model_loaded_callback` fires), the option set back to the base (whose loading parameters the next
    generation reloads), extra networks activated again, `p.setup_conds()`, `cfg_denoiser.update_inner_model()` and
    `sampling_prepare` of the refiner's freshly loaded UNet patcher - no script hook runs in between (no
    `process_before_every_sampling`). Returns True on the switch."""
    from backend.sampling.sampling_function import sampling_cleanup, sampling_prepare
    from modules_forge import main_entry

    from modules import extra_networks, sd_models

    completed_ratio = cfg_denoiser.step / cfg_denoiser.total_steps
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
    sampling_cleanup(sd_models.model_data.get_sd_model().forge_objects.unet)
    with sd_models.SkipWritingToConfig():
        fp_checkpoint = shared.opts.sd_model_checkpoint
        checkpoint_changed = main_entry.checkpoint_change(refiner_checkpoint_info.short_title, save=False,
                                                          refresh=False)
        if checkpoint_changed:
            try:
                main_entry.refresh_model_loading_parameters()
                sd_models.forge_model_reload()
            finally:
                main_entry.checkpoint_change(fp_checkpoint, save=False, refresh=True)
    if not cfg_denoiser.p.disable_extra_networks:
        extra_networks.activate(cfg_denoiser.p, cfg_denoiser.p.extra_network_data)
    cfg_denoiser.p.setup_conds()
    cfg_denoiser.update_inner_model()
    sampling_prepare(sd_models.model_data.get_sd_model().forge_objects.unet, x=x)
    return True


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
