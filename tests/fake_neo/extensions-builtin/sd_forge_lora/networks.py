"""Stand-in of Neo's sd_forge_lora `networks.py` (N @f95f632 `extensions-builtin/sd_forge_lora/networks.py`):

- `load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename, online_mode)` (:39-86): keys from
  `model_lora_keys_unet(model.model)` (the KModel's `state_dict()`), `load_lora` for the UNet then the text
  encoder; when more than HALF of the file's keys match nothing: "[LORA] LoRA mismatch", model and clip returned
  unchanged (:58-60); else a clone with `add_patches(filename=, patches=, strength_patch=, online_mode=)`, kept only
  when at most a QUARTER of its keys were skipped ("[LORA] Mismatch ..." otherwise, :69-70);
- `load_networks(names, te_multipliers, unet_multipliers)` (:94-151): `loaded_networks` refreshed; the target list
  `[[filename, unet strength, te strength, online_mode]]`; when its string equals `sd_model.current_lora_hash`
  NOTHING happens (:134-135: the LoRA patchers of the previous generation stay in
  `forge_objects_after_applying_lora`); else the hash is stored FIRST (:137), `forge_objects.unet`/`.clip` reset to
  `forge_objects_original`'s (:138-139), `load_lora_for_models` for each file in order, and
  `forge_objects_after_applying_lora = forge_objects.shallow_copy()` (:151). So a LoRA dropped as a mismatch stays
  dropped until the LoRA set changes.
Not modelled: nunchaku, Anima's key moves, the `lora_unet__` prefix fix, forbidden aliases, the extra LoRA dirs."""

from __future__ import annotations

import functools
import os

import network
from backend.args import dynamic_args
from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
from backend.utils import load_torch_file
from modules import errors, sd_models, shared

load_lora_state_dict = functools.partial(load_torch_file, safe_load=True)


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default",  # type: ignore[no-untyped-def]
                         online_mode=False):
    model_flag = type(model.model).__name__ if model is not None else "default"
    unet_keys = model_lora_keys_unet(model.model, {}) if model is not None else {}
    clip_keys = model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
    lora_unet, unmatched = load_lora(lora, unet_keys)
    lora_clip, unmatched = load_lora(unmatched, clip_keys)
    if len(unmatched) / len(lora) > 0.5:
        print(f"[LORA] LoRA mismatch for {model_flag}: {filename}")
        return model, clip
    if model is not None and len(lora_unet) > 0:
        new_model = model.clone()
        loaded = new_model.add_patches(filename=filename, patches=lora_unet, strength_patch=strength_model,
                                       online_mode=online_mode)
        skipped = [k for k in lora_unet if k not in loaded]
        if len(skipped) / len(lora_unet) > 0.25:
            print(f"[LORA] Mismatch {filename} for {model_flag}-UNet with {len(skipped)} keys mismatched in "
                  f"{len(loaded)} keys")
        else:
            model = new_model
    if clip is not None and len(lora_clip) > 0:
        new_clip = clip.clone()
        loaded = new_clip.add_patches(filename=filename, patches=lora_clip, strength_patch=strength_clip,
                                      online_mode=online_mode)
        if len([k for k in lora_clip if k not in loaded]) / len(lora_clip) <= 0.25:
            clip = new_clip
    return model, clip


def load_network(name, network_on_disk):  # type: ignore[no-untyped-def]
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    return net


def load_networks(names, te_multipliers=None, unet_multipliers=None):  # type: ignore[no-untyped-def]
    current_sd = sd_models.model_data.get_sd_model()
    if current_sd is None:
        return
    loaded_networks.clear()
    if any(available_network_aliases.get(name) is None for name in names):
        list_available_networks()
    on_disk = [available_network_aliases.get(name) for name in names]
    for disk, name in zip(on_disk, names):
        try:
            net = load_network(name, disk)
            net.mentioned_name = name
            disk.read_hash()
            loaded_networks.append(net)
        except Exception as e:  # noqa: BLE001
            errors.display(e, f'Failed to load LoRA: "{name}"')
    online_mode = dynamic_args.online_lora or False
    targets = [[n.filename, u, t, online_mode] for n, u, t in zip(on_disk, unet_multipliers, te_multipliers)
               if n is not None]
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
