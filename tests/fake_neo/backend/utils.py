"""Neo's `backend/utils.py` (N `:127-167`): the fake Forge's helpers (file loading, `get_attr`,
`get_attr_with_parent`, `tensor2parameter`) plus Neo's own:

- `set_attr_raw(obj, "a.b.c", value)` RETURNS THE PREVIOUS VALUE (`ATTR_UNSET` when there was none; setting
  `ATTR_UNSET` deletes the attribute) - the patcher keeps it as the object patch's backup;
- `set_attr(obj, key, tensor)` sets a `torch.nn.Parameter(tensor, requires_grad=False)`;
- `copy_to_param(obj, key, value)` copies into the existing parameter in place;
- `resolve_attr(obj, "a.b.c")` -> (the object holding "c", "c");
- `deepcopy_` (clone()'s copy of model_options: dicts and lists copied, everything else shared).

Fake-only: `F26_SET_ATTR = True` switches `set_attr_raw` to the February 2026 behaviour (F26 `utils.py:107-108`: the
value wrapped in a `Parameter`, nothing returned), to test the refusal of that Neo."""

from __future__ import annotations

import fake_neo_overlay as _overlay
import torch

_overlay.extend(globals(), "backend/utils.py")

ATTR_UNSET = object()
F26_SET_ATTR = False


def resolve_attr(obj, attr):  # type: ignore[no-untyped-def]
    *parents, name = attr.split(".")
    for part in parents:
        obj = getattr(obj, part)
    return obj, name


def set_attr_raw(obj, attr, value):  # type: ignore[no-untyped-def]
    obj, name = resolve_attr(obj, attr)
    if F26_SET_ATTR:
        setattr(obj, name, torch.nn.Parameter(value, requires_grad=False))
        return None
    prev = getattr(obj, name, ATTR_UNSET)
    if value is ATTR_UNSET:
        delattr(obj, name)
    else:
        setattr(obj, name, value)
    return prev


def set_attr(obj, attr, value):  # type: ignore[no-untyped-def]
    try:
        set_attr_raw(obj, attr, torch.nn.Parameter(value, requires_grad=False))
    except RuntimeError:
        set_attr_raw(obj, attr, torch.nn.Parameter(value.clone(), requires_grad=False))


def copy_to_param(obj, attr, value):  # type: ignore[no-untyped-def]
    obj, name = resolve_attr(obj, attr)
    getattr(obj, name).data.copy_(value)


def deepcopy_(obj, memo=None):  # type: ignore[no-untyped-def]
    """Dicts and lists copied deeply, anything else by reference (N `utils.py:349-365`)."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        res = {deepcopy_(k, memo): deepcopy_(v, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        res = [deepcopy_(v, memo) for v in obj]
    else:
        res = obj
    memo[id(obj)] = res
    return res
