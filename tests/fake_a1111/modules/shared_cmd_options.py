"""Parses the command line once, after running every extension's `preload.py` (enabled extensions and all
built-in ones), like A1111. `IGNORE_CMD_ARGS_ERRORS` switches to `parse_known_args`."""

from __future__ import annotations

import os

from modules import cmd_args, script_loading
from modules.paths_internal import extensions_builtin_dir, extensions_dir

parser = cmd_args.parser
script_loading.preload_extensions(extensions_dir, parser, extension_list=script_loading.enabled_extension_dirs())
script_loading.preload_extensions(extensions_builtin_dir, parser)

if os.environ.get("IGNORE_CMD_ARGS_ERRORS", None) is None:
    cmd_opts = parser.parse_args()
else:
    cmd_opts, _ = parser.parse_known_args()

cmd_opts.webui_is_non_local = any([cmd_opts.share, cmd_opts.listen, cmd_opts.ngrok, cmd_opts.server_name])
cmd_opts.disable_extension_access = cmd_opts.webui_is_non_local and not cmd_opts.enable_insecure_extension_access
