"""The on-disk engine cache that many WebUI replicas share: content-addressed folders, published atomically.

Layout under the cache folder::

    <engine_id>/                 a published engine: its files and manifest.json (immutable once published)
    .locks/<engine_id>.lock      per-id flock files; they only avoid duplicate builds
    .tmp-<id>-<host>-<pid>-<rnd> a build in progress (or an orphan of a killed one; `cleanup` removes it)
                                 (also a delete in progress, or a short-lived write probe: `.tmp-probe-...`)
    .quarantine-<id>-<ts>-<rnd>  an engine found corrupt by `build`, kept for inspection, never loaded

Why this shape: a folder appears under its final name only by one `rename` of a complete, fsynced temp folder,
so readers never see half an engine, whatever crashes. The id is a hash of everything the engine depends on, so
two processes that build "the same" engine produce interchangeable results and the loser of the rename race
simply uses the winner's. Locks are best effort (flock is a no-op or unsupported on some network file systems);
correctness never depends on them. A build holding a lock shows it is alive by touching its lock file and temp
folder (a heartbeat); a waiter that sees no heartbeat for one lease stops waiting and builds itself, so a lock
held by a dead host or hung process delays others by at most one lease. Liveness is judged by whether the
heartbeat *changes*, measured on the waiter's monotonic clock, so clocks that disagree between hosts cannot make
a live build look dead. sha256 in the manifest detects corruption, not tampering: anyone who can
write to the cache can run code in every replica.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdtrt.backends.base import BackendInfo, BuildResult, ProgressCallback
from sdtrt.constants import CACHE_ENV, MANIFEST_SCHEMA
from sdtrt.errors import BuildError, CacheNotWritable, EngineNotFound, SdtrtError, StaleEngine
from sdtrt.fsutil import FileLock, atomic_write_bytes, fsync_dir, read_regular_file, sha256_and_size
from sdtrt.profiles import Profile

MANIFEST_NAME = "manifest.json"
#: A manifest is a few KiB; refusing big ones keeps a garbage file from being read into memory.
MAX_MANIFEST_BYTES = 1 << 20
#: Builds take minutes (SDXL on a small GPU: tens of minutes); waiters give up after this and build themselves.
#: A waiter also stops waiting one lease after the build it waits for stops showing signs of life.
DEFAULT_LOCK_TIMEOUT_S = 3600.0
#: A running build touches its lock file and temp folder this often (lease / 5), so waiters and `cleanup` on
#: other hosts can tell it is alive.
HEARTBEAT_S = 60.0
#: How long a build may show no heartbeat before waiters stop waiting for it. Five beats: NFS clients cache
#: attributes for up to 60 s, so a shorter lease could mistake a live build on another host for a dead one.
DEFAULT_LEASE_S = 5 * HEARTBEAT_S
#: errno values that mean "this cache is read-only for us" (CacheNotWritable) or "the disk is full".
_NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
WEIGHTS_MODES = ("stripped", "embedded")
REFIT_MODES = ("refit", "none")

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
#: Folders that `engine_id()` can produce; other folder names in the cache are not engines and are ignored.
_ENGINE_DIR_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*-[0-9a-f]{16}$")
_TMP_RE = re.compile(r"^\.tmp-(?P<id>.+)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-(?P<rnd>[0-9a-f]+)$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(StaleEngine):
    """manifest.json is unreadable, fails the schema, or was edited: the engine must not be loaded."""


class InvalidEngineId(EngineNotFound, ValueError):
    """The text cannot be an engine id (path separators, '..', NUL, uppercase, too long...)."""


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


def _json_copy(value: object, what: str) -> Any:
    """Deep copy through JSON, so keys hash the same before and after a round trip and callers cannot mutate
    a key after the fact. Raises ValueError for values JSON cannot hold exactly (NaN, objects)."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must hold only JSON values: {e}") from None


def _check_str(d: Mapping[str, Any], name: str, *, optional: bool = False, nonempty: bool = True) -> None:
    if name not in d:
        raise ValueError(f"missing field {name!r}")
    v = d[name]
    if v is None and optional:
        return
    if not isinstance(v, str) or (nonempty and not v):
        raise ValueError(f"field {name!r} must be a {'non-empty ' if nonempty else ''}string, got {v!r}")


def _require_dict(v: object, what: str) -> dict[str, Any]:
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
    refit_mode: str
    weights: str
    export: dict[str, Any]
    checkpoint_sha256: str | None = None

    def __post_init__(self) -> None:
        """Validate and normalize (profiles re-rendered by Profile, dicts deep-copied). Raises ValueError."""
        d = {f: getattr(self, f) for f in ("family", "arch_hash", "backend", "backend_version", "device")}
        d["compute_capability"] = self.compute_capability
        d["checkpoint_sha256"] = self.checkpoint_sha256
        for name in ("family", "arch_hash", "backend", "backend_version", "device"):
            _check_str(d, name)
        _check_str(d, "compute_capability", optional=True)
        _check_str(d, "checkpoint_sha256", optional=True)
        if self.weights not in WEIGHTS_MODES:
            raise ValueError(f"weights must be one of {WEIGHTS_MODES}, got {self.weights!r}")
        if self.refit_mode not in REFIT_MODES:
            raise ValueError(f"refit_mode must be one of {REFIT_MODES}, got {self.refit_mode!r}")
        if self.weights == "stripped" and self.refit_mode != "refit":
            raise ValueError("weights='stripped' needs refit_mode='refit': stripped weights come back by refit")
        if isinstance(self.profiles, str) or not isinstance(self.profiles, Sequence) or not self.profiles:
            raise ValueError(f"profiles must be a non-empty list of profile strings, got {self.profiles!r}")
        object.__setattr__(self, "profiles", tuple(str(Profile.parse(p)) for p in self.profiles))
        object.__setattr__(self, "io", _json_copy(_require_dict(self.io, "io"), "io"))
        object.__setattr__(self, "export", _json_copy(_require_dict(self.export, "export"), "export"))

    def __hash__(self) -> int:
        return hash(self.engine_id())

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "arch_hash": self.arch_hash,
            "io": _json_copy(self.io, "io"),
            "profiles": list(self.profiles),
            "backend": self.backend,
            "backend_version": self.backend_version,
            "device": self.device,
            "compute_capability": self.compute_capability,
            "refit_mode": self.refit_mode,
            "weights": self.weights,
            "export": _json_copy(self.export, "export"),
            "checkpoint_sha256": self.checkpoint_sha256,
        }

    @classmethod
    def from_dict(cls, d: object) -> EngineKey:
        """Parse a key from JSON data. Raises ManifestError naming the bad field; unknown keys are ignored."""
        try:
            d = _require_dict(d, "key")
            for name in ("family", "arch_hash", "backend", "backend_version", "device", "refit_mode", "weights"):
                _check_str(d, name)
            for name in ("io", "export", "profiles", "compute_capability"):
                if name not in d:
                    raise ValueError(f"missing field {name!r}")
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


@dataclass(frozen=True)
class FileEntry:
    """One engine file, as published: name relative to the engine folder, byte size, hex sha256."""

    name: str
    size: int
    sha256: str


def _check_file_name(name: object) -> str:
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


@dataclass
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
            "source_checkpoint": _json_copy(self.source_checkpoint, "source_checkpoint"),
            "created": self.created,
            "build_seconds": self.build_seconds,
            "sdtrt_version": self.sdtrt_version,
            "extra": _json_copy(self.extra, "extra"),
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
            d = _require_dict(data, "manifest.json")
            schema = d.get("schema")
            if type(schema) is not int:
                raise ValueError(f"field 'schema' must be an integer, got {schema!r}")
            if schema != MANIFEST_SCHEMA:
                raise ValueError(
                    f"schema {schema} is not supported (this sd-webui-trt reads schema {MANIFEST_SCHEMA}); "
                    "rebuild the engine or use a matching sd-webui-trt"
                )
            for name in ("id", "created", "sdtrt_version"):
                _check_str(d, name)
            engine_id = validate_engine_id(d["id"])
            datetime.fromisoformat(d["created"].replace("Z", "+00:00"))
            seconds = d.get("build_seconds")
            if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < float("inf"):
                raise ValueError(f"field 'build_seconds' must be a non-negative number, got {seconds!r}")
            source = _require_dict(d.get("source_checkpoint"), "field 'source_checkpoint'")
            _check_str(source, "name", nonempty=False)
            _check_str(source, "sha256", optional=True, nonempty=False)
            extra = _require_dict(d.get("extra", {}), "field 'extra'")
            # json.loads accepts NaN and Infinity; a manifest holding them could be read but never written back
            # (or served as JSON by the API), so refuse them here like every other malformed value.
            source = _json_copy(source, "field 'source_checkpoint'")
            extra = _json_copy(extra, "field 'extra'")
            files_raw = d.get("files")
            if not isinstance(files_raw, list) or not files_raw:
                raise ValueError("field 'files' must be a non-empty list")
            files: list[FileEntry] = []
            for i, f in enumerate(files_raw):
                f = _require_dict(f, f"files[{i}]")
                name, size, sha = _check_file_name(f.get("name")), f.get("size"), f.get("sha256")
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


@dataclass
class _Inspection:
    manifest: Manifest | None
    reason: str | None
    inode: int
    manifest_problem: bool = False
    #: The folder is an orphan: no manifest.json at all, or a valid manifest whose files are gone. Never made by
    #: a publish (which renames a complete folder), so `cleanup` removes it after its grace period.
    orphan: bool = False

    def error(self, text: str) -> StaleEngine:
        """ManifestError when the manifest itself is the problem, StaleEngine otherwise."""
        return (ManifestError if self.manifest_problem else StaleEngine)(f"{text}: {self.reason}")


def _cc_label(cc: str | None) -> str:
    if not cc:
        return ""
    return f" (sm{cc.replace('.', '')})" if re.fullmatch(r"\d+\.\d+", cc) else f" ({cc})"


def _describe(info: BackendInfo) -> str:
    return f"{info.name} {info.version} on {info.device}{_cc_label(info.compute_capability)}"


def stale_reason(key: EngineKey, current: BackendInfo | None) -> str | None:
    """Why an engine built under `key` must not be loaded under `current` (None: it may)."""
    if current is None:
        return None
    built = key.backend_info()
    if built == current:
        return None
    return f"built with {_describe(built)}; this machine has {_describe(current)}"


def _check_source(source: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint an engine was made from: {"name": str, "sha256": str | None, ...JSON extras}."""
    try:
        d = _json_copy(_require_dict(dict(source), "source_checkpoint"), "source_checkpoint")
        _check_str(d, "name", nonempty=False)
        _check_str(d, "sha256", optional=True, nonempty=False)
    except (TypeError, ValueError) as e:
        raise BuildError(f"source_checkpoint must be {{'name': str, 'sha256': str | None}}: {e}") from None
    return dict(d)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Heartbeat:
    """Touches paths (the held lock file, the temp folder) every `interval` seconds while a build runs, so other
    processes can tell it is alive: waiters by the mtimes changing, `cleanup` by the temp folder's age. Touching
    uses the file system's clock (utime with no time), never this host's."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.paths: list[Path] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdtrt-build-heartbeat", daemon=True)

    def add(self, path: Path) -> None:
        """Beat on `path` too, starting now."""
        self.paths.append(path)
        self._touch(path)

    @staticmethod
    def _touch(path: Path) -> None:
        try:
            os.utime(path)
        except OSError:  # gone (published, removed) or not ours to touch: the other paths still beat
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for path in list(self.paths):
                self._touch(path)

    def __enter__(self) -> _Heartbeat:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _Liveness:
    """What a waiter watches to tell whether the build it waits for is alive: the mtimes of the id's lock file
    and of its temp folders. Any change counts as a beat. The silence is timed on this process's monotonic
    clock, so skew between hosts' clocks (or a clock that jumps) cannot make a live build look dead."""

    def __init__(self, root: Path, lock_file: Path, engine_id: str) -> None:
        self.root, self.lock_file, self.prefix = root, lock_file, f".tmp-{engine_id}-"
        self.seen = self._observe()
        self.changed_at = time.monotonic()

    def _observe(self) -> dict[str, int]:
        seen: dict[str, int] = {}
        try:  # open + fstat, not stat: opening revalidates NFS's cached attributes (close-to-open consistency)
            fd = os.open(self.lock_file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            try:
                seen[""] = os.fstat(fd).st_mtime_ns
            finally:
                os.close(fd)
        except OSError:
            pass
        try:
            names = os.listdir(self.root)
        except OSError:
            names = []
        for name in names:
            if name.startswith(self.prefix):
                try:
                    seen[name] = os.lstat(self.root / name).st_mtime_ns
                except OSError:
                    pass
        return seen

    def silent_for(self) -> float:
        """Seconds since the last observed beat (or since watching began)."""
        seen = self._observe()
        now = time.monotonic()
        if seen != self.seen:
            self.seen, self.changed_at = seen, now
        return now - self.changed_at


class Registry:
    """The engine cache at `cache_dir`. Every path is made here, from validated ids only. Creating a Registry
    touches nothing on disk; folders are made when the first build needs them."""

    def __init__(
        self, cache_dir: str | os.PathLike[str], *, locking: bool = True, lease_s: float = DEFAULT_LEASE_S
    ) -> None:
        """`locking=False` skips the per-id flock (for file systems where it hangs); builds stay correct and may
        only duplicate work. `lease_s`: a build that waits for another one stops waiting once that one has shown
        no heartbeat for this long (builds beat every lease_s / 5)."""
        if not (isinstance(lease_s, (int, float)) and 0 < lease_s < float("inf")):
            raise ValueError(f"lease_s must be a positive number of seconds, got {lease_s!r}")
        self.root = Path(os.path.abspath(cache_dir))
        self.locking = locking
        self.lease_s = float(lease_s)

    # ---- paths -------------------------------------------------------------------------------------------
    def engine_dir(self, engine_id: str) -> Path:
        return self.root / validate_engine_id(engine_id)

    def manifest_path(self, engine_id: str) -> Path:
        return self.engine_dir(engine_id) / MANIFEST_NAME

    def lock_path(self, engine_id: str) -> Path:
        return self.root / ".locks" / f"{validate_engine_id(engine_id)}.lock"

    def _side_dir(self, kind: str, engine_id: str) -> Path:
        """A fresh dot-name next to the engines: hidden from list(), same file system, so renames are atomic."""
        validate_engine_id(engine_id)
        if kind == "tmp":
            return self.root / f".tmp-{engine_id}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return self.root / f".quarantine-{engine_id}-{stamp}-{secrets.token_hex(2)}"

    # ---- checks ------------------------------------------------------------------------------------------
    def _known_ids(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        return sorted(n for n in names if _ENGINE_DIR_RE.match(n) and ".." not in n)

    def _not_found(self, engine_id: str) -> EngineNotFound:
        known = self._known_ids()
        listing = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
        return EngineNotFound(f"no engine {engine_id!r} in {self.root}; known engines: {listing or 'none'}")

    def _inspect(self, engine_id: str, *, deep: bool) -> _Inspection:
        """Check one entry: manifest parses and matches the folder, every file is a regular file of the recorded
        size and (deep) sha256. Returns the reason instead of raising; raises EngineNotFound if absent."""
        d = self.engine_dir(engine_id)
        if not _ENGINE_DIR_RE.match(engine_id):  # e.g. an operator's "logs" folder: never an engine
            raise self._not_found(engine_id)
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            raise self._not_found(engine_id) from None
        if stat.S_ISLNK(st.st_mode):
            return _Inspection(None, "the engine folder is a symlink; engines must be real folders in the cache", 0)
        if not stat.S_ISDIR(st.st_mode):
            return _Inspection(None, "not a folder", st.st_ino)
        ino = st.st_ino
        try:
            raw = read_regular_file(d / MANIFEST_NAME, MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            reason = "no manifest.json (an incomplete folder, not made by sd-webui-trt)"
            return _Inspection(None, reason, ino, True, orphan=True)
        except OSError as e:
            return _Inspection(None, f"cannot read manifest.json: {e}", ino, True)
        if len(raw) > MAX_MANIFEST_BYTES:
            return _Inspection(None, f"manifest.json is larger than {MAX_MANIFEST_BYTES} bytes", ino, True)
        try:
            m = Manifest.from_json(raw)
        except ManifestError as e:
            return _Inspection(None, str(e), ino, True)
        if m.id != engine_id:
            reason = f"folder {engine_id} holds the manifest of {m.id} (renamed or copied by hand)"
            return _Inspection(m, reason, ino, True)
        for entry in m.files:
            p = d / entry.name
            try:
                fst = os.lstat(p)
            except FileNotFoundError:
                return _Inspection(m, f"{entry.name} is missing", ino, orphan=True)
            except OSError as e:
                return _Inspection(m, f"cannot read {entry.name}: {e}", ino)
            if not stat.S_ISREG(fst.st_mode):
                return _Inspection(m, f"{entry.name} is not a regular file (symlink or folder)", ino)
            if fst.st_size != entry.size:
                return _Inspection(
                    m,
                    f"{entry.name} is {fst.st_size} bytes but the manifest says size {entry.size} (truncated "
                    "or replaced)",
                    ino,
                )
            if deep:
                try:
                    digest, _ = sha256_and_size(p)
                except OSError as e:
                    return _Inspection(m, f"cannot read {entry.name}: {e}", ino)
                if digest != entry.sha256:
                    return _Inspection(
                        m,
                        f"{entry.name} has sha256 {digest[:16]}... but the manifest says {entry.sha256[:16]}... "
                        "(corrupted or replaced)",
                        ino,
                    )
        return _Inspection(m, None, ino)

    def get(self, engine_id: str) -> Manifest:
        """The manifest of a present, intact-looking engine (sizes checked, not hashes). Raises EngineNotFound
        (listing known ids) or StaleEngine."""
        r = self._inspect(engine_id, deep=False)
        if r.reason is not None or r.manifest is None:
            raise r.error(f"engine {engine_id}")
        return r.manifest

    def status(self, engine_id: str, current: BackendInfo | None = None) -> EngineStatus:
        """Cheap check (no hashing) plus staleness against the running backend. Raises EngineNotFound only."""
        r = self._inspect(engine_id, deep=False)
        reason, stale = r.reason, False
        if reason is None and r.manifest is not None:
            reason = stale_reason(r.manifest.key, current)
            stale = reason is not None
        return EngineStatus(engine_id, r.manifest, reason is None, reason, stale)

    def verify(self, engine_id: str, current: BackendInfo | None = None) -> Manifest:
        """Full check, including the sha256 of every file (streamed): what loading calls before any
        deserialization. Raises EngineNotFound or StaleEngine with the reason. Never moves or deletes."""
        r = self._inspect(engine_id, deep=True)
        if r.reason is not None or r.manifest is None:
            raise r.error(f"engine {engine_id} must not be loaded")
        reason = stale_reason(r.manifest.key, current)
        if reason is not None:
            raise StaleEngine(f"engine {engine_id} is stale: {reason}; rebuild it for this machine")
        return r.manifest

    # ---- changes -----------------------------------------------------------------------------------------
    def delete(self, engine_id: str) -> None:
        """Remove an engine: rename it to a temp name first, so readers see all of it or none of it. Open files
        stay readable on POSIX; what rmtree cannot remove now (NFS silly-renames) `cleanup` removes later."""
        d = self.engine_dir(engine_id)
        if not _ENGINE_DIR_RE.match(engine_id) or not os.path.lexists(d):
            raise self._not_found(engine_id)
        gone = self._side_dir("tmp", engine_id)
        try:
            os.rename(d, gone)
        except FileNotFoundError:
            raise self._not_found(engine_id) from None
        if gone.is_symlink() or not gone.is_dir():
            gone.unlink()  # a symlink or stray file: remove the entry itself, never what it points to
        else:
            shutil.rmtree(gone, ignore_errors=True)
        fsync_dir(self.root)

    def quarantine(self, engine_id: str) -> Path:
        """Move an engine aside (kept for inspection, never loaded, not removed by cleanup). Returns where."""
        r = self._inspect(engine_id, deep=False)  # raises EngineNotFound
        moved = self._quarantine_if_same(engine_id, r.inode)
        if moved is None:
            raise self._not_found(engine_id)
        return moved

    def _quarantine_if_same(self, engine_id: str, inode: int) -> Path | None:
        """Rename the entry aside unless it was replaced since we inspected it (another process may have just
        published a good one; without flock that race is real). Moving a good one is harmless: it is rebuilt."""
        d = self.engine_dir(engine_id)
        try:
            if inode and os.lstat(d).st_ino != inode:
                return None
            target = self._side_dir("quarantine", engine_id)
            os.rename(d, target)
        except FileNotFoundError:
            return None
        fsync_dir(self.root)
        return target

    def _existing(self, engine_id: str) -> Manifest | None:
        """A published engine that passes the full check, else None. A corrupt one is quarantined, so build()
        never returns (or keeps tripping over) a damaged engine."""
        try:
            r = self._inspect(engine_id, deep=True)
        except EngineNotFound:
            return None
        if r.reason is None and r.manifest is not None:
            return r.manifest
        self._quarantine_if_same(engine_id, r.inode)
        return None

    def _looks_published(self, engine_id: str) -> bool:
        try:
            return self._inspect(engine_id, deep=False).reason is None
        except EngineNotFound:
            return False

    def writable(self) -> bool:
        """Whether this process can build into the cache: a cheap probe (make and remove one empty folder; for a
        cache folder that does not exist yet, whether its nearest existing parent is writable). Creates nothing
        that outlives the call. Builds check the same before waiting on a lock or running the backend."""
        if not os.path.isdir(self.root):
            parent = self.root.parent
            while not os.path.isdir(parent) and parent != parent.parent:
                parent = parent.parent
            return os.access(parent, os.W_OK | os.X_OK)
        return self._probe()[0] is None

    def _probe(self) -> tuple[OSError | None, float | None]:
        """mkdir + rmdir of a fresh `.tmp-probe-...` folder in the cache. Returns the error (None: writable) and the
        folder's mtime: the file system's clock ("now" as the heartbeats of other hosts' builds are stamped)."""
        probe = self._side_dir("tmp", "probe")
        try:
            os.mkdir(probe)
        except OSError as e:
            return e, None
        try:
            return None, os.lstat(probe).st_mtime
        except OSError:
            return None, None
        finally:
            try:
                os.rmdir(probe)
            except OSError:
                pass  # a `.tmp-` name: the next cleanup removes it

    def _require_writable(self) -> None:
        """Refuse a build up front (before waiting for a lock or running the backend) if nothing can be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno in _NOT_WRITABLE:
                raise self._not_writable(e) from e
            raise
        error, _ = self._probe()
        if error is not None:
            if error.errno in _NOT_WRITABLE:
                raise self._not_writable(error) from error
            raise error

    def _not_writable(self, e: OSError) -> CacheNotWritable:
        return CacheNotWritable(
            f"the engine cache {self.root} is not writable ({e.strerror or e}): engines already in it are still "
            f"served, but building one needs write access; make the folder writable for this user or choose a "
            f"writable cache folder (the extension's setting or {CACHE_ENV})"
        )

    def _build_error(self, engine_id: str, e: Exception) -> BuildError:
        """A BuildError naming the cause, with what to do for the common storage failures."""
        if isinstance(e, OSError) and e.errno in _NOT_WRITABLE:
            return self._not_writable(e)
        hint = ""
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            hint = f"; the disk holding the engine cache {self.root} is full (or over quota): free space, build again"
        elif isinstance(e, OSError) and e.errno == errno.EIO:
            hint = f"; the storage holding {self.root} reported an I/O error: check the disk or network mount"
        return BuildError(f"building engine {engine_id} failed: {type(e).__name__}: {e}{hint}; nothing was published")

    def build(
        self,
        key: EngineKey,
        source_checkpoint: Mapping[str, Any],
        produce: Callable[[Path], BuildResult],
        *,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
        progress: ProgressCallback | None = None,
    ) -> Manifest:
        """Return the engine for `key`, building it with `produce(temp_dir)` if no intact one exists.

        produce writes the engine files into the empty private folder it is given and returns a BuildResult
        listing them. The registry then fsyncs and hashes them, writes manifest.json, and publishes the folder
        with one rename. If another process published first, its (verified) engine is returned. On any error,
        KeyboardInterrupt included, the temp folder is removed and nothing appears under the final name;
        exceptions that are not SdtrtError come out as BuildError with the cause chained (CacheNotWritable when
        the cache is read-only: then nothing is waited for or run).

        While another process builds the same id (it holds the id's lock), this waits for it: at most
        `lock_timeout` seconds, and at most one lease after that build stops showing a heartbeat (its host died or
        hung with the lock held); then it builds itself. Either way correctness does not depend on the lock.
        """
        report: ProgressCallback = progress or (lambda phase, fraction: None)
        engine_id = key.engine_id()
        source = _check_source(source_checkpoint)
        try:
            found = self._existing(engine_id)
            if found is not None:
                return found
            self._require_writable()
            lock = FileLock(self.lock_path(engine_id), max_poll_s=min(1.0, self.lease_s / 4)) if self.locking else None
            try:
                if lock is not None:
                    self._wait_for_lock(lock, engine_id, lock_timeout, report)
                with _Heartbeat(self.lease_s / 5) as beat:
                    if lock is not None and lock.acquired:
                        beat.add(lock.path)
                    found = self._existing(engine_id)  # re-check: the holder we waited for may have published it
                    if found is not None:
                        return found
                    return self._build_new(key, engine_id, source, produce, report, beat)
            finally:
                if lock is not None:
                    lock.release()
        except SdtrtError:  # the backend's own errors (ExportError, BackendUnavailable...) keep their type
            raise
        except Exception as e:
            raise self._build_error(engine_id, e) from e

    def _wait_for_lock(self, lock: FileLock, engine_id: str, timeout: float, report: ProgressCallback) -> None:
        """Take the id's lock, or stop waiting when the engine appears, when the holder has been silent for a
        lease, or after `timeout`. Only avoids duplicate work: the caller builds in every case but the first."""
        live = _Liveness(self.root, lock.path, engine_id)
        last = [0.0]
        silent = [False]

        def on_wait() -> bool:
            if time.monotonic() - last[0] >= 1.0:
                last[0] = time.monotonic()
                report(f"waiting for another process building {engine_id}", 0.0)
            if self._looks_published(engine_id):
                return True
            if live.silent_for() >= self.lease_s:
                silent[0] = True
                return True
            return False

        if not lock.acquire(timeout, on_wait=on_wait) and silent[0]:
            report(
                f"the process holding the lock on {engine_id} has shown no heartbeat for {self.lease_s:g} s (its host "
                "died or it hangs); building here instead",
                0.0,
            )

    def _build_new(
        self,
        key: EngineKey,
        engine_id: str,
        source: dict[str, Any],
        produce: Callable[[Path], BuildResult],
        report: ProgressCallback,
        beat: _Heartbeat,
    ) -> Manifest:
        """Build into a fresh temp folder and publish it; the temp folder never outlives this call."""
        from sdtrt import __version__

        tmp = self._side_dir("tmp", engine_id)
        start = time.monotonic()
        try:
            os.mkdir(tmp)
            beat.add(tmp)
            result = produce(tmp)
            if not isinstance(result, BuildResult):
                raise BuildError(f"the backend returned {type(result).__name__}, not a BuildResult")
            if (result.weights, result.refit_mode) != (key.weights, key.refit_mode):
                raise BuildError(
                    f"the backend built weights={result.weights!r}, refit_mode={result.refit_mode!r} but the key "
                    f"asks for weights={key.weights!r}, refit_mode={key.refit_mode!r}; nothing was published"
                )
            report("checking engine files", 0.0)
            files = self._seal(tmp, result.files)
            manifest = Manifest(
                id=engine_id,
                key=key,
                files=files,
                source_checkpoint=source,
                created=_utc_now(),
                build_seconds=round(time.monotonic() - start, 3),
                sdtrt_version=__version__,
                extra=_json_copy(_require_dict(dict(result.extra), "BuildResult.extra"), "BuildResult.extra"),
            )
            text = manifest.to_json()
            try:
                Manifest.from_json(text)  # never publish what we could not read back
            except ManifestError as e:
                raise BuildError(f"the manifest of {engine_id} does not read back: {e}") from e
            # Written only now that every engine file is fsynced (in _seal): a manifest never vouches for bytes
            # that a crash could still lose. Then the folder's entries are made durable before it is published.
            atomic_write_bytes(tmp / MANIFEST_NAME, text.encode())
            fsync_dir(tmp)
            published = self._publish(tmp, engine_id, manifest)
            report("published", 1.0)
            return published
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def _seal(self, tmp: Path, names: Iterable[object]) -> list[FileEntry]:
        """Make the listed files durable and describe them; remove anything unlisted so the published folder
        holds exactly what the manifest vouches for."""
        listed = [_check_file_name(n) for n in names]
        if not listed or len(set(listed)) != len(listed):
            raise BuildError(f"the backend must list each engine file once, got {listed!r}")
        entries = []
        for name in listed:
            p = tmp / name
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                raise BuildError(f"the backend listed {name} but did not write it") from None
            if not stat.S_ISREG(st.st_mode):
                raise BuildError(f"{name} is not a regular file (symlink or folder); refusing to publish it")
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            digest, size = sha256_and_size(p)
            entries.append(FileEntry(name, size, digest))
        for extra in set(os.listdir(tmp)) - set(listed):
            path = tmp / extra
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        return entries

    def _publish(self, tmp: Path, engine_id: str, manifest: Manifest) -> Manifest:
        """rename(tmp, final). A non-empty final folder makes rename fail: then another process won, and its
        engine is used if intact; a corrupt one is quarantined and the rename retried. An existing engine is
        never overwritten."""
        final = self.engine_dir(engine_id)
        for _ in range(3):
            try:
                os.rename(tmp, final)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                winner = self._existing(engine_id)
                if winner is not None:
                    return winner
                continue
            try:
                fsync_dir(self.root)
            except OSError as e:
                raise BuildError(
                    f"engine {engine_id} is published and complete, but syncing the cache folder {self.root} "
                    f"failed ({type(e).__name__}: {e}): it may be missing after a power loss; check the storage"
                ) from e
            return manifest
        raise BuildError(f"could not publish {engine_id}: {final} keeps being replaced by invalid content")

    def _fs_now(self) -> float:
        """The file system's clock, from a probe folder's mtime (what heartbeats of any host are stamped with);
        this host's clock when the cache cannot be written."""
        _, stamp = self._probe()
        return time.time() if stamp is None else stamp

    def cleanup(self, max_age_s: float = 3600.0) -> list[str]:
        """One garbage-collection pass. Returns the names removed. Removes:

        - temp folders of builds (or deletes) that died: untouched for `max_age_s` (a live build touches its
          folder every lease / 5), whose process is gone when it ran on this host, and whose id lock is not held;
        - orphan engine folders, older than `max_age_s`: no manifest.json ("orphan plan"), or a valid manifest
          whose files are missing ("orphan manifest"). Neither is ever served; a publish never makes one.

        Ages are measured against the file system's clock, not this host's, so a skewed clock cannot make a live
        build look old. Quarantined engines, damaged engines (build() quarantines them), lock files and anything
        not named like an engine are kept. Never raises for a file it cannot remove (read-only cache)."""
        try:
            names = os.listdir(self.root)
        except (FileNotFoundError, NotADirectoryError):
            return []
        removed: list[str] = []
        now, host = self._fs_now(), _host()
        for name in sorted(names):
            m = _TMP_RE.match(name)
            if m is None:
                if _ENGINE_DIR_RE.match(name) and ".." not in name and self._remove_orphan(name, now, max_age_s):
                    removed.append(name)
                continue
            path = self.root / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if now - st.st_mtime < max_age_s:
                continue
            if m["host"] == host and _pid_alive(int(m["pid"])):
                continue
            if self._lock_held(m["id"]):
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    path.unlink()
                except OSError:
                    pass
            if not os.path.lexists(path):
                removed.append(name)
        if removed:
            try:
                fsync_dir(self.root)
            except OSError:
                pass  # the removals happened; durability of a removal is not worth failing the pass for
        return removed

    def _remove_orphan(self, engine_id: str, now: float, grace_s: float) -> bool:
        """Remove an orphan engine folder once nothing in it changed for `grace_s` (mtime and ctime of the folder
        and its entries: a copy in progress, even one preserving mtimes, keeps the ctime fresh)."""
        try:
            r = self._inspect(engine_id, deep=False)
        except (EngineNotFound, OSError):
            return False
        if not r.orphan or not r.inode:
            return False
        d = self.engine_dir(engine_id)
        try:
            newest = max(os.lstat(d).st_mtime, os.lstat(d).st_ctime)
            with os.scandir(d) as it:
                for entry in it:
                    est = entry.stat(follow_symlinks=False)
                    newest = max(newest, est.st_mtime, est.st_ctime)
        except OSError:
            return False
        if now - newest < grace_s:
            return False
        gone = self._side_dir("tmp", engine_id)
        try:
            if os.lstat(d).st_ino != r.inode:
                return False
            os.rename(d, gone)  # out of the engine namespace in one step; a crash leaves a `.tmp-` for next time
        except OSError:
            return False
        try:
            moved = os.lstat(gone).st_ino
        except OSError:
            moved = r.inode
        if moved != r.inode:  # a fresh publish slipped in between the check and the rename: put it back
            try:
                os.rename(gone, d)
                return False
            except OSError:
                pass  # the name was taken again meanwhile; what we moved is garbage now either way
        shutil.rmtree(gone, ignore_errors=True)  # leftovers keep a `.tmp-` name: the next pass removes them
        return True

    def _lock_held(self, engine_id: str) -> bool:
        try:
            lock_file = self.lock_path(engine_id)
        except InvalidEngineId:
            return False
        if not self.locking or not lock_file.exists():
            return False
        lock = FileLock(lock_file)
        try:
            return not lock.acquire(0) and not lock.unsupported
        finally:
            lock.release()

    def list(self, current: BackendInfo | None = None) -> list[EngineStatus]:
        """Every engine folder with a cheap check (manifest valid, files present with recorded sizes; no
        hashing) and, given `current`, staleness. A damaged entry is reported, never raised; dot-names (temp,
        quarantine, locks) and unrelated files are skipped. A missing cache folder is an empty list."""
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        out: list[EngineStatus] = []
        for entry in entries:
            if not _ENGINE_DIR_RE.match(entry.name) or ".." in entry.name:
                continue
            try:
                if not entry.is_dir(follow_symlinks=False) and not entry.is_symlink():
                    continue
                out.append(self.status(entry.name, current))
            except EngineNotFound:
                continue  # deleted while we looked
            except Exception as e:  # noqa: BLE001 - one unreadable entry must not hide the others
                out.append(EngineStatus(entry.name, None, False, f"cannot inspect: {type(e).__name__}: {e}"))
        return out
