"""Ahead-of-time build targets: GPU compute capabilities named the way users know them ("sm86", "8.6", "86").

An engine built for targets serves any GPU whose compute capability is among them, and is built without that GPU
(TensorRT-RTX compiles for named compute capabilities; `ComputeCapability.SM86` ...). The library decides which
targets it can build for (its enum, looked up by name); this module only spells them one way."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from sdtrt.errors import TargetError

#: What users write for "the GPU this machine has" (the default): no ahead-of-time targets.
CURRENT = "current"
_TARGET_RE = re.compile(r"^(?:sm_?)?(\d{1,2})\.?(\d)$", re.IGNORECASE)


def normalize_target(text: str) -> str:
    """'sm86', 'SM_86', '8.6' and '86' are all 'sm86'. Raises TargetError for anything else."""
    match = _TARGET_RE.match(text.strip())
    if match is None:
        raise TargetError(
            f"{text!r} is not a GPU compute capability; write it like sm86, 8.6 or 86 (or '{CURRENT}' for this GPU)"
        )
    return f"sm{int(match.group(1))}{match.group(2)}"


def parse_targets(specs: str | Iterable[str] | None) -> tuple[str, ...]:
    """Targets from a comma-separated string or a list of them, sorted and without repeats; () means the current
    GPU ('current' alone, nothing, or None). 'current' mixed with named targets is refused."""
    if specs is None:
        return ()
    parts = [specs] if isinstance(specs, str) else list(specs)
    names = list(dict.fromkeys(p.strip().lower() for part in parts for p in str(part).split(",") if p.strip()))
    if not names or names == [CURRENT]:
        return ()
    if CURRENT in names:
        raise TargetError(f"'{CURRENT}' (this GPU) cannot be mixed with named targets {names}; give one or the other")
    return tuple(sorted({normalize_target(n) for n in names}, key=lambda t: int(t[2:])))


def target_of(compute_capability: str) -> str:
    """The target name of a GPU's compute capability as torch reports it ("8.9" -> "sm89")."""
    return normalize_target(compute_capability)


def enum_name(target: str) -> str:
    """The member name a TensorRT-RTX ComputeCapability enum uses for `target` ("sm89" -> "SM89")."""
    return target.upper()


def describe(targets: Sequence[str]) -> str:
    return ", ".join(targets) if targets else CURRENT
