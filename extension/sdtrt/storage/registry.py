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

Its parts live beside it: sdtrt.storage.key (keys and ids), sdtrt.storage.manifest (what a published engine vouches
for), sdtrt.storage.lease (heartbeat and liveness of builds) and sdtrt.storage.cleanup (garbage collection).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdtrt.storage import cleanup as cache_cleanup
from sdtrt.constants import CACHE_ENV
from sdtrt.storage.key import ENGINE_DIR_RE, EngineKey, check_str, json_copy, require_dict, validate_engine_id
from sdtrt.engine_types import BackendInfo, BuildResult, ProgressCallback
from sdtrt.errors import BuildError, CacheNotWritable, EngineNotFound, ManifestError, SdtrtError, StaleEngine
from sdtrt.fsutil import FileLock, atomic_write_bytes, fsync_dir, read_regular_file, sha256_and_size
from sdtrt.storage.lease import DEFAULT_LEASE_S, DEFAULT_LOCK_TIMEOUT_S, Heartbeat, Liveness, host_name
from sdtrt.storage.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    EngineStatus,
    FileEntry,
    Manifest,
    check_file_name,
    stale_reason,
)

#: errno values that mean "this cache is read-only for us" (CacheNotWritable) or "the disk is full".
_NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


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



def _check_source(source: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint an engine was made from: {"name": str, "sha256": str | None, ...JSON extras}."""
    try:
        d = json_copy(require_dict(dict(source), "source_checkpoint"), "source_checkpoint")
        check_str(d, "name", nonempty=False)
        check_str(d, "sha256", optional=True, nonempty=False)
    except (TypeError, ValueError) as e:
        raise BuildError(f"source_checkpoint must be {{'name': str, 'sha256': str | None}}: {e}") from None
    return dict(d)



def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")



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
            return self.root / f".tmp-{engine_id}-{host_name()}-{os.getpid()}-{secrets.token_hex(4)}"
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return self.root / f".quarantine-{engine_id}-{stamp}-{secrets.token_hex(2)}"

    # ---- checks ------------------------------------------------------------------------------------------
    def _known_ids(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        return sorted(n for n in names if ENGINE_DIR_RE.match(n) and ".." not in n)

    def _not_found(self, engine_id: str) -> EngineNotFound:
        known = self._known_ids()
        listing = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
        return EngineNotFound(f"no engine {engine_id!r} in {self.root}; known engines: {listing or 'none'}")

    def _inspect(self, engine_id: str, *, deep: bool) -> _Inspection:
        """Check one entry: manifest parses and matches the folder, every file is a regular file of the recorded
        size and (deep) sha256. Returns the reason instead of raising; raises EngineNotFound if absent."""
        d = self.engine_dir(engine_id)
        if not ENGINE_DIR_RE.match(engine_id):  # e.g. an operator's "logs" folder: never an engine
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
        if not ENGINE_DIR_RE.match(engine_id) or not os.path.lexists(d):
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
                with Heartbeat(self.lease_s / 5) as beat:
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
        live = Liveness(self.root, lock.path, engine_id)
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
        beat: Heartbeat,
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
                    f"the backend built weights={str(result.weights)!r}, refit_mode={str(result.refit_mode)!r} but "
                    f"the key asks for weights={key.weights.value!r}, refit_mode={key.refit_mode.value!r}; nothing "
                    "was published"
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
                extra=json_copy(require_dict(dict(result.extra), "BuildResult.extra"), "BuildResult.extra"),
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
        listed = [check_file_name(n) for n in names]
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

    def cleanup(self, max_age_s: float = 3600.0) -> list[str]:
        """One garbage-collection pass; returns the names removed (see sdtrt.storage.cleanup.cleanup)."""
        return cache_cleanup.cleanup(self, max_age_s)

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
