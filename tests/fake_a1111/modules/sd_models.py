"""Checkpoints and the loaded model, with the semantics of A1111 v1.10.1 `modules/sd_models.py`:
`CheckpointInfo` naming rules (model_name!), registries, `select_checkpoint`, `get_closet_checkpoint_match`,
`load_model` (fires `model_loaded_callback`, never `apply_unet`) and `reload_model_weights` (early return when
unchanged; `apply_unet("None")`; a different config goes through `load_model` WITHOUT re-applying the unet; the
same config loads weights in place, hijacks, fires `model_loaded_callback`, then `apply_unet()`).

The fake model is built from the checkpoint with sdtrt's detection (tiny A1111-format checkpoints with their yaml)."""

from __future__ import annotations

import collections
import enum
import hashlib
import json
import os
import re
import threading
from pathlib import Path

import fake_trace
import torch

from modules import (
    devices,
    errors,
    hashes,
    lowvram,
    paths,
    script_callbacks,
    sd_disable_initialization,
    sd_hijack,
    sd_models_config,
    sd_models_xl,
    sd_unet,
    shared,
)
from modules.timer import Timer

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list: dict[str, CheckpointInfo] = {}
checkpoint_aliases: dict[str, CheckpointInfo] = {}
checkpoint_alisases = checkpoint_aliases  # for compatibility with old name
checkpoints_loaded: collections.OrderedDict = collections.OrderedDict()


class ModelType(enum.Enum):
    SD1 = 1
    SD2 = 2
    SDXL = 3
    SSD = 4
    SD3 = 5


def replace_key(d, key, new_key, value):  # type: ignore[no-untyped-def]
    keys = list(d.keys())
    d[new_key] = value
    if key not in keys:
        return d
    index = keys.index(key)
    keys[index] = new_key
    new_d = {k: d[k] for k in keys}
    d.clear()
    d.update(new_d)
    return d


class CheckpointInfo:
    def __init__(self, filename):  # type: ignore[no-untyped-def]
        self.filename = filename
        abspath = os.path.abspath(filename)
        abs_ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if abs_ckpt_dir and abspath.startswith(abs_ckpt_dir):
            name = abspath.replace(abs_ckpt_dir, "")
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, "")
        else:
            name = os.path.basename(filename)
        if name.startswith(("\\", "/")):
            name = name[1:]

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
        for id in self.ids:
            checkpoint_aliases[id] = self

    def calculate_shorthash(self):  # type: ignore[no-untyped-def]
        self.sha256 = hashes.sha256(self.filename, f"checkpoint/{self.name}")
        if self.sha256 is None:
            return None
        shorthash = self.sha256[0:10]
        if self.shorthash == self.sha256[0:10]:
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

    def __repr__(self):  # type: ignore[no-untyped-def]
        return f"CheckpointInfo({self.title!r})"


def setup_model():  # type: ignore[no-untyped-def]
    os.makedirs(model_path, exist_ok=True)


def checkpoint_tiles(use_short=False):  # type: ignore[no-untyped-def]
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def list_models():  # type: ignore[no-untyped-def]
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    cmd_ckpt = shared.cmd_opts.ckpt
    exts = {".ckpt", ".safetensors"}
    model_list = []
    for d in (model_path, shared.cmd_opts.ckpt_dir):
        if d and os.path.isdir(d):
            model_list += [f for f in shared.walk_files(d, allowed_extensions=exts)
                           if not f.endswith((".vae.ckpt", ".vae.safetensors"))]
    seen = set()
    model_list = [f for f in model_list if not (os.path.abspath(f) in seen or seen.add(os.path.abspath(f)))]

    if os.path.exists(cmd_ckpt):
        checkpoint_info = CheckpointInfo(cmd_ckpt)
        checkpoint_info.register()
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    elif cmd_ckpt is not None and cmd_ckpt != paths.sd_model_file:
        print(f"Checkpoint in --ckpt argument not found (Possible it was moved to {model_path}: {cmd_ckpt}")

    for filename in model_list:
        checkpoint_info = CheckpointInfo(filename)
        checkpoint_info.register()


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string):  # type: ignore[no-untyped-def]
    if not search_string:
        return None
    checkpoint_info = checkpoint_aliases.get(search_string, None)
    if checkpoint_info is not None:
        return checkpoint_info
    found = sorted([info for info in checkpoints_list.values() if search_string in info.title],
                   key=lambda x: len(x.title))
    if found:
        return found[0]
    search_string_without_checksum = re.sub(re_strip_checksum, "", search_string)
    found = sorted([info for info in checkpoints_list.values() if search_string_without_checksum in info.title],
                   key=lambda x: len(x.title))
    if found:
        return found[0]
    return None


def model_hash(filename):  # type: ignore[no-untyped-def]
    """old hash that only looks at a small part of the file and is prone to collisions"""
    try:
        with open(filename, "rb") as file:
            m = hashlib.sha256()
            file.seek(0x100000)
            m.update(file.read(0x10000))
            return m.hexdigest()[0:8]
    except FileNotFoundError:
        return "NOFILE"


def select_checkpoint():  # type: ignore[no-untyped-def]
    """Raises `FileNotFoundError` if no checkpoints are found."""
    model_checkpoint = shared.opts.sd_model_checkpoint
    checkpoint_info = checkpoint_aliases.get(model_checkpoint, None)
    if checkpoint_info is not None:
        return checkpoint_info
    if len(checkpoints_list) == 0:
        raise FileNotFoundError("No checkpoints found.")
    checkpoint_info = next(iter(checkpoints_list.values()))
    if model_checkpoint is not None:
        print(f"Checkpoint {model_checkpoint} not found; loading fallback {checkpoint_info.title}")
    return checkpoint_info


def read_metadata_from_safetensors(filename):  # type: ignore[no-untyped-def]
    with open(filename, mode="rb") as file:
        metadata_len = int.from_bytes(file.read(8), "little")
        json_start = file.read(2)
        assert metadata_len > 2 and json_start in (b'{"', b"{'"), f"{filename} is not a safetensors file"
        res = {}
        json_data = json_start + file.read(metadata_len - 2)
        json_obj = json.loads(json_data)
        for k, v in json_obj.get("__metadata__", {}).items():
            res[k] = v
            if isinstance(v, str) and v[0:1] == "{":
                try:
                    res[k] = json.loads(v)
                except Exception:  # noqa: BLE001, S110
                    pass
        return res


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):  # type: ignore[no-untyped-def]
    _, extension = os.path.splitext(checkpoint_file)
    if extension.lower() != ".safetensors":
        raise RuntimeError(f"the fake host only reads .safetensors checkpoints: {checkpoint_file}")
    import safetensors.torch

    return safetensors.torch.load_file(checkpoint_file, device=map_location or shared.weight_load_location or "cpu")


def get_checkpoint_state_dict(checkpoint_info, timer):  # type: ignore[no-untyped-def]
    sd_model_hash = checkpoint_info.calculate_shorthash()
    timer.record("calculate hash")
    if checkpoint_info in checkpoints_loaded:
        print(f"Loading weights [{sd_model_hash}] from cache")
        checkpoints_loaded.move_to_end(checkpoint_info)
        return checkpoints_loaded[checkpoint_info]
    print(f"Loading weights [{sd_model_hash}] from {checkpoint_info.filename}")
    res = read_state_dict(checkpoint_info.filename)
    timer.record("load weights from disk")
    return res


class SkipWritingToConfig:
    """Context manager: loading a model inside it does not write `opts.sd_model_checkpoint`."""

    skip = False
    previous = None

    def __enter__(self):  # type: ignore[no-untyped-def]
        self.previous = SkipWritingToConfig.skip
        SkipWritingToConfig.skip = True
        return self

    def __exit__(self, exc_type, exc_value, exc_traceback):  # type: ignore[no-untyped-def]
        SkipWritingToConfig.skip = self.previous


def set_model_type(model, state_dict):  # type: ignore[no-untyped-def]
    model.is_sd1 = False
    model.is_sd2 = False
    model.is_sdxl = False
    model.is_ssd = False
    model.is_sd3 = False
    if "model.diffusion_model.x_embedder.proj.weight" in state_dict:
        model.is_sd3 = True
        model.model_type = ModelType.SD3
    elif hasattr(model, "conditioner"):
        model.is_sdxl = True
        if "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight" not in state_dict:
            model.is_ssd = True
            model.model_type = ModelType.SSD
        else:
            model.model_type = ModelType.SDXL
    elif hasattr(model.cond_stage_model, "model"):
        model.is_sd2 = True
        model.model_type = ModelType.SD2
    else:
        model.is_sd1 = True
        model.model_type = ModelType.SD1


def set_model_fields(model):  # type: ignore[no-untyped-def]
    if not hasattr(model, "latent_channels"):
        model.latent_channels = 4


def load_model_weights(model, checkpoint_info: CheckpointInfo, state_dict, timer):  # type: ignore[no-untyped-def]
    sd_model_hash = checkpoint_info.calculate_shorthash()
    timer.record("calculate hash")
    if not SkipWritingToConfig.skip:
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    if state_dict is None:
        state_dict = get_checkpoint_state_dict(checkpoint_info, timer)
    set_model_type(model, state_dict)
    set_model_fields(model)
    if model.is_sdxl:
        sd_models_xl.extend_sdxl(model)
    if model.is_ssd:
        sd_hijack.model_hijack.convert_sdxl_to_ssd(model)

    if shared.opts.sd_checkpoint_cache > 0:
        checkpoints_loaded[checkpoint_info] = state_dict.copy()
    model.load_state_dict(state_dict, strict=False)
    timer.record("apply weights to model")
    del state_dict

    if shared.cmd_opts.no_half:
        model.float()
        devices.dtype_unet = torch.float32
    else:
        model.half()
        devices.dtype_unet = torch.float16
    devices.unet_needs_upcast = shared.cmd_opts.upcast_sampling and devices.dtype == torch.float16 and \
        devices.dtype_unet == torch.float16
    model.is_sdxl_inpaint = model.is_sdxl and model.model.diffusion_model.in_channels == 9

    while len(checkpoints_loaded) > shared.opts.sd_checkpoint_cache:
        checkpoints_loaded.popitem(last=False)

    model.sd_model_hash = sd_model_hash
    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_checkpoint_info = checkpoint_info
    shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256
    model.logvar = None


def instantiate_from_config(state_dict, checkpoint_config):  # type: ignore[no-untyped-def]
    """The fake's `instantiate_from_config`: detects the UNet with sdtrt (yaml hints when the config file exists)
    and builds the matching LatentDiffusion (SD1/SD2) or DiffusionEngine (SDXL) with the ldm/sgm stand-ins."""
    from ldm.models.diffusion.ddpm import LatentDiffusion
    from ldm.modules.diffusionmodules import openaimodel as ldm_openaimodel
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
    from sgm.models.diffusion import DiffusionEngine
    from sgm.modules.diffusionmodules import openaimodel as sgm_openaimodel

    from sdtrt.pipeline.families import ConfigHints, detect, read_config

    prefix = "model.diffusion_model."
    unet_sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    hints = read_config(Path(checkpoint_config)) if checkpoint_config and os.path.isfile(checkpoint_config) \
        else ConfigHints()
    info = detect(unet_sd, hints)
    spec = info.spec
    if spec.adm_in_channels is not None:
        unet = sgm_openaimodel.UNetModel(spec)
        model = DiffusionEngine(unet, refiner=spec.adm_in_channels == 2560, parameterization=info.parameterization)
    else:
        unet = ldm_openaimodel.UNetModel(spec)
        cond_stage = FrozenOpenCLIPEmbedder(spec.context_dim) if spec.context_dim == 1024 \
            else FrozenCLIPEmbedder(spec.context_dim)
        model = LatentDiffusion(unet, cond_stage, conditioning_key="hybrid" if info.inpaint else "crossattn",
                                parameterization=info.parameterization)
    unet.eval().requires_grad_(False)
    return model.eval().requires_grad_(False)


class SdModelData:
    def __init__(self):  # type: ignore[no-untyped-def]
        self.sd_model = None
        self.loaded_sd_models: list = []
        self.was_loaded_at_least_once = False
        self.lock = threading.Lock()

    def get_sd_model(self):  # type: ignore[no-untyped-def]
        if self.was_loaded_at_least_once:
            return self.sd_model
        if self.sd_model is None:
            with self.lock:
                if self.sd_model is not None or self.was_loaded_at_least_once:
                    return self.sd_model
                try:
                    load_model()
                except Exception as e:  # noqa: BLE001
                    errors.display(e, "loading stable diffusion model", full_traceback=True)
                    print("Stable diffusion model failed to load")
                    self.sd_model = None
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):  # type: ignore[no-untyped-def]
        self.sd_model = v
        try:
            self.loaded_sd_models.remove(v)
        except ValueError:
            pass
        if v is not None:
            self.loaded_sd_models.insert(0, v)


model_data = SdModelData()


def get_empty_cond(sd_model):  # type: ignore[no-untyped-def]
    from modules import extra_networks, processing

    p = processing.StableDiffusionProcessingTxt2Img()
    extra_networks.activate(p, {})
    d = sd_model.get_learned_conditioning([""])
    if isinstance(d, dict):
        d = d["crossattn"]
    return d


def send_model_to_cpu(m):  # type: ignore[no-untyped-def]
    if m is not None:
        if m.lowvram:
            lowvram.send_everything_to_cpu()
        else:
            m.to(devices.cpu)
    devices.torch_gc()


def model_target_device(m):  # type: ignore[no-untyped-def]
    if lowvram.is_needed(m):
        return devices.cpu
    return devices.device


def send_model_to_device(m):  # type: ignore[no-untyped-def]
    lowvram.apply(m)
    if not m.lowvram:
        m.to(shared.device)


def send_model_to_trash(m):  # type: ignore[no-untyped-def]
    m.to(device="meta")
    devices.torch_gc()


def load_model(checkpoint_info=None, already_loaded_state_dict=None):  # type: ignore[no-untyped-def]
    checkpoint_info = checkpoint_info or select_checkpoint()
    timer = Timer()
    if model_data.sd_model:
        send_model_to_trash(model_data.sd_model)
        model_data.sd_model = None
        devices.torch_gc()
    timer.record("unload existing model")

    if already_loaded_state_dict is not None:
        state_dict = already_loaded_state_dict
    else:
        state_dict = get_checkpoint_state_dict(checkpoint_info, timer)

    checkpoint_config = sd_models_config.find_checkpoint_config(state_dict, checkpoint_info)
    print(f"Creating model from config: {checkpoint_config}")
    # A1111 creates the model with torch patched for the whole process (InitializeOnMeta). The fake holds that
    # state for as long as a test keeps `fake_trace.load_gate` closed, and builds its own model after it.
    with sd_disable_initialization.InitializeOnMeta():
        fake_trace.wait_at_load_gate()
    sd_model = instantiate_from_config(state_dict, checkpoint_config)
    sd_model.used_config = checkpoint_config
    timer.record("create model")

    load_model_weights(sd_model, checkpoint_info, state_dict, timer)
    timer.record("load weights")

    if lowvram.is_needed(sd_model):
        lowvram.setup_for_low_vram(sd_model, not shared.cmd_opts.lowvram)
    else:
        sd_model.lowvram = False
        sd_model.to(shared.device)
    timer.record("move model to device")

    sd_hijack.model_hijack.hijack(sd_model)
    timer.record("hijack")
    sd_model.eval()
    model_data.set_sd_model(sd_model)
    model_data.was_loaded_at_least_once = True
    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    timer.record("load textual inversion embeddings")

    script_callbacks.model_loaded_callback(sd_model)
    timer.record("scripts callbacks")

    with devices.autocast(), torch.no_grad():
        sd_model.cond_stage_model_empty_prompt = get_empty_cond(sd_model)
    timer.record("calculate empty prompt")
    print(f"Model loaded in {timer.summary()}.")
    return sd_model


def reuse_model_from_already_loaded(sd_model, checkpoint_info, timer):  # type: ignore[no-untyped-def]
    if sd_model is not None and sd_model.sd_checkpoint_info.filename == checkpoint_info.filename:
        return sd_model
    if shared.opts.sd_checkpoints_keep_in_cpu:
        send_model_to_cpu(sd_model)
        timer.record("send model to cpu")
    already_loaded = None
    for i in reversed(range(len(model_data.loaded_sd_models))):
        loaded_model = model_data.loaded_sd_models[i]
        if loaded_model.sd_checkpoint_info.filename == checkpoint_info.filename:
            already_loaded = loaded_model
            continue
        if len(model_data.loaded_sd_models) > shared.opts.sd_checkpoints_limit > 0:
            print(f"Unloading model {len(model_data.loaded_sd_models)} over the limit of "
                  f"{shared.opts.sd_checkpoints_limit}: {loaded_model.sd_checkpoint_info.title}")
            del model_data.loaded_sd_models[i]
            send_model_to_trash(loaded_model)
            timer.record("send model to trash")
    if already_loaded is not None:
        send_model_to_device(already_loaded)
        timer.record("send model to device")
        model_data.set_sd_model(already_loaded, already_loaded=True)
        if not SkipWritingToConfig.skip:
            shared.opts.data["sd_model_checkpoint"] = already_loaded.sd_checkpoint_info.title
            shared.opts.data["sd_checkpoint_hash"] = already_loaded.sd_checkpoint_info.sha256
        print(f"Using already loaded model {already_loaded.sd_checkpoint_info.title}: done in {timer.summary()}")
        return model_data.sd_model
    elif shared.opts.sd_checkpoints_limit > 1 and len(model_data.loaded_sd_models) < shared.opts.sd_checkpoints_limit:
        print(f"Loading model {checkpoint_info.title} ({len(model_data.loaded_sd_models) + 1} out of "
              f"{shared.opts.sd_checkpoints_limit})")
        model_data.sd_model = None
        load_model(checkpoint_info)
        return model_data.sd_model
    elif len(model_data.loaded_sd_models) > 0:
        sd_model = model_data.loaded_sd_models.pop()
        model_data.sd_model = sd_model
        print(f"Reusing loaded model {sd_model.sd_checkpoint_info.title} to load {checkpoint_info.title}")
        return sd_model
    return None


def reload_model_weights(sd_model=None, info=None, forced_reload=False):  # type: ignore[no-untyped-def]
    checkpoint_info = info or select_checkpoint()
    timer = Timer()
    if not sd_model:
        sd_model = model_data.sd_model
    if sd_model is None:  # previous model load failed
        current_checkpoint_info = None
    else:
        current_checkpoint_info = sd_model.sd_checkpoint_info
        if sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
            return sd_model

    sd_model = reuse_model_from_already_loaded(sd_model, checkpoint_info, timer)
    if not forced_reload and sd_model is not None and sd_model.sd_checkpoint_info.filename == checkpoint_info.filename:
        return sd_model

    if sd_model is not None:
        sd_unet.apply_unet("None")
        send_model_to_cpu(sd_model)
        sd_hijack.model_hijack.undo_hijack(sd_model)

    state_dict = get_checkpoint_state_dict(checkpoint_info, timer)
    checkpoint_config = sd_models_config.find_checkpoint_config(state_dict, checkpoint_info)
    timer.record("find config")

    if sd_model is None or checkpoint_config != sd_model.used_config:
        if sd_model is not None:
            send_model_to_trash(sd_model)
        load_model(checkpoint_info, already_loaded_state_dict=state_dict)
        return model_data.sd_model

    try:
        load_model_weights(sd_model, checkpoint_info, state_dict, timer)
    except Exception:
        print("Failed to load checkpoint, restoring previous")
        load_model_weights(sd_model, current_checkpoint_info, None, timer)
        raise
    finally:
        sd_hijack.model_hijack.hijack(sd_model)
        timer.record("hijack")
        if not sd_model.lowvram:
            sd_model.to(devices.device)
            timer.record("move model to device")
        script_callbacks.model_loaded_callback(sd_model)
        timer.record("script callbacks")

    print(f"Weights loaded in {timer.summary()}.")
    model_data.set_sd_model(sd_model)
    sd_unet.apply_unet()
    return sd_model


def unload_model_weights(sd_model=None, info=None):  # type: ignore[no-untyped-def]
    send_model_to_cpu(sd_model or shared.sd_model)
    return sd_model


def apply_token_merging(sd_model, token_merging_ratio):  # type: ignore[no-untyped-def]
    if sd_model is not None:
        sd_model.applied_token_merged_ratio = token_merging_ratio
