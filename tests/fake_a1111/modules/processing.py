"""`StableDiffusionProcessing*`, `process_images` and `process_images_inner` in A1111 v1.10.1's order (§6):

process_images: before_process -> stored_opts (keys present in opts.data only) -> reload_model_weights() unless a
valid checkpoint override -> opts.set(k, v, is_api=True, run_callbacks=False) (+ reload for sd_model_checkpoint)
-> process_images_inner -> finally restore with setattr (no callbacks; model/unet state restored lazily).

process_images_inner: setup_prompts -> scripts.process -> p.init -> sd_unet.apply_unet() -> per n_iter:
reload_model_weights(), before_process_batch, parse extra networks, extra_networks.activate (fires
after_extra_networks_activate), process_batch, setup_conds, sample (process_before_every_sampling; hires:
reload_model_weights(info=hr), activate again, before_hr, process_before_every_sampling, second pass), decode ->
extra_networks.deactivate -> Processed -> scripts.postprocess.

Fake-only: `Processed.latents` holds the final latents of every image (before decode)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from modules import (
    devices,
    errors,
    extra_networks,
    prompt_parser,
    rng,
    scripts,
    sd_models,
    sd_samplers,
    sd_unet,
    shared,
)
from modules.sd_hijack import model_hijack
from modules.shared import opts, state

opt_C = 4
opt_f = 8


def txt2img_image_conditioning(sd_model, x, width, height):  # type: ignore[no-untyped-def]
    if sd_model.model.conditioning_key in {"hybrid", "concat"}:
        image_conditioning = torch.ones(x.shape[0], 3, height, width, device=x.device) * 0.5
        image_conditioning = sd_model.get_first_stage_encoding(sd_model.encode_first_stage(image_conditioning))
        image_conditioning = F.pad(image_conditioning, (0, 0, 0, 0, 1, 0), value=1.0)
        return image_conditioning.to(x.dtype)
    diffusion_model_input = sd_model.model.state_dict().get("diffusion_model.input_blocks.0.0.weight", None)
    if diffusion_model_input is not None and diffusion_model_input.shape[1] == 9:
        image_conditioning = torch.ones(x.shape[0], 3, height, width, device=x.device) * 0.5
        image_conditioning = sd_model.get_first_stage_encoding(sd_model.encode_first_stage(image_conditioning))
        image_conditioning = F.pad(image_conditioning, (0, 0, 0, 0, 1, 0), value=1.0)
        return image_conditioning.to(x.dtype)
    # Dummy zero conditioning if we're not using inpainting or unclip models.
    return x.new_zeros(x.shape[0], 5, 1, 1, dtype=x.dtype, device=x.device)


def get_fixed_seed(seed):  # type: ignore[no-untyped-def]
    if seed == "" or seed is None:
        seed = -1
    elif isinstance(seed, str):
        try:
            seed = int(seed)
        except Exception:  # noqa: BLE001
            seed = -1
    if seed == -1:
        return int(random.randrange(4294967294))
    return seed


def decode_latent_batch(model, batch, target_device=None, check_for_nans=False):  # type: ignore[no-untyped-def]
    samples = []
    for i in range(batch.shape[0]):
        sample = model.decode_first_stage(batch[i:i + 1].to(devices.dtype_vae))[0]
        if target_device is not None:
            sample = sample.to(target_device)
        samples.append(sample)
    return samples


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    image = image.convert("RGB").resize((width, height), Image.LANCZOS)
    arr = np.asarray(image).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    outpath_samples: str = None  # type: ignore[assignment]
    outpath_grids: str = None  # type: ignore[assignment]
    prompt: str = ""
    prompt_for_display: str = None  # type: ignore[assignment]
    negative_prompt: str = ""
    styles: list = None  # type: ignore[assignment]
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str = None  # type: ignore[assignment]
    scheduler: str = None  # type: ignore[assignment]
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = None  # type: ignore[assignment]
    tiling: bool = None  # type: ignore[assignment]
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = None  # type: ignore[assignment]
    overlay_images: list = None  # type: ignore[assignment]
    eta: float = None  # type: ignore[assignment]
    do_not_reload_embeddings: bool = False
    denoising_strength: float = None  # type: ignore[assignment]
    ddim_discretize: str = None  # type: ignore[assignment]
    s_min_uncond: float = None  # type: ignore[assignment]
    s_churn: float = None  # type: ignore[assignment]
    s_tmax: float = None  # type: ignore[assignment]
    s_tmin: float = None  # type: ignore[assignment]
    s_noise: float = None  # type: ignore[assignment]
    override_settings: dict = None  # type: ignore[assignment]
    override_settings_restore_afterwards: bool = True
    sampler_index: int = None  # type: ignore[assignment]
    refiner_checkpoint: str = None  # type: ignore[assignment]
    refiner_switch_at: float = None  # type: ignore[assignment]
    token_merging_ratio: float = 0
    token_merging_ratio_hr: float = 0
    disable_extra_networks: bool = False
    firstpass_image: Any = None
    comments: dict = None  # type: ignore[assignment]

    scripts_value: Any = field(default=None, init=False)
    script_args_value: Any = field(default=None, init=False)
    scripts_setup_complete: bool = field(default=False, init=False)
    cached_uc: list = field(default=None, init=False)  # type: ignore[assignment]
    cached_c: list = field(default=None, init=False)  # type: ignore[assignment]
    sampler: Any = field(default=None, init=False)
    is_using_inpainting_conditioning: bool = field(default=False, init=False)
    all_prompts: list = field(default=None, init=False)  # type: ignore[assignment]
    all_negative_prompts: list = field(default=None, init=False)  # type: ignore[assignment]
    all_seeds: list = field(default=None, init=False)  # type: ignore[assignment]
    all_subseeds: list = field(default=None, init=False)  # type: ignore[assignment]
    iteration: int = field(default=0, init=False)
    main_prompt: str = field(default=None, init=False)  # type: ignore[assignment]
    main_negative_prompt: str = field(default=None, init=False)  # type: ignore[assignment]
    prompts: list = field(default=None, init=False)  # type: ignore[assignment]
    negative_prompts: list = field(default=None, init=False)  # type: ignore[assignment]
    seeds: list = field(default=None, init=False)  # type: ignore[assignment]
    subseeds: list = field(default=None, init=False)  # type: ignore[assignment]
    extra_network_data: dict = field(default=None, init=False)  # type: ignore[assignment]
    user: str = field(default=None, init=False)  # type: ignore[assignment]
    sd_model_name: str = field(default=None, init=False)  # type: ignore[assignment]
    sd_model_hash: str = field(default=None, init=False)  # type: ignore[assignment]
    sd_vae_name: str = field(default=None, init=False)  # type: ignore[assignment]
    sd_vae_hash: str = field(default=None, init=False)  # type: ignore[assignment]
    is_api: bool = field(default=False, init=False)
    c: Any = field(default=None, init=False)
    uc: Any = field(default=None, init=False)
    rng: Any = field(default=None, init=False)
    step_multiplier: int = field(default=1, init=False)
    color_corrections: list = field(default=None, init=False)  # type: ignore[assignment]
    refiner_checkpoint_info: Any = field(default=None, init=False)
    job_timestamp: str = field(default="0", init=False)

    def __post_init__(self):  # type: ignore[no-untyped-def]
        if self.sampler_index is not None:
            print("sampler_index argument for StableDiffusionProcessing does not do anything; use sampler_name")
        self.comments = {}
        if self.styles is None:
            self.styles = []
        self.sampler_noise_scheduler_override = None
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = self.override_settings or {}
        self.script_args = self.script_args or {}  # type: ignore[has-type]
        self.refiner_checkpoint_info = None
        if not self.seed_enable_extras:
            self.subseed = -1
            self.subseed_strength = 0
            self.seed_resize_from_h = 0
            self.seed_resize_from_w = 0
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c
        self.override_settings = {k: v for k, v in self.override_settings.items()
                                  if k not in (shared.restricted_opts or set())}

    @property
    def sd_model(self):  # type: ignore[no-redef]  # noqa: F811
        return shared.sd_model

    @sd_model.setter
    def sd_model(self, value):  # type: ignore[no-untyped-def]
        pass

    @property
    def scripts(self):  # type: ignore[no-untyped-def]
        return self.scripts_value

    @scripts.setter
    def scripts(self, value):  # type: ignore[no-untyped-def]
        self.scripts_value = value
        if self.scripts_value and self.script_args_value and not self.scripts_setup_complete:
            self.setup_scripts()

    @property
    def script_args(self):  # type: ignore[no-untyped-def]
        return self.script_args_value

    @script_args.setter
    def script_args(self, value):  # type: ignore[no-untyped-def]
        self.script_args_value = value
        if self.scripts_value and self.script_args_value and not self.scripts_setup_complete:
            self.setup_scripts()

    def setup_scripts(self):  # type: ignore[no-untyped-def]
        self.scripts_setup_complete = True
        self.scripts.setup_scrips(self, is_ui=not self.is_api)

    def comment(self, text):  # type: ignore[no-untyped-def]
        self.comments[text] = 1

    def init(self, all_prompts, all_seeds, all_subseeds):  # type: ignore[no-untyped-def]
        pass

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def close(self):  # type: ignore[no-untyped-def]
        self.sampler = None
        self.c = None
        self.uc = None

    def get_token_merging_ratio(self, for_hr=False):  # type: ignore[no-untyped-def]
        return self.token_merging_ratio or opts.token_merging_ratio

    def setup_prompts(self):  # type: ignore[no-untyped-def]
        if isinstance(self.prompt, list):
            self.all_prompts = self.prompt
        elif isinstance(self.negative_prompt, list):
            self.all_prompts = [self.prompt] * len(self.negative_prompt)
        else:
            self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        if isinstance(self.negative_prompt, list):
            self.all_negative_prompts = self.negative_prompt
        else:
            self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)
        if len(self.all_prompts) != len(self.all_negative_prompts):
            raise RuntimeError(f"Received a different number of prompts ({len(self.all_prompts)}) and negative "
                               f"prompts ({len(self.all_negative_prompts)})")
        self.main_prompt = self.all_prompts[0]
        self.main_negative_prompt = self.all_negative_prompts[0]

    def get_conds(self):  # type: ignore[no-untyped-def]
        return self.c, self.uc

    def setup_conds(self):  # type: ignore[no-untyped-def]
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        negative_prompts = prompt_parser.SdConditioning(self.negative_prompts, width=self.width, height=self.height,
                                                        is_negative_prompt=True)
        sampler_config = sd_samplers.find_sampler_config(self.sampler_name)
        total_steps = sampler_config.total_steps(self.steps) if sampler_config else self.steps
        self.step_multiplier = total_steps // self.steps
        self.firstpass_steps = total_steps
        with devices.autocast():
            self.uc = self.sd_model.get_learned_conditioning(negative_prompts)
            self.c = self.sd_model.get_learned_conditioning(prompts)

    def parse_extra_network_prompts(self):  # type: ignore[no-untyped-def]
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)

    def fill_fields_from_opts(self):  # type: ignore[no-untyped-def]
        self.s_min_uncond = self.s_min_uncond if self.s_min_uncond is not None else opts.s_min_uncond
        self.s_churn = self.s_churn if self.s_churn is not None else 0.0
        self.s_tmin = self.s_tmin if self.s_tmin is not None else 0.0
        self.s_tmax = (self.s_tmax if self.s_tmax is not None else 0.0) or float("inf")
        self.s_noise = self.s_noise if self.s_noise is not None else 1.0


class Processed:
    def __init__(self, p: StableDiffusionProcessing, images_list, seed=-1, info="", subseed=None,  # type: ignore[no-untyped-def]
                 all_prompts=None, all_negative_prompts=None, all_seeds=None, all_subseeds=None,
                 index_of_first_image=0, infotexts=None, comments="", extra_images_list=None):
        self.images = images_list
        self.extra_images = extra_images_list or []
        self.prompt = p.prompt
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.subseed = subseed
        self.subseed_strength = p.subseed_strength
        self.info = info
        self.comments = "".join(f"{comment}\n" for comment in p.comments)
        self.width = p.width
        self.height = p.height
        self.sampler_name = p.sampler_name
        self.cfg_scale = p.cfg_scale
        self.image_cfg_scale = getattr(p, "image_cfg_scale", None)
        self.steps = p.steps
        self.batch_size = p.batch_size
        self.restore_faces = p.restore_faces
        self.face_restoration_model = opts.face_restoration_model if p.restore_faces else None
        self.sd_model_name = p.sd_model_name
        self.sd_model_hash = p.sd_model_hash
        self.sd_vae_name = p.sd_vae_name
        self.sd_vae_hash = p.sd_vae_hash
        self.seed_resize_from_w = p.seed_resize_from_w
        self.seed_resize_from_h = p.seed_resize_from_h
        self.denoising_strength = getattr(p, "denoising_strength", None)
        self.extra_generation_params = p.extra_generation_params
        self.index_of_first_image = index_of_first_image
        self.styles = p.styles
        self.job_timestamp = state.job_timestamp
        self.clip_skip = opts.CLIP_stop_at_last_layers
        self.token_merging_ratio = p.token_merging_ratio
        self.token_merging_ratio_hr = getattr(p, "token_merging_ratio_hr", 0)
        self.eta = p.eta
        self.is_using_inpainting_conditioning = p.is_using_inpainting_conditioning
        self.all_prompts = all_prompts or p.all_prompts or [self.prompt]
        self.all_negative_prompts = all_negative_prompts or p.all_negative_prompts or [self.negative_prompt]
        self.all_seeds = all_seeds or p.all_seeds or [self.seed]
        self.all_subseeds = all_subseeds or p.all_subseeds or [self.subseed]
        self.infotexts = infotexts or [info] * len(images_list)
        self.version = "v1.10.1"
        #: fake-only: final latents of every generated image, before decode (N, 4, h, w)
        self.latents: torch.Tensor | None = None

    def js(self):  # type: ignore[no-untyped-def]
        obj = {
            "prompt": self.all_prompts[0],
            "all_prompts": self.all_prompts,
            "negative_prompt": self.all_negative_prompts[0],
            "all_negative_prompts": self.all_negative_prompts,
            "seed": self.seed,
            "all_seeds": self.all_seeds,
            "subseed": self.subseed,
            "all_subseeds": self.all_subseeds,
            "subseed_strength": self.subseed_strength,
            "width": self.width,
            "height": self.height,
            "sampler_name": self.sampler_name,
            "cfg_scale": self.cfg_scale,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "restore_faces": self.restore_faces,
            "face_restoration_model": self.face_restoration_model,
            "sd_model_name": self.sd_model_name,
            "sd_model_hash": self.sd_model_hash,
            "sd_vae_name": self.sd_vae_name,
            "sd_vae_hash": self.sd_vae_hash,
            "seed_resize_from_w": self.seed_resize_from_w,
            "seed_resize_from_h": self.seed_resize_from_h,
            "denoising_strength": self.denoising_strength,
            "extra_generation_params": self.extra_generation_params,
            "index_of_first_image": self.index_of_first_image,
            "infotexts": self.infotexts,
            "styles": self.styles,
            "job_timestamp": self.job_timestamp,
            "clip_skip": self.clip_skip,
            "is_using_inpainting_conditioning": self.is_using_inpainting_conditioning,
            "version": self.version,
        }
        return json.dumps(obj, default=lambda o: None)

    def infotext(self, p: StableDiffusionProcessing, index):  # type: ignore[no-untyped-def]
        return create_infotext(p, self.all_prompts, self.all_seeds, self.all_subseeds, comments=[],
                               position_in_batch=index % self.batch_size, iteration=index // self.batch_size)


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,  # type: ignore[no-untyped-def]
                    use_main_prompt=False, index=None, all_negative_prompts=None):
    if index is None:
        index = position_in_batch + iteration * p.batch_size
    if all_negative_prompts is None:
        all_negative_prompts = p.all_negative_prompts
    generation_params = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "Schedule type": p.scheduler,
        "CFG scale": p.cfg_scale,
        "Seed": p.all_seeds[0] if use_main_prompt else all_seeds[index],
        "Size": f"{p.width}x{p.height}",
        "Model hash": p.sd_model_hash,
        "Model": p.sd_model_name,
        "Denoising strength": p.extra_generation_params.get("Denoising strength"),
        "Clip skip": None if opts.CLIP_stop_at_last_layers <= 1 else opts.CLIP_stop_at_last_layers,
        **p.extra_generation_params,
        "Version": "v1.10.1",
    }
    for key, value in list(generation_params.items()):
        try:
            if isinstance(value, list):
                generation_params[key] = value[index]
            elif callable(value):
                generation_params[key] = value(**locals())
        except Exception:  # noqa: BLE001
            errors.report(f'Error creating infotext for key "{key}"', exc_info=True)
            generation_params[key] = None
    generation_params_text = ", ".join([k if k == v else f"{k}: {v}" for k, v in generation_params.items()
                                        if v is not None])
    prompt_text = p.main_prompt if use_main_prompt else all_prompts[index]
    negative_prompt = p.main_negative_prompt if use_main_prompt else all_negative_prompts[index]
    negative_prompt_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt_text}{negative_prompt_text}\n{generation_params_text}".strip()


def process_images(p: StableDiffusionProcessing) -> Processed:
    if p.scripts is not None:
        p.scripts.before_process(p)

    stored_opts = {k: opts.data[k] if k in opts.data else opts.get_default(k) for k in p.override_settings
                   if k in opts.data}
    try:
        # if no checkpoint override or the override checkpoint can't be found, remove override entry and load opts
        # checkpoint (this is also where a refiner/hires model is swapped back to the main one)
        if sd_models.checkpoint_aliases.get(p.override_settings.get("sd_model_checkpoint")) is None:
            p.override_settings.pop("sd_model_checkpoint", None)
            sd_models.reload_model_weights()

        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)
            if k == "sd_model_checkpoint":
                sd_models.reload_model_weights()

        sd_models.apply_token_merging(p.sd_model, p.get_token_merging_ratio())
        sd_samplers.fix_p_invalid_sampler_and_scheduler(p)
        res = process_images_inner(p)
    finally:
        sd_models.apply_token_merging(p.sd_model, 0)
        if p.override_settings_restore_afterwards:
            for k, v in stored_opts.items():
                setattr(opts, k, v)
    return res


def process_images_inner(p: StableDiffusionProcessing) -> Processed:
    if isinstance(p.prompt, list):
        assert len(p.prompt) > 0
    else:
        assert p.prompt is not None

    devices.torch_gc()
    seed = get_fixed_seed(p.seed)
    subseed = get_fixed_seed(p.subseed)
    if p.restore_faces is None:
        p.restore_faces = opts.face_restoration
    if p.tiling is None:
        p.tiling = opts.tiling
    if p.refiner_checkpoint not in (None, "", "None", "none"):
        p.refiner_checkpoint_info = sd_models.get_closet_checkpoint_match(p.refiner_checkpoint)
        if p.refiner_checkpoint_info is None:
            raise Exception(f"Could not find checkpoint with name {p.refiner_checkpoint}")  # noqa: TRY002

    p.sd_model_name = shared.sd_model.sd_checkpoint_info.name_for_extra
    p.sd_model_hash = shared.sd_model.sd_model_hash
    p.sd_vae_name = None
    p.sd_vae_hash = None

    model_hijack.apply_circular(p.tiling)
    model_hijack.clear_comments()
    p.fill_fields_from_opts()
    p.setup_prompts()

    if isinstance(seed, list):
        p.all_seeds = seed
    else:
        p.all_seeds = [int(seed) + (x if p.subseed_strength == 0 else 0) for x in range(len(p.all_prompts))]
    if isinstance(subseed, list):
        p.all_subseeds = subseed
    else:
        p.all_subseeds = [int(subseed) + x for x in range(len(p.all_prompts))]

    if p.scripts is not None:
        p.scripts.process(p)

    infotexts = []
    output_images = []
    latents = []
    with torch.no_grad(), p.sd_model.ema_scope():
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

            sd_models.reload_model_weights()  # model can be changed for example by refiner

            p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
            p.subseeds = p.all_subseeds[n * p.batch_size:(n + 1) * p.batch_size]
            latent_channels = getattr(shared.sd_model, "latent_channels", opt_C)
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
                with devices.autocast():
                    extra_networks.activate(p, p.extra_network_data)

            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)

            p.setup_conds()
            p.extra_generation_params.update(model_hijack.extra_generation_params)
            for comment in model_hijack.comments:
                p.comment(comment)

            if p.n_iter > 1:
                shared.state.job = f"Batch {n + 1} out of {p.n_iter}"

            with devices.without_autocast() if devices.unet_needs_upcast else devices.autocast():
                samples_ddim = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds,
                                        subseeds=p.subseeds, subseed_strength=p.subseed_strength, prompts=p.prompts)

            if p.scripts is not None:
                ps = scripts.PostSampleArgs(samples_ddim)
                p.scripts.post_sample(p, ps)
                samples_ddim = ps.samples

            if getattr(samples_ddim, "already_decoded", False):
                x_samples_ddim = samples_ddim
                latents.append(samples_ddim.latents)
            else:
                latents.append(samples_ddim.detach().float().clone())
                x_samples_ddim = decode_latent_batch(p.sd_model, samples_ddim, target_device=devices.cpu)
            x_samples_ddim = torch.stack(x_samples_ddim).float()
            x_samples_ddim = torch.clamp((x_samples_ddim + 1.0) / 2.0, min=0.0, max=1.0)
            del samples_ddim

            if p.scripts is not None:
                p.scripts.postprocess_batch(p, x_samples_ddim, batch_number=n)

            for i, x_sample in enumerate(x_samples_ddim):
                p.batch_index = i
                x_sample = 255.0 * np.moveaxis(x_sample.cpu().numpy(), 0, 2)
                image = Image.fromarray(x_sample.astype(np.uint8))
                if p.scripts is not None:
                    pp = scripts.PostprocessImageArgs(image)
                    p.scripts.postprocess_image(p, pp)
                    image = pp.image
                text = create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, iteration=n,
                                       position_in_batch=i)
                infotexts.append(text)
                image.info["parameters"] = text
                output_images.append(image)

            del x_samples_ddim
            devices.torch_gc()
            state.nextjob()

        p.color_corrections = None
        index_of_first_image = 0

    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)

    devices.torch_gc()

    res = Processed(
        p,
        images_list=output_images,
        seed=p.all_seeds[0],
        info=infotexts[0] if infotexts else "",
        subseed=p.all_subseeds[0],
        index_of_first_image=index_of_first_image,
        infotexts=infotexts,
    )
    res.latents = torch.cat(latents) if latents else None

    if p.scripts is not None:
        p.scripts.postprocess(p, res)

    return res


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    denoising_strength: float = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str = None  # type: ignore[assignment]
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str = None  # type: ignore[assignment]
    hr_sampler_name: str = None  # type: ignore[assignment]
    hr_scheduler: str = None  # type: ignore[assignment]
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str = None  # type: ignore[assignment]

    hr_checkpoint_info: Any = field(default=None, init=False)
    hr_upscale_to_x: int = field(default=0, init=False)
    hr_upscale_to_y: int = field(default=0, init=False)
    truncate_x: int = field(default=0, init=False)
    truncate_y: int = field(default=0, init=False)
    applied_old_hires_behavior_to: tuple = field(default=None, init=False)  # type: ignore[assignment]
    latent_scale_mode: dict = field(default=None, init=False)  # type: ignore[assignment]
    hr_c: Any = field(default=None, init=False)
    hr_uc: Any = field(default=None, init=False)
    all_hr_prompts: list = field(default=None, init=False)  # type: ignore[assignment]
    all_hr_negative_prompts: list = field(default=None, init=False)  # type: ignore[assignment]
    hr_prompts: list = field(default=None, init=False)  # type: ignore[assignment]
    hr_negative_prompts: list = field(default=None, init=False)  # type: ignore[assignment]
    hr_extra_network_data: dict = field(default=None, init=False)  # type: ignore[assignment]
    is_hr_pass: bool = field(default=False, init=False)

    def __post_init__(self):  # type: ignore[no-untyped-def]
        super().__post_init__()
        if self.firstphase_width != 0 or self.firstphase_height != 0:
            self.hr_upscale_to_x = self.width
            self.hr_upscale_to_y = self.height
            self.width = self.firstphase_width
            self.height = self.firstphase_height

    def calculate_target_resolution(self):  # type: ignore[no-untyped-def]
        if opts.use_old_hires_fix_width_height and self.applied_old_hires_behavior_to != (self.width, self.height):
            self.hr_resize_x = self.width
            self.hr_resize_y = self.height
            self.hr_upscale_to_x = self.width
            self.hr_upscale_to_y = self.height
            self.applied_old_hires_behavior_to = (self.width, self.height)

        if self.hr_resize_x == 0 and self.hr_resize_y == 0:
            self.extra_generation_params["Hires upscale"] = self.hr_scale
            self.hr_upscale_to_x = int(self.width * self.hr_scale)
            self.hr_upscale_to_y = int(self.height * self.hr_scale)
        else:
            self.extra_generation_params["Hires resize"] = f"{self.hr_resize_x}x{self.hr_resize_y}"
            if self.hr_resize_y == 0:
                self.hr_upscale_to_x = self.hr_resize_x
                self.hr_upscale_to_y = self.hr_resize_x * self.height // self.width
            elif self.hr_resize_x == 0:
                self.hr_upscale_to_x = self.hr_resize_y * self.width // self.height
                self.hr_upscale_to_y = self.hr_resize_y
            else:
                target_w = self.hr_resize_x
                target_h = self.hr_resize_y
                src_ratio = self.width / self.height
                dst_ratio = self.hr_resize_x / self.hr_resize_y
                if src_ratio < dst_ratio:
                    self.hr_upscale_to_x = self.hr_resize_x
                    self.hr_upscale_to_y = self.hr_resize_x * self.height // self.width
                else:
                    self.hr_upscale_to_x = self.hr_resize_y * self.width // self.height
                    self.hr_upscale_to_y = self.hr_resize_y
                self.truncate_x = (self.hr_upscale_to_x - target_w) // opt_f
                self.truncate_y = (self.hr_upscale_to_y - target_h) // opt_f

    def init(self, all_prompts, all_seeds, all_subseeds):  # type: ignore[no-untyped-def]
        if self.enable_hr:
            self.extra_generation_params["Denoising strength"] = self.denoising_strength
            if self.hr_checkpoint_name and self.hr_checkpoint_name != "Use same checkpoint":
                self.hr_checkpoint_info = sd_models.get_closet_checkpoint_match(self.hr_checkpoint_name)
                if self.hr_checkpoint_info is None:
                    raise Exception(f"Could not find checkpoint with name {self.hr_checkpoint_name}")  # noqa: TRY002
                self.extra_generation_params["Hires checkpoint"] = self.hr_checkpoint_info.short_title
            if self.hr_sampler_name is not None and self.hr_sampler_name != self.sampler_name:
                self.extra_generation_params["Hires sampler"] = self.hr_sampler_name
            self.extra_generation_params["Hires prompt"] = lambda **_: None if self.hr_prompt == self.prompt \
                else self.hr_prompt
            self.extra_generation_params["Hires negative prompt"] = lambda **_: None \
                if self.hr_negative_prompt == self.negative_prompt else self.hr_negative_prompt

            self.latent_scale_mode = shared.latent_upscale_modes.get(self.hr_upscaler, None) \
                if self.hr_upscaler is not None \
                else shared.latent_upscale_modes.get(shared.latent_upscale_default_mode_name, "nearest")
            if self.enable_hr and self.latent_scale_mode is None:  # noqa: SIM102
                if not any(x.name == self.hr_upscaler for x in shared.sd_upscalers) and \
                        self.hr_upscaler not in ("None", "Lanczos", "Nearest"):
                    raise Exception(f"could not find upscaler named {self.hr_upscaler}")  # noqa: TRY002

            self.calculate_target_resolution()
            if not state.processing_has_refined_job_count:
                if state.job_count == -1:
                    state.job_count = self.n_iter
                state.job_count = state.job_count * 2
                state.processing_has_refined_job_count = True
            if self.hr_second_pass_steps:
                self.extra_generation_params["Hires steps"] = self.hr_second_pass_steps
            if self.hr_upscaler is not None:
                self.extra_generation_params["Hires upscaler"] = self.hr_upscaler

    def setup_prompts(self):  # type: ignore[no-untyped-def]
        super().setup_prompts()
        if not self.enable_hr:
            return
        if self.hr_prompt == "":
            self.hr_prompt = self.prompt
        if self.hr_negative_prompt == "":
            self.hr_negative_prompt = self.negative_prompt
        if isinstance(self.hr_prompt, list):
            self.all_hr_prompts = self.hr_prompt
        else:
            self.all_hr_prompts = self.batch_size * self.n_iter * [self.hr_prompt]
        if isinstance(self.hr_negative_prompt, list):
            self.all_hr_negative_prompts = self.hr_negative_prompt
        else:
            self.all_hr_negative_prompts = self.batch_size * self.n_iter * [self.hr_negative_prompt]

    def parse_extra_network_prompts(self):  # type: ignore[no-untyped-def]
        res = super().parse_extra_network_prompts()
        if self.enable_hr:
            self.hr_prompts = self.all_hr_prompts[self.iteration * self.batch_size:
                                                  (self.iteration + 1) * self.batch_size]
            self.hr_negative_prompts = self.all_hr_negative_prompts[self.iteration * self.batch_size:
                                                                    (self.iteration + 1) * self.batch_size]
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.hr_prompts)
        return res

    def calculate_hr_conds(self):  # type: ignore[no-untyped-def]
        prompts = prompt_parser.SdConditioning(self.hr_prompts, width=self.hr_upscale_to_x,
                                               height=self.hr_upscale_to_y)
        negative_prompts = prompt_parser.SdConditioning(self.hr_negative_prompts, width=self.hr_upscale_to_x,
                                                        height=self.hr_upscale_to_y, is_negative_prompt=True)
        self.hr_uc = self.sd_model.get_learned_conditioning(negative_prompts)
        self.hr_c = self.sd_model.get_learned_conditioning(prompts)

    def get_conds(self):  # type: ignore[no-untyped-def]
        if self.is_hr_pass:
            return self.hr_c, self.hr_uc
        return super().get_conds()

    def setup_conds(self):  # type: ignore[no-untyped-def]
        if self.is_hr_pass:
            # the refiner switched models during the hires pass: recompute the hires conds
            self.hr_c = None
            self.calculate_hr_conds()
            return
        super().setup_conds()
        self.hr_uc = None
        self.hr_c = None

    def txt2img_image_conditioning(self, x, width=None, height=None):  # type: ignore[no-untyped-def]
        self.is_using_inpainting_conditioning = self.sd_model.model.conditioning_key in {"hybrid", "concat"}
        return txt2img_image_conditioning(self.sd_model, x, width or self.width, height or self.height)

    def img2img_image_conditioning(self, source_image, latent_image):  # type: ignore[no-untyped-def]
        if self.sd_model.model.conditioning_key in {"hybrid", "concat"} or getattr(self.sd_model,
                                                                                   "is_sdxl_inpaint", False):
            return inpainting_image_conditioning(self, source_image, latent_image)
        return latent_image.new_zeros(latent_image.shape[0], 5, 1, 1)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):  # type: ignore[no-untyped-def]
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        x = self.rng.next()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning,
                                      image_conditioning=self.txt2img_image_conditioning(x))
        del x
        if not self.enable_hr:
            return samples
        devices.torch_gc()
        if self.latent_scale_mode is None:
            decoded_samples = torch.stack(decode_latent_batch(self.sd_model, samples, target_device=devices.cpu)
                                          ).to(dtype=torch.float32)
        else:
            decoded_samples = None
        with sd_models.SkipWritingToConfig():
            sd_models.reload_model_weights(info=self.hr_checkpoint_info)
        return self.sample_hr_pass(samples, decoded_samples, seeds, subseeds, subseed_strength, prompts)

    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):  # type: ignore[no-untyped-def]
        if shared.state.interrupted:
            return samples
        self.is_hr_pass = True
        target_width = self.hr_upscale_to_x
        target_height = self.hr_upscale_to_y
        if self.latent_scale_mode is not None:
            samples = F.interpolate(samples, size=(target_height // opt_f, target_width // opt_f),
                                    mode=self.latent_scale_mode["mode"],
                                    antialias=self.latent_scale_mode["antialias"])
            if getattr(self, "inpainting_mask_weight", opts.inpainting_mask_weight) < 1.0:
                image_conditioning = self.img2img_image_conditioning(self.sd_model.decode_first_stage(samples),
                                                                     samples)
            else:
                image_conditioning = self.txt2img_image_conditioning(samples)
        else:
            upscaled = F.interpolate(decoded_samples, size=(target_height, target_width), mode="bilinear")
            samples = self.sd_model.get_first_stage_encoding(self.sd_model.encode_first_stage(upscaled))
            image_conditioning = self.img2img_image_conditioning(upscaled, samples)

        shared.state.nextjob()
        img2img_sampler_name = self.hr_sampler_name or self.sampler_name
        self.sampler = sd_samplers.create_sampler(img2img_sampler_name, self.sd_model)
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
        sd_models.apply_token_merging(self.sd_model, self.get_token_merging_ratio(for_hr=True))

        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(p=self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)

        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                              steps=self.hr_second_pass_steps or self.steps,
                                              image_conditioning=image_conditioning)
        sd_models.apply_token_merging(self.sd_model, self.get_token_merging_ratio())
        self.sampler = None
        devices.torch_gc()
        self.is_hr_pass = False
        return samples


def inpainting_image_conditioning(p, source_image, latent_image, image_mask=None):  # type: ignore[no-untyped-def]
    p.is_using_inpainting_conditioning = True
    if image_mask is not None:
        conditioning_mask = image_mask.float()
    else:
        conditioning_mask = source_image.new_ones(1, 1, *source_image.shape[-2:])
    conditioning_mask = conditioning_mask.to(device=source_image.device, dtype=source_image.dtype)
    conditioning_image = torch.lerp(source_image, source_image * (1.0 - conditioning_mask),
                                    getattr(p, "inpainting_mask_weight", opts.inpainting_mask_weight))
    conditioning_image = p.sd_model.get_first_stage_encoding(p.sd_model.encode_first_stage(conditioning_image))
    conditioning_mask = F.interpolate(conditioning_mask, size=latent_image.shape[-2:])
    conditioning_mask = conditioning_mask.expand(conditioning_image.shape[0], -1, -1, -1)
    image_conditioning = torch.cat([conditioning_mask, conditioning_image], dim=1)
    return image_conditioning.to(shared.device)


@dataclass(repr=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    init_images: list = None  # type: ignore[assignment]
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float = None  # type: ignore[assignment]
    mask: Any = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int = None  # type: ignore[assignment]
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float = None  # type: ignore[assignment]
    latent_mask: Any = None
    force_task_id: str = None  # type: ignore[assignment]

    image_mask: Any = field(default=None, init=False)
    nmask: torch.Tensor = field(default=None, init=False)  # type: ignore[assignment]
    image_conditioning: torch.Tensor = field(default=None, init=False)  # type: ignore[assignment]
    init_img_hash: str = field(default=None, init=False)  # type: ignore[assignment]
    mask_for_overlay: Any = field(default=None, init=False)
    init_latent: torch.Tensor = field(default=None, init=False)  # type: ignore[assignment]

    def __post_init__(self):  # type: ignore[no-untyped-def]
        super().__post_init__()
        self.image_mask = self.mask
        self.mask = None
        self.initial_noise_multiplier = opts.initial_noise_multiplier if self.initial_noise_multiplier is None \
            else self.initial_noise_multiplier

    def init(self, all_prompts, all_seeds, all_subseeds):  # type: ignore[no-untyped-def]
        self.extra_generation_params["Denoising strength"] = self.denoising_strength
        self.image_cfg_scale = None
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        images = [image_to_tensor(img, self.width, self.height) for img in self.init_images]
        if len(images) == 1:
            batch_images = torch.stack(images * self.batch_size)
        elif len(images) <= self.batch_size:
            self.batch_size = len(images)
            batch_images = torch.stack(images)
        else:
            raise RuntimeError(f"bad number of images passed: {len(images)}; expecting {self.batch_size} or less")
        image = batch_images.to(shared.device, dtype=devices.dtype_vae)
        self.init_latent = self.sd_model.get_first_stage_encoding(self.sd_model.encode_first_stage(image)).float()

        latent_mask = None
        image_mask = None
        if self.image_mask is not None:
            m = self.image_mask.convert("L").resize((self.width, self.height))
            mt = torch.from_numpy(np.asarray(m).astype(np.float32) / 255.0)[None, None]
            if self.inpainting_mask_invert:
                mt = 1.0 - mt
            image_mask = torch.round(mt) if self.mask_round else mt
            latent_mask = F.interpolate(mt, size=self.init_latent.shape[-2:], mode="bilinear")
            if self.mask_round:
                latent_mask = torch.round(latent_mask)
            self.mask = (1.0 - latent_mask).to(self.init_latent)
            self.nmask = latent_mask.to(self.init_latent)
        self.image_conditioning = self.img2img_image_conditioning(image.float(), self.init_latent, image_mask)

    def img2img_image_conditioning(self, source_image, latent_image, image_mask=None):  # type: ignore[no-untyped-def]
        if self.sampler.conditioning_key in {"hybrid", "concat"} or getattr(self.sd_model, "is_sdxl_inpaint", False):
            return inpainting_image_conditioning(self, source_image, latent_image, image_mask)
        return latent_image.new_zeros(latent_image.shape[0], 5, 1, 1)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):  # type: ignore[no-untyped-def]
        x = self.rng.next()
        if self.initial_noise_multiplier != 1.0:
            self.extra_generation_params["Noise multiplier"] = self.initial_noise_multiplier
            x *= self.initial_noise_multiplier
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=self.init_latent, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        samples = self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning,
                                              image_conditioning=self.image_conditioning)
        if self.mask is not None:
            samples = samples * self.nmask + self.init_latent * self.mask
        del x
        devices.torch_gc()
        return samples

    def get_token_merging_ratio(self, for_hr=False):  # type: ignore[no-untyped-def]
        return self.token_merging_ratio or ("token_merging_ratio" in self.override_settings
                                            and opts.token_merging_ratio) or opts.token_merging_ratio_img2img \
            or opts.token_merging_ratio

