"""Host adapters: the only code that knows a WebUI host's own modules (a1111.py: AUTOMATIC1111 1.10; forge.py:
lllyasviel's Forge). `running_host()` tells which one this process runs in, by what the host's modules provide
(never by a version string)."""

from __future__ import annotations

import importlib.util

A1111 = "a1111"
FORGE = "forge"


def running_host() -> str:
    """FORGE when Forge's own packages are importable (its patcher backend and `modules_forge`), else A1111."""
    try:
        forge = all(importlib.util.find_spec(name) is not None for name in ("modules_forge", "backend.patcher.unet"))
    except (ImportError, ValueError):  # a `backend` package of something else without a patcher
        forge = False
    return FORGE if forge else A1111
