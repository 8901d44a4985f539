from __future__ import annotations

import importlib.util
import json
import os

from modules import errors


def load_module(path: str):  # type: ignore[no-untyped-def]
    """Import a file as a module named after its basename, without putting it in sys.modules (A1111's rule)."""
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def enabled_extension_dirs() -> list[str]:
    """Names of `extensions/` dirs not disabled in config.json (launch_utils.list_extensions)."""
    from modules.paths_internal import data_path, extensions_dir

    settings: dict = {}
    try:
        with open(os.path.join(data_path, "config.json"), encoding="utf8") as f:
            settings = json.load(f)
    except Exception:  # noqa: BLE001, S110
        pass
    if settings.get("disable_all_extensions", "none") != "none" or not os.path.isdir(extensions_dir):
        return []
    disabled = set(settings.get("disabled_extensions", []))
    return [x for x in sorted(os.listdir(extensions_dir)) if x not in disabled]


def preload_extensions(extensions_dir: str, parser, extension_list=None) -> None:  # type: ignore[no-untyped-def]
    if not os.path.isdir(extensions_dir):
        return
    names = extension_list if extension_list is not None else sorted(os.listdir(extensions_dir))
    for dirname in names:
        preload_script = os.path.join(extensions_dir, dirname, "preload.py")
        if not os.path.isfile(preload_script):
            continue
        try:
            module = load_module(preload_script)
            if hasattr(module, "preload"):
                module.preload(parser)
        except Exception:  # noqa: BLE001
            errors.report(f"Error running preload() for {preload_script}", exc_info=True)
