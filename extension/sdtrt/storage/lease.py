"""Build leases: a running build's heartbeat, and how a waiter tells whether the build it waits for is alive."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

#: Builds take minutes (SDXL on a small GPU: tens of minutes); waiters give up after this and build themselves.
#: A waiter also stops waiting one lease after the build it waits for stops showing signs of life.
DEFAULT_LOCK_TIMEOUT_S = 3600.0
#: A running build touches its lock file and temp folder this often (lease / 5), so waiters and `cleanup` on
#: other hosts can tell it is alive.
HEARTBEAT_S = 60.0
#: How long a build may show no heartbeat before waiters stop waiting for it. Five beats: NFS clients cache
#: attributes for up to 60 s, so a shorter lease could mistake a live build on another host for a dead one.
DEFAULT_LEASE_S = 5 * HEARTBEAT_S


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True



class Heartbeat:
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

    def __enter__(self) -> Heartbeat:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Liveness:
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

