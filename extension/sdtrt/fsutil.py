"""Small file-system helpers for a cache that many processes (and hosts) share.

Why these exist: a rename is atomic but not durable until the directory is fsynced; a file is not durable until it
is fsynced; a lock file made with O_CREAT|O_EXCL survives a SIGKILL and hangs every later waiter, while a kernel
`flock` is released when its holder dies. On some network file systems `flock` is unsupported or silently succeeds
for everyone, so `FileLock` is best effort: callers use it to avoid duplicate work, never for correctness. And on
NFS a `rename` can report failure after it happened (a retransmitted request finds the source gone), so every rename
of the cache goes through `rename_checked`, which looks at the result before believing an error.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from sdtrt.errors import SdtrtError

#: Read size for hashing: large enough to stream multi-GB engines quickly, small enough to keep memory flat.
CHUNK_BYTES = 1 << 20

#: fsync errors that mean "this file system cannot fsync a directory", not "the data is lost".
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR}


class LockTimeout(SdtrtError, TimeoutError):
    """A required lock was not acquired in time."""


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data to stable storage (a read-only descriptor suffices on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the directory's entries (creations, renames) durable. File systems that cannot fsync a directory
    are tolerated; real I/O errors (EIO, ENOSPC) propagate."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


#: What the writers take: bytes, or a buffer such as memoryview(IHostMemory) (written without a copy).
Data = bytes | bytearray | memoryview


def write_all(fd: int, data: Data) -> None:
    """os.write until every byte is written: a short write (signals, some network file systems) is continued,
    never mistaken for a complete one."""
    view = memoryview(data).cast("B")  # byte-indexed, whatever the buffer's item type
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, f"write() wrote {n} bytes with {len(view)} left")
        view = view[n:]


def rename_checked(src: str | os.PathLike[str], dst: str | os.PathLike[str], landed: Callable[[], bool], *,
                   replace: bool = False) -> bool:
    """os.rename(src, dst) (os.replace with `replace`: a file over an existing one), believing an error only once
    `landed()` (called after the error) says the result is not there. Returns False when the rename went through
    cleanly, True when it reported an error but had happened (callers say so in the log). `landed` checks the destination's content (or a unique name),
    never that `src` is gone: a client's cached attributes may still show it."""
    try:
        (os.replace if replace else os.rename)(src, dst)
        return False
    except OSError:
        try:
            happened = landed()
        except OSError:
            happened = False
        if happened:
            return True
        raise


def _holds(path: Path, data: memoryview) -> bool:
    """`path` is a regular file with exactly these bytes."""
    try:
        fd = _open_regular(path)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size != len(data):
            return False
        offset = 0
        while offset < len(data):
            chunk = os.read(fd, min(CHUNK_BYTES, len(data) - offset))
            if not chunk or chunk != data[offset:offset + len(chunk)]:
                return False
            offset += len(chunk)
        return True
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: Data, *, make_parents: bool = False) -> None:
    """Write `data` so readers see either the old file or the complete new one, never a torn one: temp file in
    the same directory, fsync, os.replace, fsync of the directory. The temp file is removed on any error, a
    failing close() included (network file systems report deferred write errors there). `make_parents`: create
    the missing folders above `path` first (e.g. a cache folder on first use)."""
    target = Path(path)
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        rename_checked(tmp, target, lambda: _holds(target, memoryview(data).cast("B")), replace=True)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(target.parent)


def _open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of a regular file. Symlinks are not followed and a FIFO or device is refused
    without blocking (opening a FIFO for reading would hang until a writer appears)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symlink; refusing to follow it", str(path)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "is not a regular file", str(path))
    return fd


def read_regular_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most `limit` bytes of a regular file (see _open_regular for what is refused)."""
    fd = _open_regular(path)
    try:
        chunks = []
        left = limit
        while left > 0:
            chunk = os.read(fd, min(left, CHUNK_BYTES))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed."""
    return sha256_and_size(path)[0]


def sha256_and_size(path: str | os.PathLike[str]) -> tuple[str, int]:
    """Hex sha256 and byte count of a regular file, from one streamed read (so both describe the same bytes).
    Symlinks, FIFOs and devices raise OSError instead of being followed or read."""
    h = hashlib.sha256()
    size = 0
    fd = _open_regular(path)
    try:
        while chunk := os.read(fd, CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest(), size


class FileLock:
    """An advisory, kernel-released lock on a lock file (fcntl.flock), with a bounded wait.

    ``with FileLock(p, timeout=5) as lock: ...`` waits up to `timeout` seconds; afterwards `lock.acquired` tells
    whether it is held. With ``required=False`` (default) a timeout or a file system without flock support
    (ENOLCK, EOPNOTSUPP: some NFS/Lustre mounts) is not an error: the body runs unlocked and `lock.error` says
    why. With ``required=True`` a timeout raises LockTimeout. The lock file is never deleted: deleting a flock
    file lets two processes hold "the" lock on different inodes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        timeout: float = 0.0,
        *,
        required: bool = False,
        poll_s: float = 0.05,
        max_poll_s: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.required = required
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.acquired = False
        #: True when this file system cannot lock (or the lock file cannot be opened): the body runs unlocked.
        self.unsupported = False
        self.error: str | None = None
        self._fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            # Another user created it without write permission for us; flock works on a read-only descriptor.
            return os.open(self.path, os.O_RDONLY)

    def acquire(self, timeout: float | None = None, *, on_wait: Callable[[], bool] | None = None) -> bool:
        """Try to take the lock for up to `timeout` seconds (default: the constructor's). `on_wait` is called
        between attempts; returning True stops waiting (e.g. the work appeared meanwhile), and it may raise to
        cancel. Returns whether the lock is held; raises LockTimeout only when `required`."""
        if self.acquired:
            return True
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + max(0.0, limit)
        delay = self.poll_s
        if self._fd is None:
            try:
                self._fd = self._open()
            except OSError as e:  # e.g. a read-only .locks folder of another user: locking is only an optimization
                return self._unsupported(f"cannot open lock file {self.path} ({e.strerror or e})", e)
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            except OSError as e:  # ENOLCK, EOPNOTSUPP...: no locking here; proceed unlocked (best effort)
                self._close()
                return self._unsupported(f"locking {self.path} is not supported here ({e.strerror or e})", e)
            else:
                self.acquired = True
                self.error = None
                return True
            if on_wait is not None and on_wait():
                self.error = "stopped waiting"
                self._close()
                return False
            now = time.monotonic()
            if now >= deadline:
                self.error = f"{self.path} is still held by another process after {limit:g} s"
                self._close()
                if self.required:
                    raise LockTimeout(self.error)
                return False
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, self.max_poll_s)

    def _unsupported(self, reason: str, cause: OSError) -> bool:
        self.unsupported, self.error = True, reason
        if self.required:
            raise LockTimeout(reason) from cause
        return False

    def release(self) -> None:
        """Release the lock (closing the descriptor releases it too). Safe to call twice."""
        if self._fd is not None and self.acquired:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass
        self.acquired = False
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:  # noqa: PYI034
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def onnx_files(onnx_path: Path) -> list[Path]:
    """The ONNX file and its external data file, if any."""
    data = onnx_path.with_name(onnx_path.name + ".data")
    return [onnx_path] + ([data] if data.exists() else [])


def copy_onnx(onnx_path: Path, dest_dir: Path) -> list[str]:
    """Copy (hard-link when possible) an exported ONNX and its data into `dest_dir`; returns file names."""
    names = []
    for src in onnx_files(onnx_path):
        dst = Path(dest_dir) / src.name
        try:
            dst.hardlink_to(src)
        except OSError:
            shutil.copy2(src, dst)
        names.append(src.name)
    return names
