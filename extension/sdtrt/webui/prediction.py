"""The answer of a coverage prediction: where each pass and call of a generation runs, the status line's text and
state, and the build that would fix what runs on PyTorch."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from sdtrt.constants import TOKENS_PER_CHUNK
from sdtrt.profiles import MAX_PIXELS, MIN_PIXELS, Shape
from sdtrt.serving.passes import PassSpec
from sdtrt.serving.server import SWITCHED_OFF

#: Rounding of a suggested profile's size range, and the smallest range it spans around the request
SUGGEST_STEP = 64
SUGGEST_SPAN = 256


class RouteKind(str, enum.Enum):
    """Why a pass runs where it runs."""

    ENGINE = "engine"
    OFF = "off"  # switched off, or the SD Unet is not ours
    NO_ENGINE = "no_engine"
    UNCOVERED = "uncovered"  # an engine, but no profile covers a call
    NO_CONTROL_INPUTS = "no_control_inputs"  # ControlNet units, an engine without ControlNet inputs
    #: the engines follow the other convention than the host's UNet, at a size where the two compute differently
    OTHER_CONVENTION = "other_convention"
    #: something no engine can do: tiling, a unit type that changes the UNet's inside, LoRA on a fixed-weight engine
    UNSERVABLE = "unservable"

    def __str__(self) -> str:
        return self.value

    @property
    def buildable(self) -> bool:
        """Building an engine would fix it."""
        return self in (RouteKind.NO_ENGINE, RouteKind.UNCOVERED, RouteKind.NO_CONTROL_INPUTS,
                        RouteKind.OTHER_CONVENTION)


class CoverageState(str, enum.Enum):
    """The status line's state for the whole generation."""

    ENGINE = "engine"
    OFF = "off"
    NO_ENGINE = "no_engine"
    FAILS = "fails"  # a call no profile covers and the fallback policy "error"
    PARTIAL = "partial"
    PYTORCH = "pytorch"

    def __str__(self) -> str:
        return self.value


def _doc(text: str) -> dict[str, str]:
    return {"description": text}


@dataclass
class CallRoute:
    """One UNet call of a pass and where it runs."""

    rows: int
    width: int
    height: int
    chunks: int = field(metadata=_doc("77-row prompt chunks of the call's context"))
    engine_id: str | None
    profile: int | None = field(metadata=_doc("1-based profile index in the engine"))
    reason: str | None = field(metadata=_doc("why it runs on PyTorch"))


@dataclass
class PassRoute:
    """One sampling pass (first, hires, refiner) and where its calls run."""

    name: str = field(metadata=_doc("first pass, hires pass, ... (refiner)"))
    checkpoint: str | None
    width: int
    height: int
    batch: int
    engine: bool
    engine_id: str | None
    profile: int | None
    reason: str | None
    kind: RouteKind = field(metadata=_doc(", ".join(k.value for k in RouteKind)))
    calls: list[CallRoute] = field(default_factory=list)


@dataclass
class Coverage:
    """What a generation will run on (POST /sdtrt/v1/coverage)."""

    engine: bool = field(metadata=_doc("every UNet call of the generation runs on an engine"))
    state: CoverageState = field(metadata=_doc(", ".join(s.value for s in CoverageState) + " (fails: the fallback "
                                                "policy is 'error' and a call has no profile)"))
    message: str = field(metadata=_doc("the status line shown in the generation tabs"))
    reason: str | None
    passes: list[PassRoute]
    build: dict[str, Any] | None = field(metadata=_doc("a POST /sdtrt/v1/engines body whose engine would serve this "
                                                        "generation, when building one would"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _down(px: int) -> int:
    return max(MIN_PIXELS, px // SUGGEST_STEP * SUGGEST_STEP)


def _up(px: int) -> int:
    return min(MAX_PIXELS, -(-px // SUGGEST_STEP) * SUGGEST_STEP)


def suggest_profile(passes: list[PassSpec]) -> str:
    """min:opt:max around the passes' calls: sizes from a little below the smallest to a little above the largest
    (in steps of 64 px, at least SUGGEST_SPAN wide), opt at the first pass, batch and prompt chunks as the calls
    need them (a profile of B images takes calls of B to 2B rows)."""
    calls = [c for p in passes for c in p.calls]
    first = passes[0]
    rows = [c.rows for c in calls]
    hs, ws, chunks = [c.height for c in calls], [c.width for c in calls], [c.chunks for c in calls]
    lo = Shape(min(first.batch, min(rows)), _down(min(hs) - SUGGEST_SPAN // 2), _down(min(ws) - SUGGEST_SPAN // 2),
               min(chunks) * TOKENS_PER_CHUNK)
    opt = Shape(first.batch, first.height, first.width, max(first.cond_chunks, min(chunks)) * TOKENS_PER_CHUNK)
    hi = Shape(max(first.batch, -(-max(rows) // 2)), _up(max(hs) + SUGGEST_SPAN // 2),
               _up(max(ws) + SUGGEST_SPAN // 2), max(max(chunks), 2) * TOKENS_PER_CHUNK)
    return f"{lo}:{opt}:{hi}"


def summarize(routes: list[PassRoute], build: dict[str, Any] | None, *, fails: bool = False) -> Coverage:
    """The answer and the status line's text. `fails`: the fallback policy is "error", so a call no profile covers
    fails the generation instead of running on PyTorch."""
    engine = bool(routes) and all(r.engine for r in routes)
    if engine:
        head = routes[0]
        text = (f"TensorRT: {head.engine_id} profile {head.profile} serves {head.width}x{head.height}, "
                f"batch {head.batch}")
        more = [f"{r.name} {r.width}x{r.height}" + (f" on {r.engine_id}" if r.engine_id != head.engine_id else "")
                + f" profile {r.profile}" for r in routes[1:]]
        if more:
            text += "; " + ", ".join(more)
        return Coverage(True, CoverageState.ENGINE, text, None, routes, None)
    if routes and all(r.kind is RouteKind.OFF for r in routes):
        reason = routes[0].reason
        text = "TensorRT off" if reason == SWITCHED_OFF else f"TensorRT off ({reason})"
        return Coverage(False, CoverageState.OFF, text, reason, routes, None)
    if routes and all(r.kind is RouteKind.NO_ENGINE for r in routes):
        reason = routes[0].reason or "no engine"
        return Coverage(False, CoverageState.NO_ENGINE, f"TensorRT: {reason}", reason, routes, build)
    bad = next(r for r in routes if not r.engine)
    if fails and any(r.kind is RouteKind.UNCOVERED for r in routes):
        bad = next(r for r in routes if r.kind is RouteKind.UNCOVERED)
        text = (f"TensorRT: the {bad.name} ({bad.width}x{bad.height}) has no engine profile and the fallback policy "
                "is 'error': the generation will fail")
        return Coverage(False, CoverageState.FAILS, text, bad.reason, routes, build)
    short = "no profile covers it" if bad.kind is RouteKind.UNCOVERED else (bad.reason or "")
    text = f"TensorRT: the {bad.name} ({bad.width}x{bad.height}) will run on PyTorch — {short}"
    state = CoverageState.PARTIAL if any(c.engine_id for r in routes for c in r.calls) else CoverageState.PYTORCH
    return Coverage(False, state, text, bad.reason, routes, build)
