"""Forge's k-diffusion samplers (`modules/sd_samplers_kdiffusion.py`), "Euler" and "Euler a" only: the inner model is
`ForgeScheduleLinker(shared.sd_model.forge_objects.unet.model.predictor)` with `inner_model = shared.sd_model`;
`sample`/`sample_img2img` first `sampling_prepare(forge_objects.unet)` (Forge's memory manager loads - and object-
patches - the UNet patcher the model holds at that moment, i.e. after `process_before_every_sampling`), take the
sigmas from the linker (no scheduler for Euler: "Automatic"), scale the noise with the predictor, run the sampler over
`CFGDenoiserKDiffusion`, then `sampling_cleanup`."""

from __future__ import annotations

import inspect

import k_diffusion.external
import k_diffusion.sampling
import torch
from backend.sampling.sampling_function import sampling_cleanup, sampling_prepare

from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared
from modules.shared import opts

samplers_k_diffusion = [
    ("Euler a", "sample_euler_ancestral", ["k_euler_a", "k_euler_ancestral"], {"uses_ensd": True}),
    ("Euler", "sample_euler", ["k_euler"], {}),
]

samplers_data_k_diffusion = [
    sd_samplers_common.SamplerData(label, lambda model, funcname=funcname: KDiffusionSampler(funcname, model),
                                   aliases, options)
    for label, funcname, aliases, options in samplers_k_diffusion
]


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):  # type: ignore[no-untyped-def]
        if self.model_wrap is None:
            self.model_wrap = k_diffusion.external.ForgeScheduleLinker(
                shared.sd_model.forge_objects.unet.model.predictor)
            self.model_wrap.inner_model = shared.sd_model
        return self.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model, options=None):  # type: ignore[no-untyped-def]
        super().__init__(funcname)
        self.options = options or {}
        self.func = getattr(k_diffusion.sampling, self.funcname)
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps):  # type: ignore[no-untyped-def]
        discard = opts.always_discard_next_to_last_sigma
        sigmas = self.model_wrap.get_sigmas(steps + 1 if discard else steps)
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas.cpu()

    def _extra(self, p, x, sigmas):  # type: ignore[no-untyped-def]
        extra = self.initialize(p)
        if self.funcname == "sample_euler_ancestral":
            extra.update(eta=self.eta, noise_sampler=lambda sigma, sigma_next: p.rng.next())
        if "sigmas" in inspect.signature(self.func).parameters:
            extra["sigmas"] = sigmas
        return extra

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,  # type: ignore[no-untyped-def]
                       image_conditioning=None):
        unet_patcher = self.model_wrap.inner_model.forge_objects.unet
        sampling_prepare(self.model_wrap.inner_model.forge_objects.unet, x=x)
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps).to(x.device)
        sigma_sched = sigmas[steps - t_enc - 1:]
        x = x.to(noise)
        xi = self.model_wrap.predictor.noise_scaling(sigma_sched[0], noise, x, max_denoise=False)
        extra = self._extra(p, x, sigma_sched)
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        self.sampler_extra_args = {"cond": conditioning, "image_cond": image_conditioning,
                                   "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale,
                                   "s_min_uncond": self.s_min_uncond}
        samples = self.launch_sampling(t_enc + 1, lambda: self.func(
            self.model_wrap_cfg, xi, extra_args=self.sampler_extra_args, disable=False, callback=self.callback_state,
            **extra))
        sampling_cleanup(unet_patcher)
        return samples

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):  # type: ignore[no-untyped-def]
        unet_patcher = self.model_wrap.inner_model.forge_objects.unet
        sampling_prepare(self.model_wrap.inner_model.forge_objects.unet, x=x)
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps).to(x.device)
        x = self.model_wrap.predictor.noise_scaling(sigmas[0], x, torch.zeros_like(x), max_denoise=False)
        extra = self._extra(p, x, sigmas)
        self.last_latent = x
        self.sampler_extra_args = {"cond": conditioning, "image_cond": image_conditioning,
                                   "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale,
                                   "s_min_uncond": self.s_min_uncond}
        samples = self.launch_sampling(steps, lambda: self.func(
            self.model_wrap_cfg, x, extra_args=self.sampler_extra_args, disable=False, callback=self.callback_state,
            **extra))
        sampling_cleanup(unet_patcher)
        return samples
