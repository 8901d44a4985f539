"""The engine key and engine ids: everything an engine depends on, hashed into the id that names its cache folder."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdtrt.engine_types import BackendInfo, RefitMode, WeightsMode
from sdtrt.errors import InvalidEngineId, ManifestError
from sdtrt.profiles import Profile
from sdtrt.targets import parse_targets

#: The values a key's `weights` and `refit_mode` may take (as stored in manifests).
WEIGHTS_MODES = tuple(m.value for m in WeightsMode)
REFIT_MODES = tuple(m.value for m in RefitMode)

#: The engine id alphabet (validate_engine_id also refuses '..'); the REST API validates path ids with it.
ENGINE_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,127}$"
_ID_RE = re.compile(ENGINE_ID_PATTERN)
#: Folders that `engine_id()` can produce; other folder names in the cache are not engines and are ignored.
ENGINE_DIR_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*-[0-9a-f]{16}$")


def validate_engine_id(engine_id: object) -> str:
    """Return `engine_id` if it is a safe single path component of the id alphabet, else raise InvalidEngineId.
    Every path the registry builds goes through this, so no id can reach outside the cache."""
    if not isinstance(engine_id, str) or not _ID_RE.fullmatch(engine_id) or ".." in engine_id:
        raise InvalidEngineId(
            f"invalid engine id {engine_id!r}: an id is 1-128 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (for example 'sd1-tensorrt-0123456789abcdef')"
        )
    return engine_id


def _slug(text: str) -> str:
    return re.sub(r"\.{2,}", ".", re.sub(r"[^a-z0-9._]+", "-", text.lower())).strip("-._") or "x"


def json_copy(value: object, what: str) -> Any:
    """Deep copy through JSON, so keys hash the same before and after a round trip and callers cannot mutate
    a key after the fact. Raises ValueError for values JSON cannot hold exactly (NaN, objects)."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must hold only JSON values: {e}") from None


def check_str(d: Mapping[str, Any], name: str, *, optional: bool = False, nonempty: bool = True) -> None:
    """Raise ValueError unless d[name] is a (non-empty) string, or None when `optional`."""
    if name not in d:
        raise ValueError(f"missing field {name!r}")
    v = d[name]
    if v is None and optional:
        return
    if not isinstance(v, str) or (nonempty and not v):
        raise ValueError(f"field {name!r} must be a {'non-empty ' if nonempty else ''}string, got {v!r}")


def require_dict(v: object, what: str) -> dict[str, Any]:
    """`v` if it is a JSON object (a dict with string keys), else ValueError naming `what`."""
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise ValueError(f"{what} must be a JSON object, got {type(v).__name__}")
    return v


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Its canonical JSON hashes to the engine id, so a change to any field
    (another TensorRT, GPU, profile or exporter) means another engine, never a silently reused one.

    checkpoint_sha256 (an addition): sha256 of the checkpoint whose weights are baked in. Set it for
    weights="embedded" engines, else engines of two checkpoints would share an id; leave it None for stripped
    engines, which get their weights by refit at load and so serve every checkpoint of the architecture.
    """

    family: str
    arch_hash: str
    io: dict[str, Any]
    profiles: tuple[str, ...]
    backend: str
    backend_version: str
    device: str
    compute_capability: str | None
    refit_mode: RefitMode  # a plain string value ("refit", "none") is accepted and converted
    weights: WeightsMode  # likewise "stripped" or "embedded"
    export: dict[str, Any]
    checkpoint_sha256: str | None = None
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Validate and normalize (profiles re-rendered by Profile, dicts deep-copied). Raises ValueError."""
        d = {f: getattr(self, f) for f in ("family", "arch_hash", "backend", "backend_version", "device")}
        d["compute_capability"] = self.compute_capability
        d["checkpoint_sha256"] = self.checkpoint_sha256
        for name in ("family", "arch_hash", "backend", "backend_version", "device"):
            check_str(d, name)
        check_str(d, "compute_capability", optional=True)
        check_str(d, "checkpoint_sha256", optional=True)
        if self.weights not in WEIGHTS_MODES:
            raise ValueError(f"weights must be one of {WEIGHTS_MODES}, got {self.weights!r}")
        if self.refit_mode not in REFIT_MODES:
            raise ValueError(f"refit_mode must be one of {REFIT_MODES}, got {self.refit_mode!r}")
        object.__setattr__(self, "weights", WeightsMode(self.weights))
        object.__setattr__(self, "refit_mode", RefitMode(self.refit_mode))
        if self.weights is WeightsMode.STRIPPED and self.refit_mode is not RefitMode.REFIT:
            raise ValueError("weights='stripped' needs refit_mode='refit': stripped weights come back by refit")
        if isinstance(self.profiles, str) or not isinstance(self.profiles, Sequence) or not self.profiles:
            raise ValueError(f"profiles must be a non-empty list of profile strings, got {self.profiles!r}")
        object.__setattr__(self, "profiles", tuple(str(Profile.parse(p)) for p in self.profiles))
        if isinstance(self.targets, str) or not isinstance(self.targets, Sequence):
            raise ValueError(f"targets must be a list of compute capabilities like 'sm89', got {self.targets!r}")
        targets = tuple(self.targets)
        if targets != parse_targets(targets) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"targets must be sorted distinct names like 'sm86', 'sm89', got {list(targets)!r}")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "io", json_copy(require_dict(self.io, "io"), "io"))
        object.__setattr__(self, "export", json_copy(require_dict(self.export, "export"), "export"))

    def __hash__(self) -> int:
        return hash(self.engine_id())

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "arch_hash": self.arch_hash,
            "io": json_copy(self.io, "io"),
            "profiles": list(self.profiles),
            "backend": self.backend,
            "backend_version": self.backend_version,
            "device": self.device,
            "compute_capability": self.compute_capability,
            "refit_mode": self.refit_mode.value,
            "weights": self.weights.value,
            "export": json_copy(self.export, "export"),
            "checkpoint_sha256": self.checkpoint_sha256,
            **({"targets": list(self.targets)} if self.targets else {}),
        }

    @classmethod
    def from_dict(cls, d: object) -> EngineKey:
        """Parse a key from JSON data. Raises ManifestError naming the bad field; unknown keys are ignored."""
        try:
            d = require_dict(d, "key")
            for name in ("family", "arch_hash", "backend", "backend_version", "device", "refit_mode", "weights"):
                check_str(d, name)
            for name in ("io", "export", "profiles", "compute_capability"):
                if name not in d:
                    raise ValueError(f"missing field {name!r}")
            targets = d.get("targets", [])
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise ValueError(f"field 'targets' must be a list of strings, got {targets!r}")
            profiles = d["profiles"]
            if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
                raise ValueError(f"field 'profiles' must be a list of strings, got {profiles!r}")
            return cls(
                family=d["family"],
                arch_hash=d["arch_hash"],
                io=d["io"],
                profiles=tuple(profiles),
                backend=d["backend"],
                backend_version=d["backend_version"],
                device=d["device"],
                compute_capability=d["compute_capability"],
                refit_mode=d["refit_mode"],
                weights=d["weights"],
                export=d["export"],
                checkpoint_sha256=d.get("checkpoint_sha256"),
                targets=tuple(targets),
            )
        except ValueError as e:
            raise ManifestError(f"manifest key is invalid: {e}") from None

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def engine_id(self) -> str:
        """'<family>-<backend>-<16 hex of sha256(canonical JSON)>'; the readable prefix is only a label."""
        digest = hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]
        prefix = f"{_slug(self.family)}-{_slug(self.backend)}"[: 128 - 17]
        return validate_engine_id(f"{prefix}-{digest}")

    def backend_info(self) -> BackendInfo:
        return BackendInfo(self.backend, self.backend_version, self.device, self.compute_capability)

