"""The loaded engines of a WebUI process, shared by every UNet server that uses them: opening (verify, load) one
thread at a time per engine without making UNet calls wait, forgetting and closing them, engines refused at load
(remembered until their files change), engines being deleted, and no loading after shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence

import torch

from sdtrt.errors import EngineNotFound, SdtrtError
from sdtrt.serving.server import BUSY_WAIT_S
from sdtrt.serving.session import CorruptEngine, EngineBusy, EngineSession
from sdtrt.storage.manifest import Manifest
from sdtrt.storage.registry import Registry

log = logging.getLogger("sdtrt")


class SessionPool:
    """`registry()`, `cuda_graphs()` and `device()` are read when an engine is opened (the settings may change).
    The pool's lock guards only its tables; loading, closing and hashing run outside it."""

    def __init__(self, registry: Callable[[], Registry], cuda_graphs: Callable[[], bool],
                 device: Callable[[], torch.device]) -> None:
        self._registry = registry
        self._cuda_graphs = cuda_graphs
        self._device = device
        self._lock = threading.RLock()
        self._sessions: dict[str, EngineSession] = {}
        self._opening: dict[str, threading.Lock] = {}  # per engine id: one thread loads it, others do not wait long
        self._deleting: set[str] = set()
        #: engines refused at load because their files do not match the manifest: id -> (file signature, reason).
        #: Listed as not ok (and not offered) until their files change, so nobody re-hashes them on every switch.
        self._refused: dict[str, tuple[tuple[object, ...], str]] = {}
        self.shut_down = False  # after shut_down(): no engine is loaded again (calls run on PyTorch)

    def open(self, engine_id: str) -> EngineSession:
        """The loaded engine. Loading (hashing, deserializing) runs under a per-engine lock: a caller that finds
        another thread loading the same engine gets EngineBusy after BUSY_WAIT_S (its call runs on PyTorch)
        instead of waiting for the load."""
        with self._lock:
            session = self._sessions.get(engine_id)
            if session is not None and not session.closed:
                return session
            if engine_id in self._deleting:
                raise EngineNotFound(f"engine {engine_id} is being deleted")
            if self.shut_down:
                raise SdtrtError("sdtrt was shut down; engines are not loaded any more")
            opening = self._opening.setdefault(engine_id, threading.Lock())
        if not opening.acquire(timeout=BUSY_WAIT_S):
            raise EngineBusy(f"engine {engine_id} is being loaded by another thread")
        try:
            with self._lock:
                session = self._sessions.get(engine_id)
                if session is not None and not session.closed:
                    return session
            registry = self._registry()
            graphs = self._cuda_graphs()
            try:
                session = self._in_device(lambda: EngineSession.open(registry, engine_id, cuda_graphs=graphs))
            except CorruptEngine as e:
                with contextlib.suppress(Exception):
                    signature = self._signature(registry.status(engine_id).manifest or registry.get(engine_id))
                    with self._lock:
                        self._refused[engine_id] = (signature, str(e))
                raise
            with self._lock:
                if engine_id not in self._deleting and not self.shut_down:
                    self._sessions[engine_id] = session
                    return session
            session.close()
            raise EngineNotFound(f"engine {engine_id} was deleted (or sdtrt shut down) while it loaded")
        finally:
            opening.release()

    def _in_device(self, fn: Callable[[], EngineSession]) -> EngineSession:
        device = self._device()
        if device.type == "cuda" and torch.cuda.is_available():
            with torch.cuda.device(device):
                return fn()
        return fn()

    def _signature(self, manifest: Manifest) -> tuple[object, ...]:
        d = self._registry().engine_dir(manifest.id)
        out: list[object] = []
        for f in manifest.files:
            try:
                st = os.stat(d / f.name)
                out.append((f.name, st.st_size, st.st_mtime_ns, st.st_ino))
            except OSError:
                out.append((f.name, None))
        return tuple(out)

    def refusal(self, manifest: Manifest) -> str | None:
        """Why this engine was refused at load, while its files are the ones that were refused."""
        with self._lock:
            refused = self._refused.get(manifest.id)
        if refused is None:
            return None
        if refused[0] != self._signature(manifest):
            with self._lock:
                self._refused.pop(manifest.id, None)
            return None
        return refused[1]

    def evict(self, engine_id: str, session: EngineSession) -> None:
        """Forget and close `session` if it is still the one loaded for `engine_id`."""
        with self._lock:
            if self._sessions.get(engine_id) is session:
                del self._sessions[engine_id]
        close_all([session])

    def take(self, keep: Sequence[str] = ()) -> list[EngineSession]:
        """Remove the sessions not in `keep` from the table; the caller closes them (close_all) outside its locks."""
        with self._lock:
            return [self._sessions.pop(i) for i in [i for i in self._sessions if i not in keep]]

    def close(self, keep: Sequence[str] = ()) -> None:
        """Unload every engine not in `keep`. Each close waits for that engine's call or refit in flight."""
        close_all(self.take(keep))

    def cuda_graphs_differ(self, flag: bool) -> bool:
        """Whether some loaded engine was opened with a CUDA graphs setting other than `flag`."""
        with self._lock:
            return any(s.cuda_graphs != flag for s in self._sessions.values())

    def start_delete(self, engine_id: str) -> EngineSession | None:
        """Mark `engine_id` as being deleted (nothing loads it until finish_delete) and take its session.
        Raises SdtrtError when another delete of it is in progress."""
        with self._lock:
            if engine_id in self._deleting:
                raise SdtrtError(f"engine {engine_id} is being deleted by another request")
            self._deleting.add(engine_id)
            return self._sessions.pop(engine_id, None)

    def finish_delete(self, engine_id: str) -> None:
        with self._lock:
            self._deleting.discard(engine_id)

    def stop(self) -> list[EngineSession]:
        """Shutdown: nothing is loaded any more; returns the sessions to close."""
        with self._lock:
            self.shut_down = True
        return self.take()


def close_all(sessions: Sequence[EngineSession]) -> None:
    """Close engines (each waits for its call or refit in flight); one that fails to close is logged, not raised."""
    for session in sessions:
        try:
            session.close()
        except Exception:
            log.exception("sdtrt: closing engine %s failed", session.manifest.id)
