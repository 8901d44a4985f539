"""Fake-only: the fake A1111's own helpers (`fake_clip`: deterministic text encoder, `fake_vae`: deterministic VAE)
reused by the fake Forge's model, loaded from tests/fake_a1111 under their own names (that folder is not on
sys.path in the fake Forge, so that A1111's `ldm`/`sgm`/... are not importable, as in Forge)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

FAKE_A1111 = Path(__file__).resolve().parent.parent / "fake_a1111"


def module(name: str) -> ModuleType:
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, FAKE_A1111 / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod
