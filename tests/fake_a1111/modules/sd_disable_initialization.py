"""`modules/sd_disable_initialization.py`: `InitializeOnMeta`, the context A1111 creates a model in. For as long as
it is entered, torch is changed for the whole process (every thread): Linear, Conv2d and MultiheadAttention are
created on the meta device and `torch.nn.Module.to` does nothing and returns None. Code that creates or moves torch
modules in another thread during a model load (an engine build started right after startup) breaks on it.

The fake enters it around the wait at `fake_trace.load_gate` (see `sd_models.load_model`), so tests can hold a load
in that state; it builds its own model outside it."""

from __future__ import annotations

import torch


class ReplaceHelper:
    def __init__(self):  # type: ignore[no-untyped-def]
        self.replaced: list = []

    def replace(self, obj, field, func):  # type: ignore[no-untyped-def]
        original = getattr(obj, field, None)
        if original is None:
            return None
        self.replaced.append((obj, field, original))
        setattr(obj, field, func)
        return original

    def restore(self):  # type: ignore[no-untyped-def]
        for obj, field, original in self.replaced:
            setattr(obj, field, original)
        self.replaced.clear()


class InitializeOnMeta(ReplaceHelper):
    def __enter__(self):  # type: ignore[no-untyped-def]
        from modules import shared

        if shared.cmd_opts.disable_model_loading_ram_optimization:
            return

        def on_meta(kwargs):  # type: ignore[no-untyped-def]
            kwargs["device"] = "meta"
            return kwargs

        linear_init = self.replace(torch.nn.Linear, "__init__", lambda *a, **k: linear_init(*a, **on_meta(k)))
        conv2d_init = self.replace(torch.nn.Conv2d, "__init__", lambda *a, **k: conv2d_init(*a, **on_meta(k)))
        mha_init = self.replace(torch.nn.MultiheadAttention, "__init__", lambda *a, **k: mha_init(*a, **on_meta(k)))
        self.replace(torch.nn.Module, "to", lambda *a, **k: None)

    def __exit__(self, exc_type, exc_val, exc_tb):  # type: ignore[no-untyped-def]
        self.restore()
