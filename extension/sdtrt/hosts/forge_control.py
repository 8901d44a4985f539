"""Forge's built-in ControlNet and T2I-Adapter on the engine: what Forge's sampling puts in a UNet call's `control`
turned into the residuals an engine with ControlNet inputs takes (`ControlFeeds`).

Forge (dfdcbab; `backend/patcher/controlnet.py` ControlBase.control_merge, `backend/nn/unet.py` apply_control and
forward) hands the UNet a dict of three lists, each consumed from its end with `list.pop()`:
- 'input': one entry is taken after every input block and added to its output, which becomes both the skip kept
  for the decoder and the hidden state going down (T2I-Adapter features; None where an adapter has none);
- 'middle': one entry is added after the middle block (a ControlNet's last residual, an SDXL adapter's last
  feature);
- 'output': one entry is added to each skip as the decoder takes it, the decoder taking the skips last-first
  (a ControlNet's per-block residuals).
Units are already summed, weighted and scaled by strength in the lists. The engine (`models/control.py`) adds
`control_i` to skip i and `adapter_j` to the hidden state after the j-th injection point of its architecture, so
skip i gets Forge's input entry plus its output entry, and an input entry after a block that is no injection
point cannot be served."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sdtrt.models import ControlFeeds, ControlledUNet, NotServable
from sdtrt.webui.controlnet import NO_CONTROL_ENGINE

#: what Forge's sampling passes beside `control`: the ControlNet object that made it (KModel.apply_model hands
#: every extra condition to the UNet; Forge's UNet ignores it)
CONTROL_MODEL = "control_model"


def _from_end(entries: Sequence[Any], k: int) -> Any:
    """The entry the (k+1)-th `pop()` of a list takes (None once the list is empty)."""
    return entries[len(entries) - 1 - k] if k < len(entries) else None


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def control_feeds(control: Mapping[str, Sequence[torch.Tensor | None]], n_skips: int,
                  adapter_points: Sequence[int]) -> ControlFeeds:
    """The engine's ControlNet inputs for Forge's `control` dict, for a UNet with `n_skips` skips (its input blocks
    plus the one after the middle block) and T2I-Adapter inputs after the input blocks `adapter_points`.
    NotServable when an entry has no engine input to go to. Reads the lists without changing them."""
    if not isinstance(control, Mapping):
        raise NotServable(f"Forge's ControlNet sent a {type(control).__name__}, not its dict of residual lists")
    unknown = sorted(str(k) for k, v in control.items() if k not in ("input", "middle", "output") and v)
    if unknown:
        raise NotServable(f"Forge's ControlNet sent residuals for {', '.join(unknown)}, which the engine has no "
                          "inputs for")
    inputs = list(control.get("input") or ())
    outputs = list(control.get("output") or ())
    middle = list(control.get("middle") or ())
    blocks = n_skips - 1
    features = [_from_end(inputs, i) for i in range(blocks)]
    stray = [i for i, f in enumerate(features) if f is not None and i not in adapter_points]
    if stray:
        raise NotServable(f"Forge's T2I-Adapter adds a feature after input block {stray[0]}, where the engine takes "
                          f"none (its adapter inputs follow blocks {', '.join(map(str, adapter_points)) or 'none'})")
    # the decoder's k-th block takes skip blocks-1-k with the k-th entry popped from 'output'
    skips = [_plus(features[i], _from_end(outputs, blocks - 1 - i)) for i in range(blocks)]
    skips.append(middle[-1] if middle else None)
    return ControlFeeds(skips, [features[i] for i in adapter_points])


def feeds_for(slots: Sequence[Any], control: Any) -> ControlFeeds:
    """The feeds of `control` for the first usable engine slot with ControlNet inputs (every such engine of a
    server is of one UNet, so they share the layout). NotServable with the reason when none can take it."""
    slot = next((s for s in slots if s.broken is None and isinstance(s.contract, ControlledUNet)), None)
    if slot is None:
        raise NotServable(NO_CONTROL_ENGINE)
    contract = slot.contract
    return control_feeds(control, len(contract.io.skips), contract.adapters)
