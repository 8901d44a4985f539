"""Stand-in of Forge's sd_forge_lora `networks.py`. `load_networks(names, te_multipliers, unet_multipliers, ...)`
builds the target list `[[filename, unet strength, te strength, online_mode]]`; when its string equals
`sd_model.current_lora_hash` nothing happens (the LoRA patchers of the previous generation stay in
`forge_objects_after_applying_lora`); else, starting from `forge_objects_original`'s unet and clip,
`load_lora_for_models` for each file (keys matched against the KModel's `state_dict()`; more than 12 unmatched keys:
"[LORA] LoRA version mismatch" and the file is skipped; the patcher is a clone with `add_patches`, kept only when at
most 12 of its keys were skipped), then `forge_objects_after_applying_lora = forge_objects.shallow_copy()`."""

from __future__ import annotations

import functools
import os

import network
import torch
from backend.args import dynamic_args
from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
from backend.utils import load_torch_file
from modules import errors, sd_models, shared


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default",  # type: ignore[no-untyped-def]
                         online_mode=False):
    flag = type(model.model).__name__ if model is not None else "default"
    unet_keys = model_lora_keys_unet(model.model) if model is not None else {}
    clip_keys = model_lora_keys_clip(clip.cond_stage_model) if clip is not None else {}
    lora_unet, unmatched = load_lora(lora, unet_keys)
    lora_clip, unmatched = load_lora(unmatched, clip_keys)
    if len(unmatched) > 12:
        print(f"[LORA] LoRA version mismatch for {flag}: {filename}")
        return model, clip
    new_model = model.clone() if model is not None else None
    new_clip = clip.clone() if clip is not None else None
    if new_model is not None and lora_unet:
        loaded = new_model.add_patches(filename=filename, patches=lora_unet, strength_patch=strength_model,
                                       online_mode=online_mode)
        skipped = [k for k in lora_unet if k not in loaded]
        if len(skipped) > 12:
            print(f"[LORA] Mismatch {filename} for {flag}-UNet with {len(skipped)} keys mismatched in "
                  f"{len(loaded)} keys")
        else:
            model = new_model
    if new_clip is not None and lora_clip:
        loaded = new_clip.add_patches(filename=filename, patches=lora_clip, strength_patch=strength_clip,
                                      online_mode=online_mode)
        if len([k for k in lora_clip if k not in loaded]) <= 12:
            clip = new_clip
    return model, clip


@functools.lru_cache(maxsize=5)
def load_lora_state_dict(filename):  # type: ignore[no-untyped-def]
    return load_torch_file(filename, safe_load=True)


def load_network(name, network_on_disk):  # type: ignore[no-untyped-def]
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    return net


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):  # type: ignore[no-untyped-def]
    current_sd = sd_models.model_data.get_sd_model()
    if current_sd is None:
        return
    loaded_networks.clear()
    if any(available_network_aliases.get(name) is None for name in names):
        list_available_networks()
    on_disk = [available_network_aliases.get(name) for name in names]
    for disk, name in zip(on_disk, names):
        if disk is None:
            continue
        try:
            net = load_network(name, disk)
        except Exception as e:  # noqa: BLE001
            errors.display(e, f"loading network {disk.filename}")
            continue
        net.mentioned_name = name
        disk.read_hash()
        loaded_networks.append(net)

    online_mode = dynamic_args.get("online_lora", False)
    if current_sd.forge_objects.unet.model.storage_dtype in (torch.float32, torch.float16, torch.bfloat16):
        online_mode = False
    targets = [[a.filename, b, c, online_mode]
               for a, b, c in zip(on_disk, unet_multipliers, te_multipliers) if a is not None]
    targets_hash = str(targets)
    if current_sd.current_lora_hash == targets_hash:
        return
    current_sd.current_lora_hash = targets_hash
    current_sd.forge_objects.unet = current_sd.forge_objects_original.unet
    current_sd.forge_objects.clip = current_sd.forge_objects_original.clip
    for filename, strength_model, strength_clip, online in targets:
        current_sd.forge_objects.unet, current_sd.forge_objects.clip = load_lora_for_models(
            current_sd.forge_objects.unet, current_sd.forge_objects.clip, load_lora_state_dict(filename),
            strength_model, strength_clip, filename=filename, online_mode=online)
    current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()


def list_available_networks():  # type: ignore[no-untyped-def]
    available_networks.clear()
    available_network_aliases.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for filename in shared.walk_files(shared.cmd_opts.lora_dir, allowed_extensions=[".pt", ".ckpt", ".safetensors"]):
        if os.path.isdir(filename):
            continue
        name = os.path.splitext(os.path.basename(filename))[0]
        entry = network.NetworkOnDisk(name, filename)
        available_networks[name] = entry
        available_network_aliases[name] = entry
        available_network_aliases[entry.alias] = entry


extra_network_lora = None
available_networks: dict = {}
available_network_aliases: dict = {}
loaded_networks: list = []

list_available_networks()
