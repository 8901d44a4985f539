"""What the fake needs of Forge's `modules_forge/main_entry.py`: the model-loading parameters the next
`sd_models.forge_model_reload()` loads (`refresh_model_loading_parameters`, which also asks processing for a global
unload), `checkpoint_change`/`modules_change` (return whether the option changed; save/refresh on request), and
`forge_main_entry` (run by `ui.create_ui()`; it ends by refreshing the loading parameters). The UI parts are not
modelled; the storage dtype is always the checkpoint's own ("Automatic")."""

from __future__ import annotations

import os

from modules import sd_models, shared

#: Forge's UNet storage choices: name -> (storage dtype, online LoRA in fp16); the fake has only "Automatic"
forge_unet_storage_dtype_options = {"Automatic": (None, False)}
#: additional modules (VAE / text encoder files) by file name: none in the fake
module_list: dict[str, str] = {}


def refresh_model_loading_parameters():  # type: ignore[no-untyped-def]
    from backend.args import dynamic_args
    from modules import processing

    checkpoint_info = sd_models.select_checkpoint()
    unet_storage_dtype, lora_fp16 = forge_unet_storage_dtype_options.get(shared.opts.forge_unet_storage_dtype,
                                                                         (None, False))
    dynamic_args["online_lora"] = lora_fp16
    sd_models.model_data.forge_loading_parameters = {
        "checkpoint_info": checkpoint_info,
        "additional_modules": shared.opts.forge_additional_modules,
        "unet_storage_dtype": unet_storage_dtype,
    }
    print(f"Model selected: {sd_models.model_data.forge_loading_parameters}")
    processing.need_global_unload = True


def checkpoint_change(ckpt_name, save=True, refresh=True):  # type: ignore[no-untyped-def]
    new = sd_models.get_closet_checkpoint_match(ckpt_name)
    current = sd_models.get_closet_checkpoint_match(shared.opts.data.get("sd_model_checkpoint", ""))
    if new == current:
        return False
    shared.opts.set("sd_model_checkpoint", ckpt_name)
    if save:
        shared.opts.save(shared.config_filename)
    if refresh:
        refresh_model_loading_parameters()
    return True


def modules_change(module_values, save=True, refresh=True):  # type: ignore[no-untyped-def]
    chosen = [module_list[os.path.basename(v)] for v in module_values if os.path.basename(v) in module_list]
    if sorted(chosen) == sorted(shared.opts.data.get("forge_additional_modules", [])):
        return False
    shared.opts.set("forge_additional_modules", chosen)
    if save:
        shared.opts.save(shared.config_filename)
    if refresh:
        refresh_model_loading_parameters()
    return True


def forge_main_entry():  # type: ignore[no-untyped-def]
    refresh_model_loading_parameters()
