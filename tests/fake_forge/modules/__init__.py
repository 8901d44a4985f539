"""Fake Forge (lllyasviel/stable-diffusion-webui-forge @ dfdcbab) `modules` package for CPU tests (see
tests/fake_forge/README.md).

Forge keeps most of A1111's `modules.*`; so does this fake: the package's search path is this folder first, then the
fake A1111's `modules/` (tests/fake_a1111/modules). A module here replaces A1111's where Forge differs (processing,
sd_models, sd_unet, sd_hijack, the samplers, ...); every other one is the fake A1111's file, imported as
`modules.<name>` as usual.

Fake-only: `a1111(name)` loads the fake A1111's `modules/<name>.py` as `modules.a1111_<name>`, for a Forge module
that keeps part of it (Forge's processing keeps A1111's processing classes, for example)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

A1111_MODULES = Path(__file__).resolve().parents[2] / "fake_a1111" / "modules"
__path__.append(str(A1111_MODULES))  # type: ignore[name-defined]


def a1111(name: str) -> ModuleType:
    """The fake A1111's `modules/<name>.py`, loaded once as `modules.a1111_<name>`."""
    alias = f"{__name__}.a1111_{name}"
    mod = sys.modules.get(alias)
    if mod is None:
        spec = importlib.util.spec_from_file_location(alias, A1111_MODULES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[alias] = mod  # before running it: dataclasses look their module up
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[alias]
            raise
    return mod
