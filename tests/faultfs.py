"""A pass-through FUSE file system that lies the way shared storage does (NFS, EFS, CFS, S3 mounts), for the
engine-cache tests: `flock` that locks nothing, `rename` that reports failure after it happened, no `rename` at
all, a full disk, slow reads.

It runs as its own process (`python tests/faultfs.py BACKING MOUNT CONTROL`) so that test processes killed with
SIGKILL, and the many processes racing through it, meet a real kernel mount. The faults are read from the JSON
file CONTROL whenever it changes (so a test switches them while the mount is in use); every injected fault is
counted in CONTROL.stats (JSON), which the tests print as their figures.

    with mounted(tmp_path / "backing", tmp_path / "mnt", rename="lie") as fs:
        ...  # work under fs.mount
        fs.set(flock="noop", enospc_after=1 << 20)
        print(fs.stats())

Faults (all off by default):
- flock: "real" (flock on the backing file: works across processes) or "noop" (always succeeds, locks nothing:
  NFS, Lustre and GPFS mounts where flock is silently local or ignored);
- rename: "ok", "lie" (the rename happens, then EIO is returned), "lie-half" (every other rename lies), or an
  errno name such as "ENOSYS"/"EPERM"/"EXDEV" (renames always fail with it: Mountpoint for S3);
- enospc_after: bytes that may still be written; writes past them fail with ENOSPC (null: no limit);
- read_delay_s: each read() sleeps this long first;
- read_only: every change (create, write, mkdir, rename, unlink, utime...) fails with EROFS, as a volume mounted
  read-only in a serving pod, while another process (the pre-build Job) writes into the backing folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: A name under the mount whose lookup writes the counts out (it never exists).
STATS_PATH = "/.faultfs-stats"
DEFAULTS: dict[str, Any] = {"flock": "real", "rename": "ok", "enospc_after": None, "read_delay_s": 0.0,
                            "read_only": False}


def fuse_available() -> str | None:
    """None when a FUSE file system can be mounted here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: libfuse itself is missing
        return f"mfusepy cannot load libfuse: {e}"
    return None


# ---- the file system (runs in its own process) ------------------------------------------------------------
def _serve(backing: str, mount: str, control: str) -> None:
    import mfusepy as fuse

    class FaultFS(fuse.Operations):  # type: ignore[misc]
        use_ns = True

        def __init__(self) -> None:
            self.root = backing
            self.faults = dict(DEFAULTS)
            self.control_mtime = -1
            self.written = 0  # bytes written since enospc_after was last set
            self.renames = 0
            self.stats: dict[str, int] = {"renames": 0, "renames_lied": 0, "renames_refused": 0, "flocks_ignored": 0,
                                          "flocks": 0, "enospc": 0, "slow_reads": 0, "reads": 0, "writes": 0,
                                          "refused_read_only": 0}
            self.lock = threading.Lock()
            self._reload()
            self._dump()

        # -- control and figures --
        def _reload(self) -> None:
            try:
                mtime = os.stat(control).st_mtime_ns
            except FileNotFoundError:
                return
            if mtime == self.control_mtime:
                return
            with self.lock:
                self.control_mtime = mtime
                try:
                    wanted = json.loads(Path(control).read_text())
                except ValueError:
                    return  # being rewritten: the next operation reads it
                if wanted.get("enospc_after") != self.faults.get("enospc_after"):
                    self.written = 0
                self.faults = {**DEFAULTS, **wanted}

        def _count(self, what: str) -> None:
            with self.lock:
                self.stats[what] += 1
            if what not in ("reads", "writes", "flocks", "renames"):
                self._dump()

        def _dump(self) -> None:
            with self.lock:
                data = json.dumps(self.stats)
            tmp = f"{control}.stats.{threading.get_ident()}"
            with open(tmp, "w") as f:
                f.write(data)
            os.replace(tmp, f"{control}.stats")

        def _p(self, path: str) -> str:
            return self.root + path

        def _writable(self) -> None:
            self._reload()
            if self.faults.get("read_only"):
                self._count("refused_read_only")
                raise fuse.FuseOSError(errno.EROFS)

        @staticmethod
        def _attrs(st: os.stat_result) -> dict[str, Any]:
            keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns", "st_mtime_ns",
                    "st_ctime_ns", "st_ino", "st_blocks")
            out = {k.replace("_ns", ""): getattr(st, k) for k in keys}
            return out

        # -- metadata --
        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            self._reload()
            if path == STATS_PATH:  # Mounted.stats() asks for fresh counts through the mount itself
                self._dump()
                raise fuse.FuseOSError(errno.ENOENT)
            try:
                return self._attrs(os.fstat(fh) if fh is not None and fh > 0 else os.lstat(self._p(path)))
            except OSError as e:
                raise fuse.FuseOSError(e.errno) from None

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._p(path))]

        def access(self, path: str, amode: int) -> int:
            if not os.access(self._p(path), amode):
                raise fuse.FuseOSError(errno.EACCES)
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            st = os.statvfs(self._p(path))
            return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                                                 "f_files", "f_flag", "f_frsize", "f_namemax")}

        def chmod(self, path: str, mode: int) -> int:
            self._writable()
            os.chmod(self._p(path), mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            self._writable()
            os.chown(self._p(path), uid, gid)
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            self._writable()
            if times is None:
                os.utime(self._p(path))
            else:
                os.utime(self._p(path), ns=times)
            return 0

        def readlink(self, path: str) -> str:
            return os.readlink(self._p(path))

        def symlink(self, target: str, source: str) -> int:
            self._writable()
            os.symlink(source, self._p(target))
            return 0

        def link(self, target: str, source: str) -> int:
            self._writable()
            os.link(self._p(source), self._p(target))
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            self._writable()
            self._reload()
            os.mkdir(self._p(path), mode)
            return 0

        def rmdir(self, path: str) -> int:
            self._writable()
            os.rmdir(self._p(path))
            return 0

        def unlink(self, path: str) -> int:
            self._writable()
            os.unlink(self._p(path))
            return 0

        def rename(self, old: str, new: str) -> int:
            self._writable()
            self._reload()
            mode = self.faults["rename"]
            self._count("renames")
            if mode not in ("ok", "lie", "lie-half"):
                self._count("renames_refused")
                raise fuse.FuseOSError(getattr(errno, str(mode), errno.ENOSYS))
            os.rename(self._p(old), self._p(new))  # raises the real error (ENOTEMPTY...) before any lie
            with self.lock:
                self.renames += 1
                lie = mode == "lie" or (mode == "lie-half" and self.renames % 2 == 1)
            if lie:
                self._count("renames_lied")
                raise fuse.FuseOSError(errno.EIO)
            return 0

        # -- data --
        def create(self, path: str, mode: int, fi: Any = None) -> int:
            self._writable()
            self._reload()
            return os.open(self._p(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)

        def open(self, path: str, flags: int) -> int:
            self._reload()
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                self._writable()
            return os.open(self._p(path), flags & ~(os.O_CREAT | os.O_EXCL))

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            self._count("reads")
            delay = float(self.faults.get("read_delay_s") or 0.0)
            if delay > 0:
                self._count("slow_reads")
                time.sleep(delay)
            return os.pread(fh, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            self._writable()
            self._count("writes")
            budget = self.faults.get("enospc_after")
            if budget is not None:
                with self.lock:
                    full = self.written + len(data) > int(budget)
                    if not full:
                        self.written += len(data)
                if full:
                    self._count("enospc")
                    raise fuse.FuseOSError(errno.ENOSPC)
            return os.pwrite(fh, data, offset)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            self._writable()
            if fh is not None and fh > 0:
                os.ftruncate(fh, length)
            else:
                os.truncate(self._p(path), length)
            return 0

        def flush(self, path: str, fh: int) -> int:
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            os.fsync(fh)
            return 0

        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            return 0

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

        def flock(self, path: str, fh: int, op: int) -> int:
            self._reload()
            self._count("flocks")
            if self.faults["flock"] == "noop":
                if op & (fcntl.LOCK_EX | fcntl.LOCK_SH):
                    self._count("flocks_ignored")
                return 0
            try:
                fcntl.flock(fh, op)
            except OSError as e:
                raise fuse.FuseOSError(e.errno) from None
            return 0

        def destroy(self, path: str) -> None:
            self._dump()

    fuse.FUSE(FaultFS(), mount, foreground=True, nothreads=False, default_permissions=True)


# ---- the tests' side ------------------------------------------------------------------------------------
class Mounted:
    def __init__(self, backing: Path, mount: Path, control: Path, proc: subprocess.Popen[bytes]) -> None:
        self.backing, self.mount, self.control, self.proc = backing, mount, control, proc

    def set(self, **faults: Any) -> None:
        """Switch faults (unnamed ones keep their value); in force for the next operation on the mount."""
        unknown = set(faults) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}")
        current = json.loads(self.control.read_text())
        tmp = self.control.with_suffix(".new")
        tmp.write_text(json.dumps({**current, **faults}))
        os.replace(tmp, self.control)
        time.sleep(0.01)  # mtime granularity: the next change is seen as one

    def stats(self) -> dict[str, int]:
        """Every count so far (reads and writes included: looking up STATS_PATH makes the file system write them)."""
        os.path.lexists(str(self.mount) + STATS_PATH)
        return dict(json.loads(Path(f"{self.control}.stats").read_text()))


@contextmanager
def mounted(backing: Path, mount: Path, **faults: Any) -> Iterator[Mounted]:
    """Mount the fault-injecting file system over `backing` at `mount` for the duration of the block."""
    backing.mkdir(parents=True, exist_ok=True)
    mount.mkdir(parents=True, exist_ok=True)
    control = mount.parent / f".{mount.name}-faults.json"
    control.write_text(json.dumps({**DEFAULTS, **faults}))
    log = mount.parent / f".{mount.name}-faultfs.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, __file__, str(backing), str(mount), str(control)],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not os.path.ismount(mount):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the FUSE file system did not mount: {log.read_text()[-2000:]}")
        time.sleep(0.02)
    try:
        yield Mounted(backing, mount, control, proc)
    finally:
        unmount = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
        subprocess.run([unmount, "-u", "-z", str(mount)], capture_output=True, check=False)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    _serve(*sys.argv[1:4])
