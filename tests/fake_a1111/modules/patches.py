"""Class/module attribute patching with the originals kept per key, as `modules/patches.py`."""

from __future__ import annotations

from collections import defaultdict


def patch(key, obj, field, replacement):  # type: ignore[no-untyped-def]
    """Replace `obj.field` with `replacement`, remember the original under `key`; returns the original."""
    patch_key = (obj, field)
    if patch_key in originals[key]:
        raise RuntimeError(f"patch for {field} is already applied")
    original_func = getattr(obj, field)
    originals[key][patch_key] = original_func
    setattr(obj, field, replacement)
    return original_func


def undo(key, obj, field):  # type: ignore[no-untyped-def]
    patch_key = (obj, field)
    if patch_key not in originals[key]:
        raise RuntimeError(f"there is no patch for {field} to undo")
    original_func = originals[key].pop(patch_key)
    setattr(obj, field, original_func)


def original(key, obj, field):  # type: ignore[no-untyped-def]
    return originals[key].get((obj, field), None)


originals: defaultdict[str, dict] = defaultdict(dict)
