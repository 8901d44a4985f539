"""`backend/utils.py` helpers the patchers use: dotted attribute paths (`get_attr`, `set_attr_raw`, which plain
`setattr`s the last part, so a Module value replaces a child module; `get_attr_with_parent`), and file loading."""

from __future__ import annotations

import torch


def get_attr(obj, attr):  # type: ignore[no-untyped-def]
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr_raw(obj, attr, value):  # type: ignore[no-untyped-def]
    *parents, last = attr.split(".")
    for name in parents:
        obj = getattr(obj, name)
    setattr(obj, last, value)


def set_attr(obj, attr, value):  # type: ignore[no-untyped-def]
    set_attr_raw(obj, attr, torch.nn.Parameter(value, requires_grad=False))


def get_attr_with_parent(obj, attr):  # type: ignore[no-untyped-def]
    """(the object holding the last part, the last part's name, its value)."""
    parent, name = obj, None
    for name in attr.split("."):
        parent, obj = obj, getattr(obj, name)
    return parent, name, obj


def tensor2parameter(x):  # type: ignore[no-untyped-def]
    return x if isinstance(x, torch.nn.Parameter) else torch.nn.Parameter(x, requires_grad=False)


def load_torch_file(ckpt, safe_load=False, device=None):  # type: ignore[no-untyped-def]
    import safetensors.torch

    if not str(ckpt).lower().endswith(".safetensors"):
        raise RuntimeError(f"the fake Forge reads .safetensors files only: {ckpt}")
    return safetensors.torch.load_file(str(ckpt), device=str(device or "cpu"))
