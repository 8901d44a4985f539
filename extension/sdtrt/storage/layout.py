"""Where everything of an engine cache lives, and the few facts about its folder that every part needs: paths made
from validated ids only, fresh side names (temp, quarantine) on the same file system, whether it can be written, and
the file system's clock. Creating a CacheLayout touches nothing on disk."""

from __future__ import annotations

import errno
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from sdtrt.constants import CACHE_ENV
from sdtrt.errors import CacheCannotRename, CacheNotWritable, EngineNotFound
from sdtrt.fsutil import fsync_dir, rename_checked
from sdtrt.storage.key import ENGINE_DIR_RE, validate_engine_id
from sdtrt.storage.lease import DEFAULT_LEASE_S, host_name
from sdtrt.storage.manifest import MANIFEST_NAME

#: errno values that mean "this cache is read-only for us" (CacheNotWritable).
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


class CannotRename(OSError):
    """The probe's rename failed: this file system cannot publish by rename."""


class SideKind(Enum):
    """The dot-names next to the engines: hidden from listings, on the same file system (renames are atomic)."""

    TMP = "tmp"  # a build, delete or probe in progress (or what a killed one left: cleanup removes it)
    QUARANTINE = "quarantine"  # a damaged engine kept for inspection, never loaded, never removed by cleanup


@dataclass(frozen=True)
class CacheLayout:
    """The engine cache at `root`. `locking=False` skips the per-id flock (file systems where it hangs); `lease_s`:
    a build that waits for another stops waiting once that one has shown no heartbeat for this long."""

    root: Path
    locking: bool = True
    lease_s: float = DEFAULT_LEASE_S

    @classmethod
    def at(cls, cache_dir: str | os.PathLike[str], *, locking: bool = True,
           lease_s: float = DEFAULT_LEASE_S) -> CacheLayout:
        if not (isinstance(lease_s, (int, float)) and 0 < lease_s < float("inf")):
            raise ValueError(f"lease_s must be a positive number of seconds, got {lease_s!r}")
        return cls(Path(os.path.abspath(cache_dir)), locking, float(lease_s))

    # ---- paths -------------------------------------------------------------------------------------------
    def engine_dir(self, engine_id: str) -> Path:
        return self.root / validate_engine_id(engine_id)

    def manifest_path(self, engine_id: str) -> Path:
        return self.engine_dir(engine_id) / MANIFEST_NAME

    def lock_path(self, engine_id: str) -> Path:
        return self.root / ".locks" / f"{validate_engine_id(engine_id)}.lock"

    def side_dir(self, kind: SideKind, engine_id: str) -> Path:
        """A fresh dot-name next to the engines for `engine_id`."""
        validate_engine_id(engine_id)
        if kind is SideKind.TMP:
            return self.root / f".tmp-{engine_id}-{host_name()}-{os.getpid()}-{secrets.token_hex(4)}"
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return self.root / f".quarantine-{engine_id}-{stamp}-{secrets.token_hex(2)}"

    # ---- what is there -----------------------------------------------------------------------------------
    def known_ids(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        return sorted(n for n in names if ENGINE_DIR_RE.match(n) and ".." not in n)

    def not_found(self, engine_id: str) -> EngineNotFound:
        known = self.known_ids()
        listing = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
        return EngineNotFound(f"no engine {engine_id!r} in {self.root}; known engines: {listing or 'none'}")

    def quarantine_if_same(self, engine_id: str, inode: int) -> Path | None:
        """Rename the entry aside unless it was replaced since it was inspected (another process may have just
        published a good one; without flock that race is real). Moving a good one is harmless: it is rebuilt."""
        d = self.engine_dir(engine_id)
        try:
            if inode and os.lstat(d).st_ino != inode:
                return None
            target = self.side_dir(SideKind.QUARANTINE, engine_id)
            rename_checked(d, target, lambda: os.path.lexists(target))
        except FileNotFoundError:
            return None
        fsync_dir(self.root)
        return target

    # ---- writability and the file system's clock ----------------------------------------------------------
    def probe(self) -> tuple[OSError | None, float | None]:
        """mkdir of a fresh `.tmp-probe-...` folder in the cache, a rename of it to another fresh name, rmdir.
        Returns the error (None: builds can publish here; a failed rename comes back as CannotRename) and the
        folder's mtime: the file system's clock ("now" as the heartbeats of other hosts' builds are stamped)."""
        probe = self.side_dir(SideKind.TMP, "probe")
        try:
            os.mkdir(probe)
        except OSError as e:
            return e, None
        moved = self.side_dir(SideKind.TMP, "probe")
        try:
            try:
                mtime = os.lstat(probe).st_mtime
            except OSError:
                mtime = None
            try:
                rename_checked(probe, moved, lambda: os.path.lexists(moved))
            except OSError as e:
                return CannotRename(e.errno, e.strerror or str(e), str(probe)), mtime
            probe = moved
            return None, mtime
        finally:
            try:
                os.rmdir(probe)
            except OSError:
                pass  # a `.tmp-` name: the next cleanup removes it

    def writable(self) -> bool:
        """Whether this process can build into the cache: a cheap probe (make, rename and remove one empty folder;
        for a cache folder that does not exist yet, whether its nearest existing parent is writable). Creates
        nothing that outlives the call."""
        if not os.path.isdir(self.root):
            parent = self.root.parent
            while not os.path.isdir(parent) and parent != parent.parent:
                parent = parent.parent
            return os.access(parent, os.W_OK | os.X_OK)
        return self.probe()[0] is None

    def require_writable(self) -> None:
        """Refuse a build up front (before waiting for a lock or running the backend) if nothing can be written,
        or if the file system cannot rename (publishing is one rename)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno in NOT_WRITABLE:
                raise self.not_writable(e) from e
            raise
        error, _ = self.probe()
        if isinstance(error, CannotRename):
            raise CacheCannotRename(
                f"the engine cache {self.root} is on a file system that cannot rename ({error.strerror}; an S3 mount "
                f"such as Mountpoint for S3 cannot): an engine cannot be published there without readers seeing "
                f"half of it, so nothing is built into it. Engines already there are still served. Put the cache "
                f"on a file system that renames (a local disk, NFS, EFS, Filestore, CFS) ({CACHE_ENV} or the "
                f"extension's setting)") from error
        if error is not None:
            if error.errno in NOT_WRITABLE:
                raise self.not_writable(error) from error
            raise error

    def not_writable(self, e: OSError) -> CacheNotWritable:
        return CacheNotWritable(
            f"the engine cache {self.root} is not writable ({e.strerror or e}): engines already in it are still "
            f"served, but building one needs write access; make the folder writable for this user or choose a "
            f"writable cache folder (the extension's setting or {CACHE_ENV})"
        )
