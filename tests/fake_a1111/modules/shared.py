"""Module-level host state, filled by `shared_init.initialize()`. `sd_model` is a lazy property (see
`shared_items.Shared`, installed at the end of this module)."""

from __future__ import annotations

import sys

from modules import options, shared_cmd_options, util

cmd_opts = shared_cmd_options.cmd_opts
parser = shared_cmd_options.parser

batch_cond_uncond = True
parallel_processing_allowed = True
styles_filename = cmd_opts.styles_file
config_filename = cmd_opts.ui_settings_file
hide_dirs = {"visible": not cmd_opts.hide_ui_dir_config}

demo = None
device = None
weight_load_location = None
xformers_available = False
hypernetworks: dict = {}
loaded_hypernetworks: list = []
state = None
prompt_styles = None
interrogator = None
face_restorers: list = []
options_templates = None
opts = None
restricted_opts = None
settings_components = None
tab_names: list = []
latent_upscale_default_mode_name = "Latent"
latent_upscale_modes = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}
sd_upscalers: list = []
clip_model = None
progress_print_out = sys.stdout
gradio_theme = None
total_tqdm = None
mem_mon = None

options_section = options.options_section
OptionInfo = options.OptionInfo
OptionHTML = options.OptionHTML
natural_sort_key = util.natural_sort_key
listfiles = util.listfiles
walk_files = util.walk_files

from modules import shared_items

list_checkpoint_tiles = shared_items.list_checkpoint_tiles
refresh_checkpoints = shared_items.refresh_checkpoints
list_samplers = shared_items.list_samplers
reload_hypernetworks = shared_items.reload_hypernetworks
