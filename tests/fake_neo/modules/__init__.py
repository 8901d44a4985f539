"""Fake Forge Neo `modules` package for CPU tests (see tests/fake_neo/README.md).

Neo keeps most of Forge's (and A1111's) `modules.*`; so does this fake: the package's search path is this folder,
then the fake Forge's `modules/`, then the fake A1111's, the last two seen without `sd_hijack` and
`sd_models_config` (Neo has neither file: N @f95f632 `webui/modules/`). A module here replaces the fake Forge's where
Neo differs (`sd_unet` without `SdUnet`, `processing`'s hires pass, `initialize`, `cmd_args`, `paths_internal`,
`api.api`).

Fake-only: `a1111(name)` as the fake Forge's (the fake A1111's `modules/<name>.py` as `modules.a1111_<name>`, loaded
with private stand-ins for the two absent modules, see fake_neo_overlay.borrowing)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import fake_neo_overlay as _overlay

A1111_MODULES = _overlay.FAKE_A1111 / "modules"
__path__.append(_overlay.without_absent(_overlay.FAKE_FORGE / "modules"))  # type: ignore[name-defined]
__path__.append(_overlay.without_absent(A1111_MODULES))  # type: ignore[name-defined]


def a1111(name: str) -> ModuleType:
    alias = f"{__name__}.a1111_{name}"
    mod = sys.modules.get(alias)
    if mod is None:
        spec = importlib.util.spec_from_file_location(alias, A1111_MODULES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[alias] = mod
        try:
            with _overlay.borrowing():
                spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[alias]
            raise
    return mod
