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

Its parts live beside it: key (keys and ids), manifest (what a published engine vouches for), layout (paths,
writability), inspection (checking one folder), publish (build and publish), lease (heartbeat and liveness of
builds) and cleanup (garbage collection). The Registry is the one object the rest of sd-webui-trt talks to.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sdtrt.engine_types import BackendInfo, BuildResult, ProgressCallback
from sdtrt.errors import EngineNotFound, StaleEngine
from sdtrt.fsutil import fsync_dir, rename_checked
from sdtrt.storage import cleanup as cache_cleanup
from sdtrt.storage.inspection import inspect
from sdtrt.storage.key import ENGINE_DIR_RE, EngineKey
from sdtrt.storage.layout import CacheLayout, SideKind
from sdtrt.storage.lease import DEFAULT_LEASE_S, DEFAULT_LOCK_TIMEOUT_S
from sdtrt.storage.manifest import EngineStatus, Manifest, stale_reason
from sdtrt.storage.publish import Publisher


class Registry:
    """The engine cache at `cache_dir`. Every path is made by its layout, from validated ids only. Creating a Registry
    touches nothing on disk; folders are made when the first build needs them."""

    def __init__(
        self, cache_dir: str | os.PathLike[str], *, locking: bool = True, lease_s: float = DEFAULT_LEASE_S
    ) -> None:
        """`locking=False` skips the per-id flock (for file systems where it hangs); builds stay correct and may
        only duplicate work. `lease_s`: a build that waits for another one stops waiting once that one has shown
        no heartbeat for this long (builds beat every lease_s / 5)."""
        self.layout = CacheLayout.at(cache_dir, locking=locking, lease_s=lease_s)
        self._publisher = Publisher(self.layout)

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def locking(self) -> bool:
        return self.layout.locking

    @property
    def lease_s(self) -> float:
        return self.layout.lease_s

    def engine_dir(self, engine_id: str) -> Path:
        return self.layout.engine_dir(engine_id)

    def manifest_path(self, engine_id: str) -> Path:
        return self.layout.manifest_path(engine_id)

    def lock_path(self, engine_id: str) -> Path:
        return self.layout.lock_path(engine_id)

    def writable(self) -> bool:
        """Whether this process can build into the cache (see CacheLayout.writable); builds check the same before
        waiting on a lock or running the backend."""
        return self.layout.writable()

    def require_writable(self) -> None:
        """Raise CacheNotWritable (read-only, no permission) or CacheCannotRename (a file system that cannot publish
        by rename) unless builds can publish into the cache; creates the cache folder when missing."""
        self.layout.require_writable()

    # ---- checks ------------------------------------------------------------------------------------------
    def get(self, engine_id: str) -> Manifest:
        """The manifest of a present, intact-looking engine (sizes checked, not hashes). Raises EngineNotFound
        (listing known ids) or StaleEngine."""
        r = inspect(self.layout, engine_id, deep=False)
        if r.reason is not None or r.manifest is None:
            raise r.error(f"engine {engine_id}")
        return r.manifest

    def status(self, engine_id: str, current: BackendInfo | None = None) -> EngineStatus:
        """Cheap check (no hashing) plus staleness against the running backend. Raises EngineNotFound only."""
        r = inspect(self.layout, engine_id, deep=False)
        reason, stale = r.reason, False
        if reason is None and r.manifest is not None:
            reason = stale_reason(r.manifest.key, current)
            stale = reason is not None
        return EngineStatus(engine_id, r.manifest, reason is None, reason, stale)

    def verify(self, engine_id: str, current: BackendInfo | None = None) -> Manifest:
        """Full check, including the sha256 of every file (streamed): what loading calls before any
        deserialization. Raises EngineNotFound or StaleEngine with the reason. Never moves or deletes."""
        r = inspect(self.layout, engine_id, deep=True)
        if r.reason is not None or r.manifest is None:
            raise r.error(f"engine {engine_id} must not be loaded")
        reason = stale_reason(r.manifest.key, current)
        if reason is not None:
            raise StaleEngine(f"engine {engine_id} is stale: {reason}; rebuild it for this machine")
        return r.manifest

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
            if not ENGINE_DIR_RE.match(entry.name) or ".." in entry.name:
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

    # ---- changes -----------------------------------------------------------------------------------------
    def build(
        self,
        key: EngineKey,
        source_checkpoint: Mapping[str, Any],
        produce: Callable[[Path], BuildResult],
        *,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
        progress: ProgressCallback | None = None,
    ) -> Manifest:
        """Return the engine for `key`, building it with `produce(temp_dir)` if no intact one exists (see
        Publisher.build: published by one rename of a sealed temp folder; waits for another builder of the same id
        at most `lock_timeout`, and at most one lease after it stops showing a heartbeat)."""
        return self._publisher.build(key, source_checkpoint, produce, lock_timeout=lock_timeout, progress=progress)

    def delete(self, engine_id: str) -> None:
        """Remove an engine: rename it to a temp name first, so readers see all of it or none of it. Open files
        stay readable on POSIX; what rmtree cannot remove now (NFS silly-renames) `cleanup` removes later."""
        d = self.engine_dir(engine_id)
        if not ENGINE_DIR_RE.match(engine_id) or not os.path.lexists(d):
            raise self.layout.not_found(engine_id)
        gone = self.layout.side_dir(SideKind.TMP, engine_id)
        try:
            rename_checked(d, gone, lambda: os.path.lexists(gone))  # a unique name: there means it happened
        except FileNotFoundError:
            raise self.layout.not_found(engine_id) from None
        if gone.is_symlink() or not gone.is_dir():
            gone.unlink()  # a symlink or stray file: remove the entry itself, never what it points to
        else:
            shutil.rmtree(gone, ignore_errors=True)
        fsync_dir(self.root)

    def quarantine(self, engine_id: str) -> Path:
        """Move an engine aside (kept for inspection, never loaded, not removed by cleanup). Returns where."""
        r = inspect(self.layout, engine_id, deep=False)  # raises EngineNotFound
        moved = self.layout.quarantine_if_same(engine_id, r.inode)
        if moved is None:
            raise self.layout.not_found(engine_id)
        return moved

    def cleanup(self, max_age_s: float = 3600.0) -> list[str]:
        """One garbage-collection pass; returns the names removed (see sdtrt.storage.cleanup.cleanup)."""
        return cache_cleanup.cleanup(self.layout, max_age_s)
