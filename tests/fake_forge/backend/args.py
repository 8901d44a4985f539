"""`backend/args.py`: the backend's own command-line flags (`args`) and the values the WebUI side hands the backend at
run time (`dynamic_args`). The fake parses no flags: it always runs as Forge does with `--always-cpu`."""

from __future__ import annotations

import argparse

args = argparse.Namespace(always_cpu=True, disable_gpu_warning=True, pytorch_deterministic=False,
                          disable_ipex_hijack=True, directml=None)

dynamic_args: dict = {"embedding_dir": None, "emphasis_name": None, "forge_unet_storage_dtype": None,
                      "online_lora": False}
