from __future__ import annotations

import os

import torch

from modules import shared
from modules.shared import cmd_opts


def initialize() -> None:
    """Create opts (loading config.json, which replaces `opts.data`), devices and state, like shared_init.py."""
    from modules import devices, options, shared_options, shared_state
    from modules.paths_internal import models_path

    os.makedirs(models_path, exist_ok=True)
    shared.options_templates = shared_options.options_templates
    shared.opts = options.Options(shared_options.options_templates, shared_options.restricted_opts)
    shared.restricted_opts = shared_options.restricted_opts
    try:
        shared.opts.load(shared.config_filename)
    except FileNotFoundError:
        pass

    # CPU only: every part is on the CPU whatever --use-cpu says (the calls to .to(devices.device) stay).
    devices.device = devices.device_interrogate = devices.device_gfpgan = devices.device_esrgan = \
        devices.device_codeformer = devices.cpu
    devices.dtype = torch.float32 if cmd_opts.no_half else torch.float16
    devices.dtype_vae = torch.float32 if cmd_opts.no_half or cmd_opts.no_half_vae else torch.float16
    devices.dtype_inference = torch.float32 if cmd_opts.precision == "full" else devices.dtype
    devices.dtype_unet = devices.dtype
    shared.device = devices.device
    shared.weight_load_location = None if cmd_opts.lowram else "cpu"
    shared.state = shared_state.State()
