"""k-diffusion samplers (Euler, Euler a) driven through `CFGDenoiserKDiffusion`, whose inner model is
`CompVisVDenoiser` for v models and `CompVisDenoiser` otherwise, built from `shared.sd_model` on demand."""

from __future__ import annotations

import k_diffusion

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
            denoiser = k_diffusion.external.CompVisVDenoiser if shared.sd_model.parameterization == "v" \
                else k_diffusion.external.CompVisDenoiser
            self.model_wrap = denoiser(shared.sd_model, quantize=shared.opts.enable_quantization)
        return self.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model, options=None):  # type: ignore[no-untyped-def]
        super().__init__(funcname)
        self.options = options or {}
        self.func = getattr(k_diffusion.sampling, self.funcname)
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps):  # type: ignore[no-untyped-def]
        discard_next_to_last_sigma = opts.always_discard_next_to_last_sigma
        steps += 1 if discard_next_to_last_sigma else 0
        sigmas = self.model_wrap.get_sigmas(steps)
        if discard_next_to_last_sigma:
            import torch

            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas

    def _extra(self, p):  # type: ignore[no-untyped-def]
        if self.funcname == "sample_euler_ancestral":
            return {"eta": self.eta, "noise_sampler": lambda sigma, sigma_next: p.rng.next()}
        return {}

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,  # type: ignore[no-untyped-def]
                       image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        self.sampler_extra_args = {
            "cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale, "s_min_uncond": self.s_min_uncond,
        }
        extra = self._extra(p)
        return self.launch_sampling(t_enc + 1, lambda: self.func(
            self.model_wrap_cfg, xi, sigma_sched, extra_args=self.sampler_extra_args, disable=False,
            callback=self.callback_state, **extra))

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):  # type: ignore[no-untyped-def]
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        x = x * sigmas[0]
        self.initialize(p)
        self.last_latent = x
        self.sampler_extra_args = {
            "cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale, "s_min_uncond": self.s_min_uncond,
        }
        extra = self._extra(p)
        return self.launch_sampling(steps, lambda: self.func(
            self.model_wrap_cfg, x, sigmas, extra_args=self.sampler_extra_args, disable=False,
            callback=self.callback_state, **extra))
