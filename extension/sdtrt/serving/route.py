"""One routing decision for a UNet call, shared by serving (`UnetServer.serve`) and the prediction before a
generation (`UnetServer.route`, /sdtrt/v1/coverage): the first usable engine slot whose contract takes the call and
whose profile covers its shapes, else PyTorch with the reason."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdtrt.models import NotServable
from sdtrt.profiles import Dims
from sdtrt.serving.slot import EngineSlot

#: inputs_of(slot) -> (the call's input shapes for that slot's contract, what serving feeds it); raises NotServable
#: when the contract cannot take the call
InputsOf = Callable[[EngineSlot], "tuple[Mapping[str, Dims], Any]"]


@dataclass(frozen=True)
class Route:
    """Where one call runs: `slot` and `profile` (an index into its profiles), else PyTorch for `reason`."""

    slot: EngineSlot | None = None
    profile: int | None = None
    reason: str | None = None
    #: no profile covers the call's size (or every engine is broken): what the "error" fallback policy refuses
    uncovered: bool = False
    #: what `inputs_of` gave for the chosen slot (serving: the engine's feeds)
    inputs: Any = None


def plan(gate: str | None, slots: Sequence[EngineSlot], inputs_of: InputsOf) -> Route:
    """The route of one call. `gate`: why every call runs on PyTorch now (None: the engines decide). Loads nothing."""
    if gate is not None:
        return Route(reason=gate)
    refused: str | None = None  # why the engines' contracts cannot take this call
    seen: tuple[EngineSlot, Mapping[str, Dims]] | None = None  # a slot that took the call, to describe it
    for slot in slots:
        if slot.broken is not None:
            continue
        try:
            dims, inputs = inputs_of(slot)
        except NotServable as e:
            refused = refused or str(e)
            continue
        seen = seen or (slot, dims)
        index = slot.profile_for(dims)
        if index is not None:
            return Route(slot, index, inputs=inputs)
    reason, uncovered = no_engine_reason(slots, seen, refused)
    return Route(reason=reason, uncovered=uncovered)


def no_engine_reason(slots: Sequence[EngineSlot], seen: tuple[EngineSlot, Mapping[str, Dims]] | None,
                     refused: str | None) -> tuple[str, bool]:
    """Why no engine runs a call: (reason, whether it is a size no profile covers or every engine is broken).
    `seen`: the first slot whose contract took the call, with the call's shapes; `refused`: why the contracts
    refused it."""
    broken = [s.broken for s in slots if s.broken]
    if broken and all(s.broken for s in slots):
        return broken[0], True
    if seen is None and refused is not None:
        return refused, False
    covered = "; ".join(f"{s.id}: {', '.join(map(str, s.profiles))}" for s in slots) or "none"
    described = seen[0].contract.describe(dict(seen[1])) if seen is not None else "no engine"
    return f"no engine profile covers this call ({described}); profiles: {covered}", True
