"""The engine service behind the WebUI glue, as one facade over objects with one job each: the shared state
(`state`), the SD Unet options and engine rows (`options`), which server serves (`activation`), the scope of a
generation (`scope`) and build requests (`builds`). One instance per process (`service()`); it survives A1111's
"Reload UI", which re-executes scripts/ but keeps this module."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from sdtrt.serving.server import UnetServer
from sdtrt.storage.registry import Registry
from sdtrt.webui import status
from sdtrt.webui.activation import Activation, SwapFailed
from sdtrt.webui.builds import Builds
from sdtrt.webui.generation import GenerationScope
from sdtrt.webui.host import OPT_ENABLED, Host, Settings
from sdtrt.webui.jobs import Job
from sdtrt.webui.options import LoadedArch, OptionSpec, UnetOptions
from sdtrt.webui.readiness import Readiness
from sdtrt.webui.reports import EngineListing, StatusReport
from sdtrt.webui.state import Generation, ServiceState

__all__ = ["EngineService", "Generation", "LoadedArch", "OptionSpec", "SwapFailed", "service"]

log = logging.getLogger("sdtrt")


class EngineService:
    def __init__(self) -> None:
        self.state = ServiceState()
        self.options = UnetOptions(self.state)
        self.activation = Activation(self.state, self.options)
        self.scope = GenerationScope(self.state, self.activation)
        self.builds = Builds(self.state)
        self.readiness = Readiness(self.state, self.options, self.scope)
        # the shared parts the glue, the API and the tests read
        self.counters, self.jobs, self.sessions, self.probe = (self.state.counters, self.state.jobs,
                                                               self.state.sessions, self.state.probe)

    # ---- host, settings, cache ----------------------------------------------------------------------------
    def attach(self, host: Host) -> None:
        self.state.host = host
        self.state.sessions.shut_down = False

    @property
    def active(self) -> UnetServer | None:
        return self.state.active

    @property
    def active_label(self) -> str | None:
        return self.state.active_label

    @property
    def generation(self) -> Generation | None:
        return self.state.generation

    def require_host(self) -> Host:
        return self.state.require_host()

    def settings(self) -> Settings:
        return self.state.settings()

    def registry(self) -> Registry:
        return self.state.registry()

    def collect_garbage(self, max_age_s: float = 3600.0) -> list[str]:
        return self.builds.collect_garbage(max_age_s)

    # ---- engines and SD Unet options (UnetOptions) --------------------------------------------------------
    def engine_rows(self) -> list[EngineListing]:
        return self.options.engine_rows()

    def unet_options(self) -> list[OptionSpec]:
        return self.options.unet_options()

    def close_sessions(self, keep: Sequence[str] = ()) -> None:
        """Unload every engine not in `keep`. Each close waits for that engine's call or refit in flight."""
        self.state.sessions.close(keep)

    # ---- serving (Activation) and generations (GenerationScope) -------------------------------------------
    def make_server(self, spec: OptionSpec) -> UnetServer:
        return self.activation.make_server(spec)

    def activate(self, server: UnetServer, label: str) -> None:
        self.activation.activate(server, label)

    def deactivate(self, server: UnetServer) -> None:
        self.activation.deactivate(server)

    def begin(self, p: object) -> None:
        self.scope.begin(p)

    def apply_networks(self) -> None:
        self.scope.apply_networks()

    def before_sampling(self) -> None:
        self.scope.before_sampling()

    def end(self, p: object) -> None:
        self.scope.end(p)

    # ---- builds and deletes (Builds) ----------------------------------------------------------------------
    def submit_build(self, checkpoint: str, profiles: Sequence[str], backend: str = "auto",
                     dtype: str | None = None, replaces: str | None = None, controlnet: bool = False,
                     targets: str | Sequence[str] | None = None, convention: str | None = None) -> Job:
        return self.builds.submit(checkpoint, profiles, backend, dtype, replaces, controlnet, targets, convention)

    def rebuild(self, engine_id: str) -> Job:
        return self.builds.rebuild(engine_id)

    def delete(self, engine_id: str) -> None:
        self.builds.delete(engine_id)

    # ---- the process and the WebUI ------------------------------------------------------------------------
    def shutdown(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.activation.shutdown(timeout)

    def set_enabled(self, enabled: bool) -> dict[str, bool]:
        """Switch the extension on or off (the sdtrt_enabled setting, saved); generations read it when they
        begin, so it applies from the next one."""
        self.require_host().set_option(OPT_ENABLED, bool(enabled))
        return {"enabled": self.require_host().settings().enabled}

    def refresh_list(self) -> None:
        self.state.refresh_list()

    def rescan(self) -> dict[str, Any]:
        """POST /sdtrt/v1/rescan: look at the cache now; what another process published or removed is listed."""
        changed = self.scope.rescan(now=True)
        return {"changed": changed, "engines": [row.id for row in self.engine_rows() if row.ok]}

    def status(self) -> StatusReport:
        return status.snapshot(self.state, self.scope)


_SERVICE: EngineService | None = None
_SERVICE_LOCK = threading.Lock()


def service() -> EngineService:
    global _SERVICE
    with _SERVICE_LOCK:
        if _SERVICE is None:
            _SERVICE = EngineService()
        return _SERVICE
