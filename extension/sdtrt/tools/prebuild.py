"""`python -m sdtrt prebuild PLAN`: build every engine a plan names into a cache, skipping those already there.

What a fleet's pre-build Job runs (the only writer of the shared engine cache): re-running it after a success
builds nothing. The plan is JSON, written by the Helm chart into a ConfigMap:

    {"builds": [{"checkpoint": "Stable-diffusion/sd15.safetensors",   # relative to --models, or absolute
                 "profiles": ["1x512x512x75", "1x512x512x75:1x512x512x75:4x768x768x150"],  # BxHxWxT, min:opt:max
                 "backend": "tensorrt-rtx",       # auto | tensorrt | tensorrt-rtx | onnxruntime (default auto)
                 "targets": ["sm89", "sm90"],     # TensorRT-RTX ahead of time; empty: this machine's GPU
                 "controlnet": false, "refit": true, "dtype": null, "config": null,
                 "convention": "a1111"}]}          # a1111 (default) | forge: whose UNet numerics the engine follows
                                                  # at sizes that are not multiples of 64 px (sdtrt.models.convention)

Before building, the cache is checked (writable, renames work) and what killed builds left behind is removed (the
Job is the only writer; serving replicas never clean up). Every entry is tried even after one fails (a Job's log then shows all that is wrong at once); the exit code is 1
when any failed."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtrt.errors import SdtrtError
from sdtrt.profiles import Profile
from sdtrt.targets import parse_targets

FIELDS = ("checkpoint", "profiles", "backend", "targets", "controlnet", "refit", "dtype", "config", "convention")


class PlanError(SdtrtError):
    """The plan file is not what `python -m sdtrt prebuild` reads; the message names the entry and field."""


@dataclass(frozen=True)
class PlannedBuild:
    checkpoint: str
    profiles: tuple[str, ...]
    backend: str = "auto"
    targets: tuple[str, ...] = ()
    controlnet: bool = False
    refit: bool = True
    dtype: str | None = None
    config: str | None = None
    #: sdtrt.models.convention's name; None: A1111's
    convention: str | None = None

    def resolve(self, models: Path, name: str | None) -> Path | None:
        path = Path(name) if name else None
        return path if path is None or path.is_absolute() else models / path


@dataclass
class BuildReport:
    checkpoint: str
    id: str | None = None
    built: bool = False
    targets: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise PlanError(f"{where}: expected a list of non-empty strings, got {value!r}")
    return tuple(v.strip() for v in value)


def parse_plan(data: Any, backends: Sequence[str]) -> list[PlannedBuild]:
    """The plan's entries, checked before anything is built (a typo fails the Job at once, not after an hour)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("builds"), list):
        raise PlanError('a plan is a JSON object {"builds": [...]}')
    out = []
    for i, entry in enumerate(data["builds"]):
        where = f"builds[{i}]"
        if not isinstance(entry, Mapping):
            raise PlanError(f"{where}: expected an object with checkpoint and profiles")
        unknown = sorted(set(entry) - set(FIELDS))
        if unknown:
            raise PlanError(f"{where}: unknown field {unknown[0]!r}; fields are {', '.join(FIELDS)}")
        checkpoint = entry.get("checkpoint")
        if not isinstance(checkpoint, str) or not checkpoint.strip():
            raise PlanError(f"{where}.checkpoint: a checkpoint file name is needed")
        if "profiles" not in entry:
            raise PlanError(f"{where}.profiles: at least one profile is needed (e.g. 1x512x512x75)")
        profiles = _strings(entry["profiles"], f"{where}.profiles")
        if not profiles:
            raise PlanError(f"{where}.profiles: at least one profile is needed (e.g. 1x512x512x75)")
        backend = entry.get("backend") or "auto"
        if backend not in ("auto", *backends):
            raise PlanError(f"{where}.backend: {backend!r} is not one of auto, {', '.join(backends)}")
        for flag in ("controlnet", "refit"):
            if flag in entry and not isinstance(entry[flag], bool):
                raise PlanError(f"{where}.{flag}: true or false, got {entry[flag]!r}")
        dtype = entry.get("dtype")
        if dtype not in (None, "float32", "float16"):
            raise PlanError(f"{where}.dtype: float32, float16 or null, got {dtype!r}")
        config = entry.get("config")
        if config is not None and not isinstance(config, str):
            raise PlanError(f"{where}.config: a file name or null, got {config!r}")
        try:
            convention = entry.get("convention")
            if convention is not None:  # checked against the one list (whose package imports torch) when named
                from sdtrt.models.convention import check_convention

                try:
                    check_convention(convention)
                except SdtrtError as e:
                    raise PlanError(f"{where}.convention: {e}") from e
            targets = parse_targets(_strings(entry.get("targets") or [], f"{where}.targets"))
            for p in profiles:
                Profile.parse(p)
        except PlanError:
            raise
        except SdtrtError as e:
            raise PlanError(f"{where}: {e}") from e
        out.append(PlannedBuild(checkpoint.strip(), profiles, backend, targets, bool(entry.get("controlnet", False)),
                                bool(entry.get("refit", True)), dtype, config, convention))
    return out


def load_plan(path: Path, backends: Sequence[str]) -> list[PlannedBuild]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PlanError(f"cannot read the plan {path}: {e.strerror or e}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise PlanError(f"the plan {path} is not JSON: {e}") from e
    return parse_plan(data, backends)


BuildFn = Callable[..., Any]


def run_plan(plan: Sequence[PlannedBuild], models: Path, cache: Path, build: BuildFn | None = None,
             log: Callable[[str], None] = lambda _m: None) -> list[BuildReport]:
    """Build each planned engine (an identical one already in the cache is reused: `built` False)."""
    from sdtrt.backends.base import BuildOptions
    from sdtrt.models.convention import A1111
    from sdtrt.pipeline.build import build_engine

    from sdtrt.storage.registry import Registry

    # refused before any export: a read-only cache, or one on a file system that cannot rename (an S3 mount)
    registry = Registry(cache)
    registry.require_writable()
    # the Job is the cache's only writer, so it also removes what killed builds left behind (serving replicas
    # with SDTRT_BUILDS=off never do): temp folders nothing has touched for an hour, orphans
    removed = registry.cleanup()
    if removed:
        log(f"removed {len(removed)} leftovers of dead builds: {', '.join(removed[:5])}")
    build = build or build_engine
    reports = []
    for entry in plan:
        report = BuildReport(entry.checkpoint, targets=entry.targets)
        reports.append(report)
        try:
            checkpoint = entry.resolve(models, entry.checkpoint)
            assert checkpoint is not None
            if not checkpoint.is_file():
                raise SdtrtError(f"checkpoint {checkpoint} does not exist (plan paths are relative to {models})")
            options = BuildOptions(refit=entry.refit, strip_weights=entry.refit, cache_dir=Path(cache) / ".cache",
                                   targets=entry.targets)
            log(f"{entry.checkpoint}: {entry.backend} {' '.join(entry.profiles)}"
                f"{' for ' + ','.join(entry.targets) if entry.targets else ''}"
                f"{', ' + entry.convention + ' convention' if entry.convention else ''}")
            outcome = build(checkpoint, [Profile.parse(p) for p in entry.profiles], cache,
                            config=entry.resolve(models, entry.config), backend=entry.backend, dtype=entry.dtype,
                            options=options, controlnet=entry.controlnet, convention=entry.convention or A1111)
            report.id, report.built, report.notes = outcome.manifest.id, outcome.built, list(outcome.notes)
            log(f"{entry.checkpoint}: {'built' if outcome.built else 'already present'} {report.id}")
        except SdtrtError as e:
            report.error = str(e)
            log(f"{entry.checkpoint}: failed: {e}")
    return reports


def summary(reports: Sequence[BuildReport]) -> dict[str, Any]:
    return {"builds": [vars(r) | {"targets": list(r.targets)} for r in reports],
            "built": sum(r.built for r in reports),
            "present": sum(r.id is not None and not r.built for r in reports),
            "failed": sum(r.error is not None for r in reports)}
