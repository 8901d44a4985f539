"""The manifest of a published engine: its schema, the files it vouches for, and why an engine is stale here."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sdtrt.constants import MANIFEST_SCHEMA
from sdtrt.engine_types import BackendInfo
from sdtrt.errors import ManifestError, TargetError
from sdtrt.storage.key import EngineKey, check_str, json_copy, require_dict, validate_engine_id
from sdtrt.targets import describe, target_of

MANIFEST_NAME = "manifest.json"
#: A manifest is a few KiB; refusing big ones keeps a garbage file from being read into memory.
MAX_MANIFEST_BYTES = 1 << 20
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileEntry:
    """One engine file, as published: name relative to the engine folder, byte size, hex sha256."""

    name: str
    size: int
    sha256: str


def check_file_name(name: object) -> str:
    """A published file is a plain name inside the engine folder: no separators, no dot-names, not the manifest."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..", MANIFEST_NAME)
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or len(name) > 200
    ):
        raise ValueError(f"file name {name!r} must be a plain file name (no '/', not starting with '.')")
    return name


@dataclass(frozen=True)
class Manifest:
    """What a published engine is and which bytes it consists of. Written once, never edited."""

    id: str
    key: EngineKey
    files: list[FileEntry]
    source_checkpoint: dict[str, Any]
    created: str
    build_seconds: float
    sdtrt_version: str
    extra: dict[str, Any] = field(default_factory=dict)
    schema: int = MANIFEST_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "id": self.id,
            "key": self.key.to_dict(),
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.files],
            "source_checkpoint": json_copy(self.source_checkpoint, "source_checkpoint"),
            "created": self.created,
            "build_seconds": self.build_seconds,
            "sdtrt_version": self.sdtrt_version,
            "extra": json_copy(self.extra, "extra"),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate. Raises ManifestError (never anything else) for any malformed input."""
        if not text or not text.strip():
            raise ManifestError("manifest.json is empty")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ManifestError(f"manifest.json is not valid JSON ({type(e).__name__}: {e})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        """Validate JSON data against schema MANIFEST_SCHEMA; unknown keys are ignored."""
        try:
            d = require_dict(data, "manifest.json")
            schema = d.get("schema")
            if type(schema) is not int:
                raise ValueError(f"field 'schema' must be an integer, got {schema!r}")
            if schema != MANIFEST_SCHEMA:
                raise ValueError(
                    f"schema {schema} is not supported (this sd-webui-trt reads schema {MANIFEST_SCHEMA}); "
                    "rebuild the engine or use a matching sd-webui-trt"
                )
            for name in ("id", "created", "sdtrt_version"):
                check_str(d, name)
            engine_id = validate_engine_id(d["id"])
            datetime.fromisoformat(d["created"].replace("Z", "+00:00"))
            seconds = d.get("build_seconds")
            if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < float("inf"):
                raise ValueError(f"field 'build_seconds' must be a non-negative number, got {seconds!r}")
            source = require_dict(d.get("source_checkpoint"), "field 'source_checkpoint'")
            check_str(source, "name", nonempty=False)
            check_str(source, "sha256", optional=True, nonempty=False)
            extra = require_dict(d.get("extra", {}), "field 'extra'")
            # json.loads accepts NaN and Infinity; a manifest holding them could be read but never written back
            # (or served as JSON by the API), so refuse them here like every other malformed value.
            source = json_copy(source, "field 'source_checkpoint'")
            extra = json_copy(extra, "field 'extra'")
            files_raw = d.get("files")
            if not isinstance(files_raw, list) or not files_raw:
                raise ValueError("field 'files' must be a non-empty list")
            files: list[FileEntry] = []
            for i, f in enumerate(files_raw):
                f = require_dict(f, f"files[{i}]")
                name, size, sha = check_file_name(f.get("name")), f.get("size"), f.get("sha256")
                if type(size) is not int or size < 0:
                    raise ValueError(f"files[{i}].size must be a non-negative integer, got {size!r}")
                if not isinstance(sha, str) or not _SHA_RE.match(sha):
                    raise ValueError(f"files[{i}].sha256 must be 64 lowercase hex digits, got {sha!r}")
                files.append(FileEntry(name, size, sha))
            if len({f.name for f in files}) != len(files):
                raise ValueError("field 'files' lists a file twice")
        except (ValueError, KeyError) as e:
            raise ManifestError(f"manifest.json is invalid: {e}") from None
        if "key" not in d:
            raise ManifestError("manifest.json is invalid: missing field 'key'")
        key = EngineKey.from_dict(d["key"])
        if key.engine_id() != engine_id:
            raise ManifestError(
                f"manifest was edited (its fields no longer match id {engine_id}; they hash to {key.engine_id()}); "
                "delete and rebuild the engine"
            )
        return cls(
            id=engine_id,
            key=key,
            files=files,
            source_checkpoint=source,
            created=d["created"],
            build_seconds=float(seconds),
            sdtrt_version=d["sdtrt_version"],
            extra=extra,
            schema=schema,
        )


@dataclass
class EngineStatus:
    """One cache entry as list()/status() see it. `manifest` is None when it could not be parsed."""

    id: str
    manifest: Manifest | None
    ok: bool
    reason: str | None
    #: True when the engine is intact but was built for another backend version or GPU (`reason` says which):
    #: it must not be loaded here, and building the same checkpoint and profiles again makes one that can.
    stale: bool = False



def _cc_label(cc: str | None) -> str:
    if not cc:
        return ""
    return f" (sm{cc.replace('.', '')})" if re.fullmatch(r"\d+\.\d+", cc) else f" ({cc})"


def _describe(info: BackendInfo) -> str:
    return f"{info.name} {info.version} on {info.device}{_cc_label(info.compute_capability)}"


def _target_here(current: BackendInfo) -> str | None:
    try:
        return target_of(current.compute_capability) if current.compute_capability else None
    except TargetError:
        return None


def stale_reason(key: EngineKey, current: BackendInfo | None) -> str | None:
    """Why an engine built under `key` must not be loaded under `current` (None: it may)."""
    if current is None:
        return None
    if key.targets:
        built_with = f"{key.backend} {key.backend_version}"
        if (key.backend, key.backend_version) != (current.name, current.version):
            return f"built with {built_with} for {describe(key.targets)}; this machine has {_describe(current)}"
        here = _target_here(current)
        if here not in key.targets:
            return (f"built ahead of time for {describe(key.targets)}; this GPU ({current.device}) is "
                    f"{here or 'of unknown compute capability'}: build for {here or 'it'} (--target) to use it here")
        return None
    built = key.backend_info()
    if built == current:
        return None
    return f"built with {_describe(built)}; this machine has {_describe(current)}"

