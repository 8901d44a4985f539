"""Install and data paths, as A1111's (Forge keeps the file): `--data-dir`/`--models-dir` are pre-parsed from
sys.argv at import. The install folder (`script_path`) is tests/fake_forge, so the built-in extensions are the fake
Forge's (`extensions-builtin/sd_forge_lora`), not A1111's."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

commandline_args = os.environ.get("COMMANDLINE_ARGS", "")
sys.argv += shlex.split(commandline_args)

modules_path = os.path.dirname(os.path.realpath(__file__))
script_path = os.path.dirname(modules_path)
sd_configs_path = os.path.join(script_path, "configs")
sd_default_config = os.path.join(sd_configs_path, "v1-inference.yaml")
sd_model_file = os.path.join(script_path, "model.ckpt")
default_sd_model_file = sd_model_file

_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--data-dir", type=str, default=os.path.dirname(modules_path))
_pre.add_argument("--models-dir", type=str, default=None)
cmd_opts_pre = _pre.parse_known_args()[0]

data_path = cmd_opts_pre.data_dir
models_path = cmd_opts_pre.models_dir if cmd_opts_pre.models_dir else os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
config_states_dir = os.path.join(script_path, "config_states")
default_output_dir = os.path.join(data_path, "outputs")
roboto_ttf_file = os.path.join(modules_path, "Roboto-Regular.ttf")
