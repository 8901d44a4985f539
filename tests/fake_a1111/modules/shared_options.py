"""Built-in settings (the subset extensions and the fake's processing read), declared like shared_options.py.

`sd_unet` is declared exactly: default "Automatic", a dropdown of `shared_items.sd_unet_items()`, refresh
`shared_items.refresh_unet_list`, NO onchange and NO infotext."""

from __future__ import annotations

from modules import shared_items
from modules.options import OptionInfo, categories, options_section
from modules.paths_internal import default_output_dir


class _Dropdown:
    """Placeholder component class: the fake never builds gradio components for settings."""


class _Slider(_Dropdown):
    pass


class _Checkbox(_Dropdown):
    pass


class _Textbox(_Dropdown):
    pass


restricted_opts = {
    "samples_filename_pattern", "directories_filename_pattern", "outdir_samples", "outdir_txt2img_samples",
    "outdir_img2img_samples", "outdir_extras_samples", "outdir_grids", "outdir_txt2img_grids", "outdir_save",
    "outdir_init_images", "temp_dir", "clean_temp_dir_at_start",
}

categories.register_category("saving", "Saving images")
categories.register_category("sd", "Stable Diffusion")
categories.register_category("ui", "User Interface")
categories.register_category("system", "System")
categories.register_category("postprocessing", "Postprocessing")
categories.register_category("training", "Training")

options_templates: dict[str, OptionInfo] = {}

options_templates.update(options_section(("saving-images", "Saving images/grids", "saving"), {
    "samples_save": OptionInfo(True, "Always save all generated images"),
    "samples_format": OptionInfo("png", "File format for images"),
    "grid_save": OptionInfo(True, "Always save all generated image grids"),
}))

options_templates.update(options_section(("saving-paths", "Paths for saving", "saving"), {
    "outdir_samples": OptionInfo("", "Output directory for images; if empty, defaults to three directories below"),
    "outdir_txt2img_samples": OptionInfo(f"{default_output_dir}/txt2img-images", "Output directory for txt2img"),
    "outdir_img2img_samples": OptionInfo(f"{default_output_dir}/img2img-images", "Output directory for img2img"),
    "outdir_grids": OptionInfo("", "Output directory for grids"),
    "outdir_txt2img_grids": OptionInfo(f"{default_output_dir}/txt2img-grids", "Output directory for txt2img grids"),
    "outdir_img2img_grids": OptionInfo(f"{default_output_dir}/img2img-grids", "Output directory for img2img grids"),
}))

options_templates.update(options_section(("system", "System", "system"), {
    "disable_mmap_load_safetensors": OptionInfo(False, "Disable memmapping for loading .safetensors files."),
    "hide_ldm_prints": OptionInfo(True, "Prevent Stability-AI's ldm/sgm modules from printing noise to console."),
    "dump_stacks_on_signal": OptionInfo(False, "Print stack traces before exiting the program with ctrl+c."),
}))

options_templates.update(options_section(("sd", "Stable Diffusion", "sd"), {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint", _Dropdown,
                                      lambda: {"choices": shared_items.list_checkpoint_tiles(True)},
                                      refresh=shared_items.refresh_checkpoints, infotext="Model hash"),
    "sd_checkpoints_limit": OptionInfo(1, "Maximum number of checkpoints loaded at the same time", _Slider,
                                       {"minimum": 1, "maximum": 10, "step": 1}),
    "sd_checkpoints_keep_in_cpu": OptionInfo(True, "Only keep one model on device"),
    "sd_checkpoint_cache": OptionInfo(0, "Checkpoints to cache in RAM", _Slider,
                                      {"minimum": 0, "maximum": 10, "step": 1}),
    "sd_unet": OptionInfo("Automatic", "SD Unet", _Dropdown, lambda: {"choices": shared_items.sd_unet_items()},
                          refresh=shared_items.refresh_unet_list).info(
                              "choose Unet model: Automatic = use one with same filename as checkpoint; "
                              "None = use Unet from checkpoint"),
    "enable_quantization": OptionInfo(False, "Enable quantization in K samplers for sharper and cleaner results. "
                                             "This may change existing seeds").needs_reload_ui(),
    "emphasis": OptionInfo("Original", "Emphasis mode"),
    "enable_batch_seeds": OptionInfo(True, "Make K-diffusion samplers produce same images in a batch as when "
                                           "making a single image"),
    "comma_padding_backtrack": OptionInfo(20, "Prompt word wrap length limit", _Slider,
                                          {"minimum": 0, "maximum": 74, "step": 1}),
    "sdxl_clip_l_skip": OptionInfo(False, "Clip skip SDXL"),
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip", _Slider, {"minimum": 1, "maximum": 12, "step": 1},
                                           infotext="Clip skip"),
    "upcast_attn": OptionInfo(False, "Upcast cross attention layer to float32"),
    "randn_source": OptionInfo("GPU", "Random number generator source.", infotext="RNG"),
    "tiling": OptionInfo(False, "Tiling", infotext="Tiling"),
    "hires_fix_refiner_pass": OptionInfo("second pass", "Hires fix: which pass to enable refiner for",
                                         infotext="Hires refiner"),
}))

options_templates.update(options_section(("sdxl", "Stable Diffusion XL", "sd"), {
    "sdxl_crop_top": OptionInfo(0, "crop top coordinate"),
    "sdxl_crop_left": OptionInfo(0, "crop left coordinate"),
    "sdxl_refiner_low_aesthetic_score": OptionInfo(2.5, "SDXL low aesthetic score", _Slider),
    "sdxl_refiner_high_aesthetic_score": OptionInfo(6.0, "SDXL high aesthetic score", _Slider),
}))

options_templates.update(options_section(("vae", "VAE", "sd"), {
    "sd_vae": OptionInfo("Automatic", "SD VAE", _Dropdown, infotext="VAE"),
    "sd_vae_encode_method": OptionInfo("Full", "VAE type for encode", infotext="VAE Encoder"),
    "sd_vae_decode_method": OptionInfo("Full", "VAE type for decode", infotext="VAE Decoder"),
}))

options_templates.update(options_section(("img2img", "img2img", "sd"), {
    "inpainting_mask_weight": OptionInfo(1.0, "Inpainting conditioning mask strength", _Slider,
                                         infotext="Conditional mask weight"),
    "initial_noise_multiplier": OptionInfo(1.0, "Noise multiplier for img2img", _Slider),
    "img2img_fix_steps": OptionInfo(False, "With img2img, do exactly the amount of steps the slider specifies."),
}))

options_templates.update(options_section(("optimizations", "Optimizations", "sd"), {
    "cross_attention_optimization": OptionInfo("Automatic", "Cross attention optimization", _Dropdown),
    "s_min_uncond": OptionInfo(0.0, "Negative Guidance minimum sigma", _Slider, infotext="NGMS"),
    "s_min_uncond_all": OptionInfo(False, "Negative Guidance minimum sigma all steps", infotext="NGMS all steps"),
    "token_merging_ratio": OptionInfo(0.0, "Token merging ratio", _Slider, infotext="Token merging ratio"),
    "token_merging_ratio_img2img": OptionInfo(0.0, "Token merging ratio for img2img", _Slider),
    "token_merging_ratio_hr": OptionInfo(0.0, "Token merging ratio for high-res pass", _Slider,
                                         infotext="Token merging ratio hr"),
    "pad_cond_uncond": OptionInfo(False, "Pad prompt/negative prompt", infotext="Pad conds"),
    "pad_cond_uncond_v0": OptionInfo(False, "Pad prompt/negative prompt (v0)", infotext="Pad conds v0"),
    "persistent_cond_cache": OptionInfo(True, "Persistent cond cache"),
    "batch_cond_uncond": OptionInfo(True, "Batch cond/uncond"),
    "fp8_storage": OptionInfo("Disable", "FP8 weight", _Dropdown),
    "cache_fp16_weight": OptionInfo(False, "Cache FP16 weight for LoRA"),
}))

options_templates.update(options_section(("compatibility", "Compatibility", "sd"), {
    "auto_backcompat": OptionInfo(True, "Automatic backward compatibility"),
    "use_old_emphasis_implementation": OptionInfo(False, "Use old emphasis implementation."),
    "use_old_hires_fix_width_height": OptionInfo(False, "For hires fix, use width/height sliders to set final "
                                                        "resolution rather than first pass"),
    "hires_fix_use_firstpass_conds": OptionInfo(False, "For hires fix, calculate conds of second pass using "
                                                       "extra networks of first pass."),
    "refiner_switch_by_sample_steps": OptionInfo(False, "Switch to refiner by sampling steps instead of "
                                                        "model timesteps.", infotext="Refiner switch by sampling steps"),
}))

options_templates.update(options_section(("extra_networks", "Extra Networks", "sd"), {
    "extra_networks_default_multiplier": OptionInfo(1.0, "Default multiplier for extra networks", _Slider),
    "sd_hypernetwork": OptionInfo("None", "Add hypernetwork to prompt", _Dropdown),
}))

options_templates.update(options_section(("ui", "User interface", "ui"), {
    "quicksettings_list": OptionInfo(["sd_model_checkpoint"], "Quicksettings list"),
    "ui_tab_order": OptionInfo([], "UI tab order"),
    "hidden_tabs": OptionInfo([], "Hidden UI tabs"),
    "ui_reorder_list": OptionInfo([], "UI item order for txt2img/img2img tabs"),
    "enable_reloading_ui_scripts": OptionInfo(False, "Reload UI scripts when using Reload UI option"),
}))

options_templates.update(options_section(("sampler-params", "Sampler parameters", "sd"), {
    "hide_samplers": OptionInfo([], "Hide samplers in user interface"),
    "eta_ddim": OptionInfo(0.0, "Eta for DDIM", infotext="Eta DDIM"),
    "eta_ancestral": OptionInfo(1.0, "Eta for k-diffusion samplers", infotext="Eta"),
    "always_discard_next_to_last_sigma": OptionInfo(False, "Always discard next-to-last sigma",
                                                    infotext="Discard penultimate sigma"),
    "eta_noise_seed_delta": OptionInfo(0, "Eta noise seed delta", infotext="ENSD"),
}))

options_templates.update(options_section((None, "Hidden options"), {
    "disabled_extensions": OptionInfo([], "Disable these extensions"),
    "disable_all_extensions": OptionInfo("none", "Disable all extensions (preserves the list of disabled "
                                                 "extensions)"),
    "restore_config_state_file": OptionInfo("", "Config state file to restore from"),
    "sd_checkpoint_hash": OptionInfo("", "SHA256 hash of the current checkpoint"),
}))

options_templates.update(options_section(("face-restoration", "Face restoration", "postprocessing"), {
    "face_restoration": OptionInfo(False, "Restore faces", infotext="Face restoration"),
    "face_restoration_model": OptionInfo("CodeFormer", "Face restoration model"),
}))
