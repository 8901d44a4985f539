from __future__ import annotations

import collections
import threading


class FIFOLock:
    """A first-in-first-out, NON-reentrant lock (a second acquire from the same thread deadlocks, as in A1111)."""

    def __init__(self):  # type: ignore[no-untyped-def]
        self._lock = threading.Lock()
        self._inner_lock = threading.Lock()
        self._pending_threads: collections.deque = collections.deque()

    def acquire(self, blocking=True, timeout=-1):  # type: ignore[no-untyped-def]
        with self._inner_lock:
            lock_acquired = self._lock.acquire(False)
            if lock_acquired:
                return True
            elif not blocking:
                return False
            release_event = threading.Event()
            self._pending_threads.append(release_event)
        release_event.wait()
        return self._lock.acquire(blocking, timeout)

    def release(self):  # type: ignore[no-untyped-def]
        with self._inner_lock:
            if self._pending_threads:
                release_event = self._pending_threads.popleft()
                release_event.set()
            self._lock.release()

    def locked(self):  # type: ignore[no-untyped-def]
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, t, v, tb):  # type: ignore[no-untyped-def]
        self.release()
