"""Forge's `modules/processing.py` (dfdcbab) order, on top of the fake A1111's processing classes (Forge keeps A1111's
`StableDiffusionProcessing*` fields, prompts/seeds/conds set-up, `Processed` and infotext):

process_images: before_process -> override_settings through `sysinfo.set_config` (a checkpoint override only
refreshes the loading parameters) -> `manage_model_and_prompt_cache` (`forge_model_reload()`: the model loads HERE,
at the first generation; after the loading parameters changed without a reload, `unload_all_models()`) ->
process_images_inner -> restore the options with `set_config`.

process_images_inner: setup prompts/seeds -> scripts.process -> (inference mode) p.init -> `sd_unet.apply_unet()` ->
per batch: `forge_model_reload()`; `forge_objects = forge_objects_original.shallow_copy()`; parse and activate extra
networks (the LoRA extension sets `forge_objects(_after_applying_lora)`; `after_extra_networks_activate` fires);
`forge_objects = forge_objects_after_applying_lora.shallow_copy()`; process_batch; conds; `p.sample` -> decode ->
postprocess_batch/_list, images -> deactivate extra networks -> Processed -> scripts.postprocess.

txt2img `sample`: sampler created; `forge_objects = forge_objects_after_applying_lora.shallow_copy()`;
`process_before_every_sampling`; sampling (the sampler loads `forge_objects.unet` through the memory manager). Hires:
latent upscale (or decode/resize/encode), extra networks again, hr conds, `before_hr`, `process_before_every_sampling`
(on the first pass's objects), `forge_objects = ...after_applying_lora.shallow_copy()`, `process_before_every_sampling`
AGAIN, img2img sampling with `p.hr_cfg` (default 1.0), decode inside the pass (the pass returns decoded images).
img2img `sample`: the same shallow copy and hook before `sample_img2img`, then the mask blend.
The refiner switch: `p.refiner_checkpoint_info` from `refiner_checkpoint` here, the switch inside the sampling loop
(`sd_samplers_common.apply_refiner`, called by `CFGDenoiser.forward`). Not modelled: a hires checkpoint/modules
switch, token merging, zero-terminal-SNR, grids, saving, face restoration, color correction, overlays. Fake-only: `Processed.latents` holds the final latents (before decode)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from backend import memory_management
from PIL import Image

from modules import (
    a1111,
    devices,
    extra_networks,
    rng,
    scripts,
    sd_models,
    sd_samplers,
    sd_unet,
    shared,
    sysinfo,
)
from modules.sd_models import apply_token_merging, forge_model_reload
from modules.shared import opts, state

_base = a1111("processing")

opt_C = _base.opt_C
opt_f = _base.opt_f
get_fixed_seed = _base.get_fixed_seed
image_to_tensor = _base.image_to_tensor
Processed = _base.Processed
create_infotext = _base.create_infotext
StableDiffusionProcessing = _base.StableDiffusionProcessing

need_global_unload = False


class DecodedSamples(list):
    already_decoded = True
    latents = None  # fake-only: the latents these images were decoded from


def decode_latent_batch(model, batch, target_device=None, check_for_nans=False):  # type: ignore[no-untyped-def]
    samples = DecodedSamples()
    for i in range(batch.shape[0]):
        sample = model.decode_first_stage(batch[i:i + 1])[0]
        samples.append(sample.to(target_device) if target_device is not None else sample)
    samples.latents = batch
    return samples


def txt2img_image_conditioning(sd_model, x, width, height):  # type: ignore[no-untyped-def]
    if sd_model.is_inpaint:
        image = torch.ones(x.shape[0], 3, height, width, device=x.device) * 0.5
        cond = sd_model.get_first_stage_encoding(sd_model.encode_first_stage(image))
        return F.pad(cond, (0, 0, 0, 0, 1, 0), value=1.0).to(x.dtype)
    return x.new_zeros(x.shape[0], 5, 1, 1, dtype=x.dtype, device=x.device)


def _forge_fields(p) -> None:  # type: ignore[no-untyped-def]
    p.latents_after_sampling = []
    p.pixels_after_sampling = []
    p.extra_result_images = []
    p.modified_noise = None


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(_base.StableDiffusionProcessingTxt2Img):
    hr_cfg: float = 1.0

    def __post_init__(self):  # type: ignore[no-untyped-def]
        super().__post_init__()
        _forge_fields(self)

    def init(self, all_prompts, all_seeds, all_subseeds):  # type: ignore[no-untyped-def]
        super().init(all_prompts, all_seeds, all_subseeds)
        if self.enable_hr:
            if self.hr_checkpoint_info is not None:
                raise NotImplementedError("the fake Forge has no hires checkpoint switch")
            self.extra_generation_params["Hires CFG Scale"] = self.hr_cfg

    def txt2img_image_conditioning(self, x, width=None, height=None):  # type: ignore[no-untyped-def]
        return txt2img_image_conditioning(self.sd_model, x, width or self.width, height or self.height)

    def img2img_image_conditioning(self, source_image, latent_image, image_mask=None):  # type: ignore[no-untyped-def]
        if self.sd_model.is_inpaint:
            return _base.inpainting_image_conditioning(self, source_image, latent_image, image_mask)
        return latent_image.new_zeros(latent_image.shape[0], 5, 1, 1)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):  # type: ignore[no-untyped-def]
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        x = self.rng.next()
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        apply_token_merging(self.sd_model, self.get_token_merging_ratio())
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        if self.modified_noise is not None:
            x, self.modified_noise = self.modified_noise, None
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning,
                                      image_conditioning=self.txt2img_image_conditioning(x))
        del x
        if not self.enable_hr:
            return samples
        devices.torch_gc()
        decoded_samples = None
        if self.latent_scale_mode is None:
            decoded_samples = torch.stack(decode_latent_batch(self.sd_model, samples, target_device=devices.cpu)
                                          ).to(dtype=torch.float32)
        return self.sample_hr_pass(samples, decoded_samples, seeds, subseeds, subseed_strength, prompts)

    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):  # type: ignore[no-untyped-def]
        if shared.state.interrupted:
            return samples
        self.is_hr_pass = True
        target_width, target_height = self.hr_upscale_to_x, self.hr_upscale_to_y
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        if self.latent_scale_mode is not None:
            samples = F.interpolate(samples, size=(target_height // opt_f, target_width // opt_f),
                                    mode=self.latent_scale_mode["mode"], antialias=self.latent_scale_mode["antialias"])
            image_conditioning = self.txt2img_image_conditioning(samples)
        else:
            images = torch.clamp((decoded_samples + 1.0) / 2.0, min=0.0, max=1.0)
            images = F.interpolate(images, size=(target_height, target_width), mode="bilinear") * 2.0 - 1.0
            samples = self.sd_model.get_first_stage_encoding(self.sd_model.encode_first_stage(images))
            image_conditioning = self.img2img_image_conditioning(images, samples)
        shared.state.nextjob()
        samples = samples[:, :, self.truncate_y // 2:samples.shape[2] - (self.truncate_y + 1) // 2,
                          self.truncate_x // 2:samples.shape[3] - (self.truncate_x + 1) // 2]
        self.rng = rng.ImageRNG(samples.shape[1:], self.seeds, subseeds=self.subseeds,
                                subseed_strength=self.subseed_strength, seed_resize_from_h=self.seed_resize_from_h,
                                seed_resize_from_w=self.seed_resize_from_w)
        noise = self.rng.next()
        devices.torch_gc()
        if not self.disable_extra_networks:
            with devices.autocast():
                extra_networks.activate(self, self.hr_extra_network_data)
        with devices.autocast():
            self.calculate_hr_conds()
        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(p=self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        apply_token_merging(self.sd_model, self.get_token_merging_ratio(for_hr=True))
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        if self.modified_noise is not None:
            noise, self.modified_noise = self.modified_noise, None
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                              steps=self.hr_second_pass_steps or self.steps,
                                              image_conditioning=image_conditioning)
        self.sampler = None
        devices.torch_gc()
        decoded = decode_latent_batch(self.sd_model, samples, target_device=devices.cpu, check_for_nans=True)
        self.is_hr_pass = False
        return decoded


@dataclass(repr=False)
class StableDiffusionProcessingImg2Img(_base.StableDiffusionProcessingImg2Img):
    def __post_init__(self):  # type: ignore[no-untyped-def]
        super().__post_init__()
        _forge_fields(self)

    def img2img_image_conditioning(self, source_image, latent_image, image_mask=None):  # type: ignore[no-untyped-def]
        if self.sd_model.is_inpaint:
            return _base.inpainting_image_conditioning(self, source_image, latent_image, image_mask)
        return latent_image.new_zeros(latent_image.shape[0], 5, 1, 1)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):  # type: ignore[no-untyped-def]
        x = self.rng.next()
        if self.initial_noise_multiplier != 1.0:
            self.extra_generation_params["Noise multiplier"] = self.initial_noise_multiplier
            x *= self.initial_noise_multiplier
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        apply_token_merging(self.sd_model, self.get_token_merging_ratio())
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=self.init_latent, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        if self.modified_noise is not None:
            x, self.modified_noise = self.modified_noise, None
        samples = self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning,
                                              image_conditioning=self.image_conditioning)
        if self.mask is not None:
            samples = samples * self.nmask + self.init_latent * self.mask
        del x
        devices.torch_gc()
        return samples


def manage_model_and_prompt_cache(p):  # type: ignore[no-untyped-def]
    global need_global_unload
    p.sd_model, just_reloaded = forge_model_reload()
    if need_global_unload and not just_reloaded:
        memory_management.unload_all_models()
    need_global_unload = False


def process_images(p):  # type: ignore[no-untyped-def]
    if p.scripts is not None:
        p.scripts.before_process(p)
    stored_opts = {k: opts.data[k] if k in opts.data else opts.get_default(k) for k in p.override_settings
                   if k in opts.data}
    try:
        if sd_models.checkpoint_aliases.get(p.override_settings.get("sd_model_checkpoint")) is None:
            p.override_settings.pop("sd_model_checkpoint", None)
        sysinfo.set_config(p.override_settings, is_api=True, run_callbacks=False, save_config=False)
        manage_model_and_prompt_cache(p)
        sd_samplers.fix_p_invalid_sampler_and_scheduler(p)
        res = process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            sysinfo.set_config(stored_opts, save_config=False)
    return res


def process_images_inner(p):  # type: ignore[no-untyped-def]
    assert p.prompt is not None and (not isinstance(p.prompt, list) or len(p.prompt) > 0)
    devices.torch_gc()
    seed = get_fixed_seed(p.seed)
    subseed = get_fixed_seed(p.subseed)
    if p.restore_faces is None:
        p.restore_faces = opts.face_restoration
    if p.tiling is None:
        p.tiling = opts.tiling
    if p.refiner_checkpoint not in (None, "", "None", "none"):  # the switch itself: sd_samplers_common.apply_refiner
        p.refiner_checkpoint_info = sd_models.get_closet_checkpoint_match(p.refiner_checkpoint)
        if p.refiner_checkpoint_info is None:
            raise Exception(f"Could not find checkpoint with name {p.refiner_checkpoint}")  # noqa: TRY002

    p.sd_model_name = shared.sd_model.sd_checkpoint_info.name_for_extra
    p.sd_model_hash = shared.sd_model.sd_model_hash
    p.sd_vae_name = p.sd_vae_hash = None
    p.sd_model.comments = []
    p.sd_model.extra_generation_params = {}
    p.fill_fields_from_opts()
    p.setup_prompts()
    p.all_seeds = seed if isinstance(seed, list) else \
        [int(seed) + (x if p.subseed_strength == 0 else 0) for x in range(len(p.all_prompts))]
    p.all_subseeds = subseed if isinstance(subseed, list) else [int(subseed) + x for x in range(len(p.all_prompts))]

    if p.scripts is not None:
        p.scripts.process(p)

    infotexts, output_images, latents = [], [], []
    with torch.inference_mode():
        with devices.autocast():
            p.init(p.all_prompts, p.all_seeds, p.all_subseeds)
            sd_unet.apply_unet()
        if state.job_count == -1:
            state.job_count = p.n_iter

        for n in range(p.n_iter):
            p.iteration = n
            if state.skipped:
                state.skipped = False
            if state.interrupted or state.stopping_generation:
                break
            sd_models.forge_model_reload()  # the model can be changed, for example by the refiner or hires fix
            p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
            p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
            p.subseeds = p.all_subseeds[n * p.batch_size:(n + 1) * p.batch_size]
            latent_channels = shared.sd_model.forge_objects.vae.latent_channels
            p.rng = rng.ImageRNG((latent_channels, p.height // opt_f, p.width // opt_f), p.seeds,
                                 subseeds=p.subseeds, subseed_strength=p.subseed_strength,
                                 seed_resize_from_h=p.seed_resize_from_h, seed_resize_from_w=p.seed_resize_from_w)
            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds,
                                               subseeds=p.subseeds)
            if len(p.prompts) == 0:
                break
            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)
            p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
            p.setup_conds()
            p.extra_generation_params.update(p.sd_model.extra_generation_params)
            for comment in p.sd_model.comments:
                p.comment(comment)
            if p.n_iter > 1:
                shared.state.job = f"Batch {n + 1} out of {p.n_iter}"

            samples_ddim = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds,
                                    subseeds=p.subseeds, subseed_strength=p.subseed_strength, prompts=p.prompts)
            p.latents_after_sampling.extend(samples_ddim)
            if p.scripts is not None:
                ps = scripts.PostSampleArgs(samples_ddim)
                p.scripts.post_sample(p, ps)
                samples_ddim = ps.samples
            if getattr(samples_ddim, "already_decoded", False):
                x_samples_ddim = samples_ddim
                latents.append(samples_ddim.latents.detach().float().clone())
            else:
                devices.test_for_nans(samples_ddim, "unet")
                latents.append(samples_ddim.detach().float().clone())
                x_samples_ddim = decode_latent_batch(p.sd_model, samples_ddim, target_device=devices.cpu,
                                                     check_for_nans=True)
            x_samples_ddim = torch.stack(x_samples_ddim).float()
            x_samples_ddim = torch.clamp((x_samples_ddim + 1.0) / 2.0, min=0.0, max=1.0)
            del samples_ddim
            devices.torch_gc()
            state.nextjob()

            if p.scripts is not None:
                p.scripts.postprocess_batch(p, x_samples_ddim, batch_number=n)
                batch_params = scripts.PostprocessBatchListArgs(list(x_samples_ddim))
                p.scripts.postprocess_batch_list(p, batch_params, batch_number=n)
                x_samples_ddim = batch_params.images

            for i, x_sample in enumerate(x_samples_ddim):
                p.batch_index = i
                x_sample = 255.0 * np.moveaxis(x_sample.cpu().numpy(), 0, 2)
                image = Image.fromarray(x_sample.astype(np.uint8))
                if p.scripts is not None:
                    pp = scripts.PostprocessImageArgs(image)
                    p.scripts.postprocess_image(p, pp)
                    image = pp.image
                p.pixels_after_sampling.append(image)
                text = create_infotext(p, p.prompts, p.seeds, p.subseeds, index=i,
                                       all_negative_prompts=p.negative_prompts)
                infotexts.append(text)
                image.info["parameters"] = text
                output_images.append(image)
            del x_samples_ddim
            devices.torch_gc()

        if not infotexts:
            infotexts.append(Processed(p, []).infotext(p, 0))
        p.color_corrections = None

    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    devices.torch_gc()
    res = Processed(p, images_list=output_images, seed=p.all_seeds[0], info=infotexts[0],
                    subseed=p.all_subseeds[0], index_of_first_image=0, infotexts=infotexts,
                    extra_images_list=p.extra_result_images)
    res.latents = torch.cat(latents) if latents else None
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
