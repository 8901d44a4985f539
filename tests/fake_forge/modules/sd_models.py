"""Forge's `modules/sd_models.py` (dfdcbab), as far as the fake needs it:

- A1111's checkpoint list is kept: `CheckpointInfo` (same naming rules: name, name_for_extra, model_name, title with
  the short sha256, aliases), `checkpoints_list`, `checkpoint_aliases`, `list_models`, `select_checkpoint`,
  `get_closet_checkpoint_match`, `SkipWritingToConfig`;
- the loaded model is `model_data.sd_model`: a `FakeInitialModel` (no `forge_objects`) until the first generation
  loads one; `SdModelData` has no lock; nothing loads at startup;
- `forge_model_reload()` loads when `model_data.forge_loading_parameters` (set by
  `modules_forge.main_entry.refresh_model_loading_parameters`) differ from what was loaded: unloads everything,
  `backend.loader.forge_loader(file)`, sets `sd_checkpoint_info`/`filename`/`sd_model_hash`, `set_sd_model`, then
  `model_loaded_callback`; returns (model, just_reloaded). A1111's loading functions (`load_model`,
  `reload_model_weights`, `send_model_to_*`) are no-ops here, as in Forge; `apply_token_merging` patches only for
  a ratio > 0 (not modelled)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re

import torch

from modules import devices, errors, hashes, paths, script_callbacks, shared
from modules.timer import Timer

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list: dict = {}
checkpoint_aliases: dict = {}
checkpoint_alisases = checkpoint_aliases  # for compatibility with old name
checkpoints_loaded: dict = {}


def replace_key(d, key, new_key, value):  # type: ignore[no-untyped-def]
    keys = list(d.keys())
    d[new_key] = value
    if key not in keys:
        return d
    keys[keys.index(key)] = new_key
    reordered = {k: d[k] for k in keys}
    d.clear()
    d.update(reordered)
    return d


class CheckpointInfo:
    def __init__(self, filename):  # type: ignore[no-untyped-def]
        self.filename = filename
        abspath = os.path.abspath(filename)
        ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if ckpt_dir and abspath.startswith(ckpt_dir):
            name = abspath.replace(ckpt_dir, "")
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, "")
        else:
            name = os.path.basename(filename)
        name = name.lstrip("\\/")
        self.metadata = {}
        if self.is_safetensors:
            try:
                self.metadata = read_metadata_from_safetensors(filename)
            except Exception as e:  # noqa: BLE001
                errors.display(e, f"reading metadata for {filename}")
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = hashes.sha256_from_cache(self.filename, f"checkpoint/{name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f"{name} [{self.shorthash}]"
        self.short_title = self.name_for_extra if self.shorthash is None else f"{self.name_for_extra} [{self.shorthash}]"
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f"{name} [{self.hash}]"]
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                         f"{self.name_for_extra} [{self.shorthash}]"]

    def register(self):  # type: ignore[no-untyped-def]
        checkpoints_list[self.title] = self
        for id_ in self.ids:
            checkpoint_aliases[id_] = self

    def calculate_shorthash(self):  # type: ignore[no-untyped-def]
        self.sha256 = hashes.sha256(self.filename, f"checkpoint/{self.name}")
        if self.sha256 is None:
            return None
        shorthash = self.sha256[0:10]
        if self.shorthash == shorthash:
            return self.shorthash
        self.shorthash = shorthash
        if self.shorthash not in self.ids:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                         f"{self.name_for_extra} [{self.shorthash}]"]
        old_title = self.title
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        replace_key(checkpoints_list, old_title, self.title, self)
        self.register()
        return self.shorthash

    def __str__(self):  # type: ignore[no-untyped-def]
        return str({"filename": self.filename, "hash": self.hash})  # stable: the loading parameters' key

    __repr__ = __str__


def setup_model():  # type: ignore[no-untyped-def]
    os.makedirs(model_path, exist_ok=True)


def checkpoint_tiles(use_short=False):  # type: ignore[no-untyped-def]
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def list_models():  # type: ignore[no-untyped-def]
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    exts = {".ckpt", ".safetensors"}
    found: list = []
    for d in (model_path, shared.cmd_opts.ckpt_dir):
        if d and os.path.isdir(d):
            found += [f for f in shared.walk_files(d, allowed_extensions=exts)
                      if not f.endswith((".vae.ckpt", ".vae.safetensors"))]
    cmd_ckpt = shared.cmd_opts.ckpt
    if cmd_ckpt and os.path.exists(cmd_ckpt):
        info = CheckpointInfo(cmd_ckpt)
        info.register()
        shared.opts.data["sd_model_checkpoint"] = info.title
    seen: set = set()
    for filename in found:
        if os.path.abspath(filename) not in seen:
            seen.add(os.path.abspath(filename))
            CheckpointInfo(filename).register()


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string):  # type: ignore[no-untyped-def]
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string, None)
    if info is not None:
        return info
    for needle in (search_string, re.sub(re_strip_checksum, "", search_string)):
        found = sorted([i for i in checkpoints_list.values() if needle in i.title], key=lambda x: len(x.title))
        if found:
            return found[0]
    return None


def model_hash(filename):  # type: ignore[no-untyped-def]
    try:
        with open(filename, "rb") as file:
            m = hashlib.sha256()
            file.seek(0x100000)
            m.update(file.read(0x10000))
            return m.hexdigest()[0:8]
    except FileNotFoundError:
        return "NOFILE"


def select_checkpoint():  # type: ignore[no-untyped-def]
    info = checkpoint_aliases.get(shared.opts.sd_model_checkpoint, None)
    if info is not None:
        return info
    if not checkpoints_list:
        return None  # Forge: the reload then says "You do not have any model!"
    return next(iter(checkpoints_list.values()))


def read_metadata_from_safetensors(filename):  # type: ignore[no-untyped-def]
    with open(filename, mode="rb") as file:
        metadata_len = int.from_bytes(file.read(8), "little")
        json_start = file.read(2)
        assert metadata_len > 2 and json_start in (b'{"', b"{'"), f"{filename} is not a safetensors file"
        json_obj = json.loads(json_start + file.read(metadata_len - 2))
        res = {}
        for k, v in json_obj.get("__metadata__", {}).items():
            res[k] = v
            if isinstance(v, str) and v[0:1] == "{":
                try:
                    res[k] = json.loads(v)
                except Exception:  # noqa: BLE001, S110
                    pass
        return res


class SkipWritingToConfig:
    skip = False
    previous = None

    def __enter__(self):  # type: ignore[no-untyped-def]
        self.previous = SkipWritingToConfig.skip
        SkipWritingToConfig.skip = True
        return self

    def __exit__(self, exc_type, exc_value, exc_traceback):  # type: ignore[no-untyped-def]
        SkipWritingToConfig.skip = self.previous


class FakeInitialModel:
    """What `shared.sd_model` is before Forge loaded a model (no `forge_objects`)."""

    def __init__(self):  # type: ignore[no-untyped-def]
        self.cond_stage_model = None
        self.chunk_length = 75

    def get_prompt_lengths_on_ui(self, prompt):  # type: ignore[no-untyped-def]
        words = [w for w in re.split(r"[ ,.!]+", prompt.strip("!,. ")) if w]
        r = len(words)
        return r, math.ceil(max(r, 1) / self.chunk_length) * self.chunk_length


class SdModelData:
    def __init__(self):  # type: ignore[no-untyped-def]
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters: dict = {}
        self.forge_hash = ""

    def get_sd_model(self):  # type: ignore[no-untyped-def]
        return self.sd_model

    def set_sd_model(self, v):  # type: ignore[no-untyped-def]
        self.sd_model = v


model_data = SdModelData()


def get_empty_cond(sd_model):  # type: ignore[no-untyped-def]
    pass


def send_model_to_cpu(m):  # type: ignore[no-untyped-def]
    pass


def model_target_device(m):  # type: ignore[no-untyped-def]
    return devices.device


def send_model_to_device(m):  # type: ignore[no-untyped-def]
    pass


def send_model_to_trash(m):  # type: ignore[no-untyped-def]
    pass


def load_model(checkpoint_info=None, already_loaded_state_dict=None):  # type: ignore[no-untyped-def]
    pass


def reuse_model_from_already_loaded(sd_model, checkpoint_info, timer):  # type: ignore[no-untyped-def]
    pass


def reload_model_weights(sd_model=None, info=None, forced_reload=False):  # type: ignore[no-untyped-def]
    pass


def unload_model_weights(sd_model=None, info=None):  # type: ignore[no-untyped-def]
    from backend import memory_management

    memory_management.unload_all_models()


def apply_token_merging(sd_model, token_merging_ratio):  # type: ignore[no-untyped-def]
    if token_merging_ratio <= 0:
        return
    raise NotImplementedError("the fake Forge has no token merging (TomePatcher)")


def apply_alpha_schedule_override(sd_model, p=None):  # type: ignore[no-untyped-def]
    pass


@torch.inference_mode()
def forge_model_reload():  # type: ignore[no-untyped-def]
    from backend import memory_management
    from backend.loader import forge_loader

    current_hash = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current_hash:
        return model_data.sd_model, False
    print("Loading Model: " + current_hash)
    timer = Timer()
    if model_data.sd_model:
        model_data.sd_model = None
        memory_management.unload_all_models()
        memory_management.soft_empty_cache()
    checkpoint_info = model_data.forge_loading_parameters["checkpoint_info"]
    if checkpoint_info is None:
        raise ValueError("You do not have any model! Please download at least one model in [models/Stable-diffusion].")
    sd_model = forge_loader(checkpoint_info.filename,
                            additional_state_dicts=model_data.forge_loading_parameters.get("additional_modules", []))
    sd_model.extra_generation_params = {}
    sd_model.comments = []
    sd_model.sd_checkpoint_info = checkpoint_info
    sd_model.filename = checkpoint_info.filename
    sd_model.sd_model_hash = checkpoint_info.calculate_shorthash()
    shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256
    model_data.set_sd_model(sd_model)
    script_callbacks.model_loaded_callback(sd_model)
    timer.record("scripts callbacks")
    model_data.forge_hash = current_hash
    return sd_model, True
