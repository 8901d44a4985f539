"""What the service reports, as typed results: the engine rows of the tab and GET /engines, the outcome of one
generation, and the /status snapshot. The REST API's answer models are derived from these dataclasses
(`api/models.py`), so a field exists once; `to_dict()` is the JSON the routes send."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sdtrt.models import record_takes_control
from sdtrt.serving.catalog import EngineRow


def _doc(text: str) -> dict[str, str]:
    return {"description": text}


class Report:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True)
class EngineListing(Report):
    """One engine of the cache as the REST API and the TensorRT tab show it."""

    id: str
    ok: bool
    reason: str | None = field(metadata=_doc("why it cannot serve here (stale, unavailable or refused)"))
    family: str | None
    profiles: list[str]
    backend: str | None
    backend_version: str | None
    device: str | None
    dtype: str | None
    size_bytes: int | None
    checkpoint: str | None = field(metadata=_doc("the checkpoint file it was built from"))
    created: str | None
    active: bool = field(metadata=_doc("the active SD Unet uses it"))
    controlnet: bool = field(default=False, metadata=_doc("it has ControlNet inputs"))
    targets: list[str] = field(default_factory=list, metadata=_doc("compute capabilities of an ahead-of-time build"))
    weights: str | None = None
    convention: str | None = field(default=None, metadata=_doc(
        "whose UNet numerics it follows at sizes that are not multiples of 64 px: a1111 (upsample x2, resize in "
        "the skip concatenation) or forge (upsample to the skip's size)"))

    @classmethod
    def of(cls, row: EngineRow, active: bool) -> EngineListing:
        m = row.manifest
        return cls(
            id=row.id, ok=row.ok, reason=row.reason, family=m.key.family if m else None,
            profiles=list(m.key.profiles) if m else [], backend=m.key.backend if m else None,
            backend_version=m.key.backend_version if m else None, device=m.key.device if m else None,
            dtype=m.key.export.get("dtype") if m else None, size_bytes=row.size_bytes,
            checkpoint=m.source_checkpoint.get("name") if m else None, created=m.created if m else None,
            active=active, controlnet=bool(m and record_takes_control(m.key.io)),
            targets=list(m.key.targets) if m else [], weights=m.key.weights.value if m else None,
            convention=row.convention)


@dataclass(frozen=True)
class GenerationOutcome(Report):
    """What one generation did: its engine and PyTorch calls and why."""

    number: int = field(metadata=_doc("generations finished since the WebUI started, this one included"))
    finished: float = field(metadata=_doc("when it ended (epoch seconds)"))
    engine_calls: int
    fallback_calls: int
    fallback_reasons: dict[str, int]

    @classmethod
    def between(cls, before: Mapping[str, Any], after: Mapping[str, Any], number: int) -> GenerationOutcome:
        """From the counters before and after it."""
        reasons = {k: n - int(before["fallback_reasons"].get(k, 0)) for k, n in after["fallback_reasons"].items()}
        return cls(number, time.time(), after["engine_calls"] - before["engine_calls"],
                   after["fallback_calls"] - before["fallback_calls"], {k: n for k, n in reasons.items() if n > 0})


@dataclass(frozen=True)
class ActiveReport(Report):
    """The active SD Unet's server."""

    label: str | None
    engines: list[str]
    loaded: list[str]
    ready: list[str] = field(metadata=_doc("loaded and not broken"))
    backends: list[str]
    unusable: str | None = field(metadata=_doc("why every call of this server runs on PyTorch"))
    runtime: dict[str, dict[str, Any]] = field(metadata=_doc("per loaded engine: its runner's counters "
                                                                 "(CUDA graphs)"))
    networks: list[str] = field(metadata=_doc("the LoRA set in the engine, name:strength"))


@dataclass(frozen=True)
class BuildingJob(Report):
    """A queued or running build (its engine is not ready: nothing is published before the build ends)."""

    job_id: str
    checkpoint: str | None
    profiles: list[str] | None
    state: str
    phase: str
    progress: float


@dataclass(frozen=True)
class JobCounts(Report):
    """Build jobs waiting and running."""

    queued: int
    running: int


@dataclass(frozen=True)
class StatusReport(Report):
    """GET /sdtrt/v1/status: the settings, the active server, counters, builds and the last generation."""

    enabled: bool
    backend: str
    fallback: str
    cuda_graphs: bool = field(metadata=_doc("the CUDA graphs setting engines load with"))
    cache_dir: str
    active: ActiveReport | None
    counters: dict[str, Any] = field(metadata=_doc("engine_calls, fallback_calls, fallback_reasons, refits, "
                                                       "last_refit, last_error"))
    jobs: JobCounts
    building: list[BuildingJob] = field(metadata=_doc("queued and running builds (not ready)"))
    generations: int = field(metadata=_doc("generations finished since the WebUI started"))
    last_generation: GenerationOutcome | None = field(metadata=_doc("the last finished generation"))
