"""Where the engine cache is when nobody said: the one place that decides it, for the CLI and the WebUI alike."""

from __future__ import annotations

import os
from pathlib import Path

from sdtrt.constants import CACHE_ENV

#: The cache's folder name inside A1111's models folder (beside Stable-diffusion/, Lora/, ...).
WEBUI_CACHE_NAME = "Unet-sdtrt"


def default_cache_dir(webui_models_dir: Path | None = None) -> Path:
    """$SDTRT_CACHE when set (a fleet points every replica and the build job at one shared folder). Otherwise the
    two defaults differ on purpose: inside a WebUI (`webui_models_dir` given) engines live in its models folder,
    where A1111 users keep and back up their models and every launch of that installation finds them; headless
    (the CLI, build jobs), where no WebUI folder exists, they go to the user's cache folder ($XDG_CACHE_HOME or
    ~/.cache)/sd-webui-trt/engines."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    if webui_models_dir is not None:
        return Path(webui_models_dir) / WEBUI_CACHE_NAME
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sd-webui-trt" / "engines"
