"""What a backend and the engine cache tell each other: the backend's identity, a build's result, its progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum


class WeightsMode(str, Enum):
    """Where an engine's weights live. The values are what manifests and engine keys store (plain JSON strings)."""

    #: The plan has no weights: they must be refit from a checkpoint before use.
    STRIPPED = "stripped"
    #: The plan carries its weights.
    EMBEDDED = "embedded"

    def __str__(self) -> str:
        return self.value


class RefitMode(str, Enum):
    """Whether an engine's weights can be replaced after the build. The values are what manifests store."""

    REFIT = "refit"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


#: progress(phase, fraction) with fraction in [0, 1]. It may raise to cancel a build (e.g. KeyboardInterrupt).
ProgressCallback = Callable[[str, float], None]


@dataclass(frozen=True)
class BackendInfo:
    """What an engine depends on: an engine built under one BackendInfo is stale under another."""

    name: str
    version: str
    device: str
    compute_capability: str | None = None


@dataclass
class BuildResult:
    """Files the build wrote (relative to the folder it was given) and facts for the manifest."""

    files: list[str]
    weights: WeightsMode  # STRIPPED: must be refit from a checkpoint before use; EMBEDDED: carries its weights
    refit_mode: RefitMode
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """A backend (or a test) may name the modes by their values; anything else is refused here."""
        self.weights = WeightsMode(self.weights)
        self.refit_mode = RefitMode(self.refit_mode)
