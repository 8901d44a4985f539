"""Garbage collection of the engine cache: temp folders of dead builds and orphan engine folders that no publish made."""

from __future__ import annotations

import os
import re
import shutil
import stat
import time

from sdtrt.errors import EngineNotFound, InvalidEngineId
from sdtrt.fsutil import FileLock, fsync_dir, rename_checked
from sdtrt.storage.inspection import inspect
from sdtrt.storage.key import ENGINE_DIR_RE
from sdtrt.storage.layout import CacheLayout, SideKind
from sdtrt.storage.lease import host_name, pid_alive

#: `.tmp-<id>-<host>-<pid>-<rnd>`: a build (or delete) in progress, or what a killed one left behind.
TMP_RE = re.compile(r"^\.tmp-(?P<id>.+)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-(?P<rnd>[0-9a-f]+)$")


def _fs_now(layout: CacheLayout) -> float:
    """The file system's clock, from a probe folder's mtime (what heartbeats of any host are stamped with);
    this host's clock when the cache cannot be written."""
    _, stamp = layout.probe()
    return time.time() if stamp is None else stamp


def cleanup(layout: CacheLayout, max_age_s: float = 3600.0) -> list[str]:
    """One garbage-collection pass. Returns the names removed. Removes:

    - temp folders of builds (or deletes) that died: untouched for `max_age_s` (a live build touches its
      folder every lease / 5), whose process is gone when it ran on this host, and whose id lock is not held;
    - orphan engine folders, older than `max_age_s`: no manifest.json ("orphan plan"), or a valid manifest
      whose files are missing ("orphan manifest"). Neither is ever served; a publish never makes one.

    Ages are measured against the file system's clock, not this host's, so a skewed clock cannot make a live
    build look old. Quarantined engines, damaged engines (build() quarantines them), lock files and anything
    not named like an engine are kept. Never raises for a file it cannot remove (read-only cache)."""
    try:
        names = os.listdir(layout.root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed: list[str] = []
    now, host = _fs_now(layout), host_name()
    for name in sorted(names):
        m = TMP_RE.match(name)
        if m is None:
            if ENGINE_DIR_RE.match(name) and ".." not in name and _remove_orphan(layout, name, now, max_age_s):
                removed.append(name)
            continue
        path = layout.root / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if now - st.st_mtime < max_age_s:
            continue
        if m["host"] == host and pid_alive(int(m["pid"])):
            continue
        if _lock_held(layout, m["id"]):
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
            fsync_dir(layout.root)
        except OSError:
            pass  # the removals happened; durability of a removal is not worth failing the pass for
    return removed


def _remove_orphan(layout: CacheLayout, engine_id: str, now: float, grace_s: float) -> bool:
    """Remove an orphan engine folder once nothing in it changed for `grace_s` (mtime and ctime of the folder
    and its entries: a copy in progress, even one preserving mtimes, keeps the ctime fresh)."""
    try:
        r = inspect(layout, engine_id, deep=False)
    except (EngineNotFound, OSError):
        return False
    if not r.orphan or not r.inode:
        return False
    d = layout.engine_dir(engine_id)
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
    gone = layout.side_dir(SideKind.TMP, engine_id)
    try:
        if os.lstat(d).st_ino != r.inode:
            return False
        # out of the engine namespace in one step; a crash leaves a `.tmp-` for next time
        rename_checked(d, gone, lambda: os.path.lexists(gone))
    except OSError:
        return False
    try:
        moved = os.lstat(gone).st_ino
    except OSError:
        moved = r.inode
    if moved != r.inode:  # a fresh publish slipped in between the check and the rename: put it back
        try:
            rename_checked(gone, d, lambda: not os.path.lexists(gone) and os.path.lexists(d))
            return False
        except OSError:
            pass  # the name was taken again meanwhile; what we moved is garbage now either way
    shutil.rmtree(gone, ignore_errors=True)  # leftovers keep a `.tmp-` name: the next pass removes them
    return True


def _lock_held(layout: CacheLayout, engine_id: str) -> bool:
    try:
        lock_file = layout.lock_path(engine_id)
    except InvalidEngineId:
        return False
    if not layout.locking or not lock_file.exists():
        return False
    lock = FileLock(lock_file)
    try:
        return not lock.acquire(0) and not lock.unsupported
    finally:
        lock.release()
