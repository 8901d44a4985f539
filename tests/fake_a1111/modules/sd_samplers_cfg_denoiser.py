"""`CFGDenoiser.forward`, per sampler step: refiner switch; x/sigma/image_cond for cond rows then uncond rows;
`on_cfg_denoiser`; UNet calls batched as A1111 does (one call with cond+uncond when their context lengths match and
`opts.batch_cond_uncond`; chunks of B rows without it; cond rows in chunks of 2B (B) then uncond separately when the
lengths differ, unless `pad_cond_uncond(_v0)`); `on_cfg_denoised`; CFG combine; `on_cfg_after_cfg`."""

from __future__ import annotations

import torch

from modules import prompt_parser, sd_samplers_common, shared  # noqa: F401
from modules.script_callbacks import (
    AfterCFGCallbackParams,
    CFGDenoisedParams,
    CFGDenoiserParams,
    cfg_after_cfg_callback,
    cfg_denoised_callback,
    cfg_denoiser_callback,
)
from modules.shared import opts, state


def catenate_conds(conds):  # type: ignore[no-untyped-def]
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([x[key] for x in conds]) for key in conds[0]}


def subscript_cond(cond, a, b):  # type: ignore[no-untyped-def]
    if not isinstance(cond, dict):
        return cond[a:b]
    return {key: vec[a:b] for key, vec in cond.items()}


def cond_shape(cond):  # type: ignore[no-untyped-def]
    return cond["crossattn"].shape if isinstance(cond, dict) else cond.shape


def pad_cond(tensor, repeats, empty):  # type: ignore[no-untyped-def]
    if not isinstance(tensor, dict):
        return torch.cat([tensor, empty.repeat((tensor.shape[0], repeats, 1)).to(tensor)], axis=1)
    tensor = dict(tensor)
    tensor["crossattn"] = pad_cond(tensor["crossattn"], repeats, empty)
    return tensor


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
        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        self.sampler = sampler
        self.p = None
        self.cond_scale_miltiplier = 1.0
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None
        self.mask_before_denoising = False

    @property
    def inner_model(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):  # type: ignore[no-untyped-def]
        denoised_uncond = x_out[-cond_shape(uncond)[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def get_pred_x0(self, x_in, x_out, sigma):  # type: ignore[no-untyped-def]
        return x_out

    def update_inner_model(self):  # type: ignore[no-untyped-def]
        self.model_wrap = None
        c, uc = self.p.get_conds()
        self.sampler.sampler_extra_args["cond"] = c
        self.sampler.sampler_extra_args["uncond"] = uc

    def pad_cond_uncond(self, cond, uncond):  # type: ignore[no-untyped-def]
        empty = shared.sd_model.cond_stage_model_empty_prompt
        num_repeats = (cond_shape(cond)[1] - cond_shape(uncond)[1]) // empty.shape[1]
        if num_repeats < 0:
            cond = pad_cond(cond, -num_repeats, empty)
            self.padded_cond_uncond = True
        elif num_repeats > 0:
            uncond = pad_cond(uncond, num_repeats, empty)
            self.padded_cond_uncond = True
        return cond, uncond

    def pad_cond_uncond_v0(self, cond, uncond):  # type: ignore[no-untyped-def]
        def pad_last(t, n):  # type: ignore[no-untyped-def]
            if isinstance(t, dict):
                t = dict(t)
                t["crossattn"] = pad_last(t["crossattn"], n)
                return t
            return torch.cat([t, t[:, -1:].repeat(1, n, 1)], dim=1)

        diff = cond_shape(cond)[1] - cond_shape(uncond)[1]
        if diff > 0:
            uncond = pad_last(uncond, diff)
        elif diff < 0:
            cond = pad_last(cond, -diff)
        self.padded_cond_uncond_v0 = True
        return cond, uncond

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):  # type: ignore[no-untyped-def]
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        if sd_samplers_common.apply_refiner(self, sigma):
            cond = self.sampler.sampler_extra_args["cond"]
            uncond = self.sampler.sampler_extra_args["uncond"]

        # one cond per image (no AND / prompt schedules in the fake)
        tensor = cond
        batch_size = cond_shape(tensor)[0]
        conds_list = [[(i, 1.0)] for i in range(batch_size)]
        repeats = [len(conds_list[i]) for i in range(batch_size)]

        if isinstance(uncond, dict):
            def make_condition_dict(c_crossattn, c_concat):  # type: ignore[no-untyped-def]
                return {**c_crossattn, "c_concat": [c_concat]}
        else:
            def make_condition_dict(c_crossattn, c_concat):  # type: ignore[no-untyped-def]
                return {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}

        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)]
                                  + [image_cond])

        denoiser_params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps,
                                            tensor, uncond, self)
        cfg_denoiser_callback(denoiser_params)
        x_in = denoiser_params.x
        image_cond_in = denoiser_params.image_cond
        sigma_in = denoiser_params.sigma
        tensor = denoiser_params.text_cond
        uncond = denoiser_params.text_uncond

        skip_uncond = False
        if (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            skip_uncond = True
            self.p.extra_generation_params["NGMS"] = s_min_uncond
            if opts.s_min_uncond_all:
                self.p.extra_generation_params["NGMS all steps"] = opts.s_min_uncond_all
        if skip_uncond:
            x_in = x_in[:-batch_size]
            sigma_in = sigma_in[:-batch_size]

        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        if opts.pad_cond_uncond_v0 and cond_shape(tensor)[1] != cond_shape(uncond)[1]:
            tensor, uncond = self.pad_cond_uncond_v0(tensor, uncond)
        elif opts.pad_cond_uncond and cond_shape(tensor)[1] != cond_shape(uncond)[1]:
            tensor, uncond = self.pad_cond_uncond(tensor, uncond)

        if cond_shape(tensor)[1] == cond_shape(uncond)[1] or skip_uncond:
            cond_in = tensor if skip_uncond else catenate_conds([tensor, uncond])
            if opts.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make_condition_dict(cond_in, image_cond_in))
            else:
                x_out = torch.zeros_like(x_in)
                for batch_offset in range(0, x_out.shape[0], batch_size):
                    a = batch_offset
                    b = a + batch_size
                    x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b],
                                                  cond=make_condition_dict(subscript_cond(cond_in, a, b),
                                                                           image_cond_in[a:b]))
        else:
            x_out = torch.zeros_like(x_in)
            batch_size = batch_size * 2 if opts.batch_cond_uncond else batch_size
            n_cond = cond_shape(tensor)[0]
            for batch_offset in range(0, n_cond, batch_size):
                a = batch_offset
                b = min(a + batch_size, n_cond)
                x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b],
                                              cond=make_condition_dict(subscript_cond(tensor, a, b),
                                                                       image_cond_in[a:b]))
            if not skip_uncond:
                nu = cond_shape(uncond)[0]
                x_out[-nu:] = self.inner_model(x_in[-nu:], sigma_in[-nu:],
                                               cond=make_condition_dict(uncond, image_cond_in[-nu:]))

        denoised_image_indexes = [c[0][0] for c in conds_list]
        if skip_uncond:
            fake_uncond = torch.cat([x_out[i:i + 1] for i in denoised_image_indexes])
            x_out = torch.cat([x_out, fake_uncond])

        denoised_params = CFGDenoisedParams(x_out, state.sampling_step, state.sampling_steps, self.inner_model)
        cfg_denoised_callback(denoised_params)

        denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0 if skip_uncond else cond_scale)
        if self.mask is not None:
            denoised = self.init_latent * self.mask + self.nmask * denoised

        self.sampler.last_latent = self.get_pred_x0(torch.cat([x_in[i:i + 1] for i in denoised_image_indexes]),
                                                    torch.cat([x_out[i:i + 1] for i in denoised_image_indexes]),
                                                    sigma)
        after_cfg_callback_params = AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cfg_after_cfg_callback(after_cfg_callback_params)
        denoised = after_cfg_callback_params.x
        self.step += 1
        return denoised
