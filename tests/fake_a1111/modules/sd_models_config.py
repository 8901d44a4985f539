"""Config lookup: the yaml beside the checkpoint (`<name>.yaml`), else a guess from the state dict that returns
one of A1111's bundled config paths (the fake only compares these paths; the files need not exist)."""

from __future__ import annotations

import os

from modules import paths

config_default = paths.sd_default_config
config_sd2 = os.path.join(paths.sd_configs_path, "v2-inference.yaml")
config_sd2v = os.path.join(paths.sd_configs_path, "v2-inference-v.yaml")
config_sd2_inpainting = os.path.join(paths.sd_configs_path, "v2-inpainting-inference.yaml")
config_sdxl = os.path.join(paths.sd_configs_path, "sd_xl_base.yaml")
config_sdxl_refiner = os.path.join(paths.sd_configs_path, "sd_xl_refiner.yaml")
config_sdxl_inpainting = os.path.join(paths.sd_configs_path, "sd_xl_inpaint.yaml")
config_inpainting = os.path.join(paths.sd_configs_path, "v1-inpainting-inference.yaml")


def guess_model_config_from_state_dict(sd, filename):  # type: ignore[no-untyped-def]
    in_ch = sd["model.diffusion_model.input_blocks.0.0.weight"].shape[1]
    adm = sd.get("model.diffusion_model.label_emb.0.0.weight")
    ctx = next(v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
    if adm is not None:
        if in_ch == 9:
            return config_sdxl_inpainting
        return config_sdxl_refiner if adm.shape[1] == 2560 else config_sdxl
    if ctx == 1024:
        return config_sd2_inpainting if in_ch == 9 else config_sd2
    return config_inpainting if in_ch == 9 else config_default


def find_checkpoint_config(state_dict, info):  # type: ignore[no-untyped-def]
    if info is None:
        return guess_model_config_from_state_dict(state_dict, "")
    config = find_checkpoint_config_near_filename(info)
    if config is not None:
        return config
    return guess_model_config_from_state_dict(state_dict, info.filename)


def find_checkpoint_config_near_filename(info):  # type: ignore[no-untyped-def]
    if info is None:
        return None
    config = f"{os.path.splitext(info.filename)[0]}.yaml"
    if os.path.exists(config):
        return config
    return None
