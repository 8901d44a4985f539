"""What the parts of the engine service share: the attached host, the engine cache of its settings, the loaded engines,
the counters and build jobs, the generation in progress and the active UNet server. The parts (options, activation,
generation scope, builds) read and change these through public fields and methods; the lock guards the fields that
change (held only for dictionary-sized work, never while hashing, loading, closing or deleting an engine, so a UNet
call never waits on it behind slow work of another thread)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

from sdtrt.errors import SdtrtError
from sdtrt.serving.catalog import BackendProbe
from sdtrt.serving.counters import Counters
from sdtrt.serving.server import UnetServer
from sdtrt.serving.session import EngineSession
from sdtrt.storage.registry import Registry
from sdtrt.webui.fleet import CacheWatcher, FleetSettings
from sdtrt.webui.host import Host, Settings
from sdtrt.webui.jobs import JobQueue
from sdtrt.webui.sessions import SessionPool, close_all


@dataclass
class Generation:
    p: object
    settings: Settings
    told: set[str]
    #: the counters when it began: what it did is the difference at its end (`last_generation` in /status)
    counted: dict[str, Any] | None = None


class ServiceState:
    def __init__(self) -> None:
        self.host: Host | None = None
        self.counters = Counters()
        self.jobs = JobQueue(idempotent=True)  # an identical request while one is queued or running gets that job
        self.lock = threading.RLock()
        self._registry: Registry | None = None
        self.sessions = SessionPool(self.registry, lambda: self.settings().cuda_graphs,
                                    lambda: self.require_host().device())
        self.probe = BackendProbe()
        self.generation: Generation | None = None
        self.active: UnetServer | None = None
        self.active_label: str | None = None
        #: fleet mode (SDTRT_BUILDS, SDTRT_RESCAN_S) and the watcher that notices engines other processes publish
        self.fleet = FleetSettings.from_env()
        self.watcher = CacheWatcher(self.fleet.rescan_s)

    def require_host(self) -> Host:
        if self.host is None:
            raise SdtrtError("sdtrt is not attached to a WebUI host")
        return self.host

    def settings(self) -> Settings:
        """The settings of the generation in progress (read when it began), else the host's current ones."""
        if self.generation is not None:
            return self.generation.settings
        return self.require_host().settings()

    def registry(self) -> Registry:
        """The engine cache the settings name; a changed cache folder unloads the engines of the previous one."""
        host = self.require_host()
        root = host.settings().cache_path(host.models_dir())
        stale: list[EngineSession] = []
        with self.lock:
            if self._registry is None or self._registry.root != root:
                stale = self.sessions.take()
                self._registry = Registry(root)
            registry = self._registry
        close_all(stale)
        return registry

    def refresh_list(self) -> None:
        with contextlib.suppress(Exception):
            self.require_host().refresh_unet_list()
