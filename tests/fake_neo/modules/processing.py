"""Neo's `modules/processing.py` (N @f95f632) order: the fake Forge's processing (run here through
fake_neo_overlay.extend: process_images -> manage_model_and_prompt_cache (:782-790) -> process_images_inner:
scripts.process (:920) -> apply_unet (:932) -> per batch forge_model_reload (:948), objects = original (:950),
extra networks (:973), objects = after_applying_lora (:975), sample -> postprocess (:1183)), with Neo's
differences:

- txt2img `sample` (:1343-1427): `sd_model.set_shift(distilled_cfg_scale)` first; the first pass as Forge's
  (objects reset :1379, apply_token_merging :1380, process_before_every_sampling :1383);
- the hires pass (`sample_hr_pass`, :1429-1560): extra networks activated again (:1535), hr conds, `before_hr`, then
  the objects reset (:1543) and apply_token_merging (:1544), and `process_before_every_sampling` ONCE, after the
  reset (:1547) - Forge calls it before the reset too;
- img2img `sample` (:1884-1903): set_shift, then as Forge's."""

import fake_neo_overlay as _overlay

_overlay.extend(globals(), "modules/processing.py")

_forge_txt2img_sample = StableDiffusionProcessingTxt2Img.sample  # type: ignore[name-defined]  # noqa: F821
_forge_img2img_sample = StableDiffusionProcessingImg2Img.sample  # type: ignore[name-defined]  # noqa: F821


def _txt2img_sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):  # type: ignore[no-untyped-def]
    self.sd_model.set_shift(shift=getattr(self, "distilled_cfg_scale", 3.5))
    return _forge_txt2img_sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength,
                                 prompts)


def _img2img_sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):  # type: ignore[no-untyped-def]
    self.sd_model.set_shift(shift=getattr(self, "distilled_cfg_scale", 3.5))
    return _forge_img2img_sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength,
                                 prompts)


def _sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):  # type: ignore[no-untyped-def]
    if shared.state.interrupted:  # noqa: F821
        return samples
    self.is_hr_pass = True
    target_width, target_height = self.hr_upscale_to_x, self.hr_upscale_to_y
    self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)  # noqa: F821
    if self.latent_scale_mode is not None:
        samples = F.interpolate(samples, size=(target_height // opt_f, target_width // opt_f),  # noqa: F821
                                mode=self.latent_scale_mode["mode"], antialias=self.latent_scale_mode["antialias"])
        image_conditioning = self.txt2img_image_conditioning(samples)
    else:
        images = torch.clamp((decoded_samples + 1.0) / 2.0, min=0.0, max=1.0)  # noqa: F821
        images = F.interpolate(images, size=(target_height, target_width), mode="bilinear") * 2.0 - 1.0  # noqa: F821
        samples = self.sd_model.get_first_stage_encoding(self.sd_model.encode_first_stage(images))
        image_conditioning = self.img2img_image_conditioning(images, samples)
    shared.state.nextjob()  # noqa: F821
    samples = samples[:, :, self.truncate_y // 2:samples.shape[2] - (self.truncate_y + 1) // 2,
                      self.truncate_x // 2:samples.shape[3] - (self.truncate_x + 1) // 2]
    self.rng = rng.ImageRNG(samples.shape[1:], self.seeds, subseeds=self.subseeds,  # noqa: F821
                            subseed_strength=self.subseed_strength, seed_resize_from_h=self.seed_resize_from_h,
                            seed_resize_from_w=self.seed_resize_from_w)
    noise = self.rng.next()
    devices.torch_gc()  # noqa: F821
    if not self.disable_extra_networks:
        with devices.autocast():  # noqa: F821
            extra_networks.activate(self, self.hr_extra_network_data)  # noqa: F821
    with devices.autocast():  # noqa: F821
        self.calculate_hr_conds()
    if self.scripts is not None:
        self.scripts.before_hr(self)
    self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
    apply_token_merging(self.sd_model, self.get_token_merging_ratio(for_hr=True))  # noqa: F821
    if self.scripts is not None:
        self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
    if self.modified_noise is not None:
        noise, self.modified_noise = self.modified_noise, None
    samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                          steps=self.hr_second_pass_steps or self.steps,
                                          image_conditioning=image_conditioning)
    self.sampler = None
    devices.torch_gc()  # noqa: F821
    decoded = decode_latent_batch(self.sd_model, samples, target_device=devices.cpu, check_for_nans=True)  # noqa: F821
    self.is_hr_pass = False
    return decoded


StableDiffusionProcessingTxt2Img.sample = _txt2img_sample  # type: ignore[name-defined]  # noqa: F821
StableDiffusionProcessingTxt2Img.sample_hr_pass = _sample_hr_pass  # type: ignore[name-defined]  # noqa: F821
StableDiffusionProcessingImg2Img.sample = _img2img_sample  # type: ignore[name-defined]  # noqa: F821
