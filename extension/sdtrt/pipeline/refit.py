"""Engine weights as data: the base weights of a checkpoint plus the weights a LoRA set changes (given as their
new values) become a refit plan (name -> full new weight), computed first and applied by name after.

A plan always covers the names the previous plan changed, restored to their base values unless still changed,
so A -> B -> A ends with exactly A's weights (no drift), and an unchanged delta set plans nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

#: names -> base tensors (CPU or device; the checkpoint's layout and dtype)
BaseLoader = Callable[[Sequence[str]], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class RefitPlan:
    key: Hashable  # identity of the delta set the plan realises
    weights: dict[str, torch.Tensor]  # every name to set, with its full new value
    restored: frozenset[str]  # names going back to their base value

    @property
    def changed(self) -> frozenset[str]:
        return frozenset(self.weights) - self.restored


def merge(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """base + delta the way A1111's Lora merges: in the delta's dtype, stored in the weight's dtype."""
    if delta.shape != base.shape:
        if delta.numel() != base.numel():
            raise ValueError(f"a weight update of shape {tuple(delta.shape)} does not fit a weight of shape "
                             f"{tuple(base.shape)}")
        delta = delta.reshape(base.shape)
    return (base.to(device=delta.device, dtype=delta.dtype) + delta).to(base.dtype)


@dataclass
class WeightTracker:
    """Which engine weights differ from the base checkpoint, and for which delta set."""

    key: Hashable = ()
    changed: frozenset[str] = field(default_factory=frozenset)

    def reset(self) -> None:
        """After a full refit with base weights: nothing differs."""
        self.key, self.changed = (), frozenset()

    def plan(self, key: Hashable, changed: Mapping[str, torch.Tensor], base: BaseLoader) -> RefitPlan | None:
        """The plan that takes the engine from its current state to base with `changed` names replaced by the
        given values; None when it is there already."""
        if key == self.key:
            return None
        restored = sorted(self.changed - set(changed))
        bases = base(restored) if restored else {}
        missing = [n for n in restored if n not in bases]
        if missing:
            raise KeyError(f"no base weights for {missing[:3]}")
        weights = {**{n: bases[n] for n in restored}, **changed}
        return RefitPlan(key, weights, frozenset(restored))

    def applied(self, plan: RefitPlan) -> None:
        self.key, self.changed = plan.key, plan.changed
