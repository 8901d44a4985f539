"""Publishing an engine into the cache: build into a private temp folder, seal (fsync, hash, manifest), then one
rename to the final name; a corrupt engine found on the way is quarantined, a lock only avoids duplicate work.
Why it is shaped this way: see sdtrt.storage.registry."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdtrt.engine_types import BuildResult, ProgressCallback
from sdtrt.errors import BuildError, EngineNotFound, ManifestError, SdtrtError
from sdtrt.fsutil import FileLock, atomic_write_bytes, fsync_dir, read_regular_file, rename_checked, sha256_and_size
from sdtrt.storage.inspection import inspect
from sdtrt.storage.key import EngineKey, check_str, json_copy, require_dict
from sdtrt.storage.layout import NOT_WRITABLE, CacheLayout, SideKind
from sdtrt.storage.lease import DEFAULT_LOCK_TIMEOUT_S, Heartbeat, Liveness
from sdtrt.storage.manifest import MANIFEST_NAME, FileEntry, Manifest, check_file_name

log = logging.getLogger(__name__)

#: errno values that mean the disk is full.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


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




class Publisher:
    """Builds and publishes engines into one cache layout (the registry's `build`)."""

    def __init__(self, layout: CacheLayout) -> None:
        self.layout = layout

    def _existing(self, engine_id: str) -> Manifest | None:
        """A published engine that passes the full check, else None. A corrupt one is quarantined, so build()
        never returns (or keeps tripping over) a damaged engine."""
        try:
            r = inspect(self.layout, engine_id, deep=True)
        except EngineNotFound:
            return None
        if r.reason is None and r.manifest is not None:
            return r.manifest
        self.layout.quarantine_if_same(engine_id, r.inode)
        return None

    def _looks_published(self, engine_id: str) -> bool:
        try:
            return inspect(self.layout, engine_id, deep=False).reason is None
        except EngineNotFound:
            return False


    def _build_error(self, engine_id: str, e: Exception) -> BuildError:
        """A BuildError naming the cause, with what to do for the common storage failures."""
        if isinstance(e, OSError) and e.errno in NOT_WRITABLE:
            return self.layout.not_writable(e)
        hint = ""
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            hint = f"; the disk holding the engine cache {self.layout.root} is full (or over quota): free space, build again"
        elif isinstance(e, OSError) and e.errno == errno.EIO:
            hint = f"; the storage holding {self.layout.root} reported an I/O error: check the disk or network mount"
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
            self.layout.require_writable()
            lock = FileLock(self.layout.lock_path(engine_id), max_poll_s=min(1.0, self.layout.lease_s / 4)) if self.layout.locking else None
            try:
                if lock is not None:
                    self._wait_for_lock(lock, engine_id, lock_timeout, report)
                with Heartbeat(self.layout.lease_s / 5) as beat:
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
        live = Liveness(self.layout.root, lock.path, engine_id)
        last = [0.0]
        silent = [False]

        def on_wait() -> bool:
            if time.monotonic() - last[0] >= 1.0:
                last[0] = time.monotonic()
                report(f"waiting for another process building {engine_id}", 0.0)
            if self._looks_published(engine_id):
                return True
            if live.silent_for() >= self.layout.lease_s:
                silent[0] = True
                return True
            return False

        if not lock.acquire(timeout, on_wait=on_wait) and silent[0]:
            report(
                f"the process holding the lock on {engine_id} has shown no heartbeat for {self.layout.lease_s:g} s (its host "
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

        tmp = self.layout.side_dir(SideKind.TMP, engine_id)
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
        """rename(tmp, final), then verify: the final folder must hold our manifest. A non-empty final folder makes
        rename fail: then another process won, and its engine is used if intact; a corrupt one is quarantined and
        the rename retried. An error from a rename that did happen (NFS) is recognised by our manifest under the
        final name. An existing engine is never overwritten."""
        final = self.layout.engine_dir(engine_id)
        ours = manifest.to_json().encode()

        def landed() -> bool:
            try:
                return read_regular_file(final / MANIFEST_NAME, len(ours) + 1) == ours
            except OSError:
                return False

        for _ in range(3):
            try:
                if rename_checked(tmp, final, landed):
                    log.warning("sdtrt: the engine cache's file system reported the rename of engine %s as failed "
                                "although it happened (NFS-like client caching); the engine was checked and is "
                                "used", engine_id)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                winner = self._existing(engine_id)
                if winner is not None:
                    return winner
                continue
            if not landed():  # renamed, yet the final name does not show our engine: trust what is there, if sound
                winner = self._existing(engine_id)
                if winner is not None:
                    return winner
                raise BuildError(f"{engine_id} was renamed into place but {final} does not hold it afterwards: the "
                                 f"storage under {self.layout.root} does not keep renames; nothing was published")
            try:
                fsync_dir(self.layout.root)
            except OSError as e:
                raise BuildError(
                    f"engine {engine_id} is published and complete, but syncing the cache folder {self.layout.root} "
                    f"failed ({type(e).__name__}: {e}): it may be missing after a power loss; check the storage"
                ) from e
            return manifest
        raise BuildError(f"could not publish {engine_id}: {final} keeps being replaced by invalid content")
