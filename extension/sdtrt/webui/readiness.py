"""GET /sdtrt/v1/ready: whether this replica can take generations, for a load balancer's readiness probe.

Ready when the WebUI has its checkpoint loaded; with `SDTRT_REQUIRE_ENGINE=1` also only when an engine for that
checkpoint is present, valid for this GPU and backend version, and loaded. A replica whose engine is present but
not loaded yet (the WebUI applies the SD Unet at a generation, and a replica that is not ready gets none) loads it
itself: once, in the background, when the WebUI is idle (the host's queue lock), as the next generation would.
Without `SDTRT_REQUIRE_ENGINE` a replica is ready on PyTorch and says so. Cheap enough for a probe every few
seconds: at most every SDTRT_RESCAN_S one look for engines other processes published (a directory listing and one
stat per engine, nothing hashed); the engines' manifests are read again only when that look found a change (the
SD Unet list is then rebuilt) or a setting changed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from sdtrt.webui.generation import GenerationScope
from sdtrt.webui.host import CheckpointRef
from sdtrt.webui.options import OptionSpec, UnetOptions
from sdtrt.webui.reports import Report
from sdtrt.webui.state import ServiceState

log = logging.getLogger("sdtrt")


def _doc(text: str) -> dict[str, str]:
    return {"description": text}


@dataclass(frozen=True)
class ReadyReport(Report):
    """GET /sdtrt/v1/ready (200 when `ready`, else 503)."""

    ready: bool
    reasons: list[str] = field(metadata=_doc("why not ready (empty when ready)"))
    checkpoint: str | None = field(metadata=_doc("the loaded checkpoint"))
    serving: str = field(metadata=_doc("engine or pytorch: what the next generation's UNet calls run on"))
    engine: str | None = field(metadata=_doc("the engine for the loaded checkpoint, if one can serve here"))
    loaded: bool = field(metadata=_doc("that engine is loaded"))
    require_engine: bool = field(metadata=_doc("SDTRT_REQUIRE_ENGINE: ready only with the engine loaded"))
    builds: bool = field(metadata=_doc("this replica builds engines (SDTRT_BUILDS is not off)"))


class Readiness:
    def __init__(self, state: ServiceState, options: UnetOptions, scope: GenerationScope) -> None:
        self.state, self.options, self.scope = state, options, scope
        self._lock = threading.Lock()
        self._warming: threading.Thread | None = None
        #: the option of the loaded checkpoint, keyed on what it is derived from: a probe lists and reads nothing
        #: of the cache unless the SD Unet list was rebuilt (a publish seen by the throttled rescan, a setting)
        self._option: tuple[object, OptionSpec | None] | None = None

    def check(self) -> ReadyReport:
        fleet = self.state.fleet
        reasons: list[str] = []
        host = self.state.host
        ckpt = host.loaded_checkpoint() if host is not None else None
        if host is None:
            reasons.append("sd-webui-trt is not attached to the WebUI yet")
        elif ckpt is None or host.torch_unet() is None:
            reasons.append("no checkpoint is loaded yet")
        option: OptionSpec | None = None
        loaded = False
        if host is not None and ckpt is not None:
            self.scope.rescan()  # engines published since the list was built (at most every SDTRT_RESCAN_S)
            option = self._option_of(ckpt)
            loaded = option is not None and self._loaded(option)
            if fleet.require_engine:
                reasons += self._engine_reasons(ckpt.title, option, loaded)
        serving = "engine" if loaded and self.state.settings().enabled else "pytorch"
        return ReadyReport(not reasons, reasons, ckpt.title if ckpt else None, serving,
                           option.engine_ids[0] if option else None, loaded, fleet.require_engine, fleet.builds)

    def _option_of(self, ckpt: CheckpointRef) -> OptionSpec | None:
        settings = self.state.settings()
        key = (ckpt.title, self.state.watcher.seen, settings.backend, settings.enabled)
        cached = self._option
        if cached is not None and cached[0] == key:
            return cached[1]
        option = next((o for o in self.options.options_with(ckpt, self.options.loaded_arch)
                       if o.model_name == ckpt.model_name), None)
        self._option = (key, option)
        return option

    def _loaded(self, option: OptionSpec) -> bool:
        with self.state.lock:
            server, label = self.state.active, self.state.active_label
        return server is not None and label == option.label and any(
            slot.session is not None and not slot.session.closed and slot.broken is None for slot in server.slots)

    def _engine_reasons(self, checkpoint: str, option: OptionSpec | None, loaded: bool) -> list[str]:
        if option is None:
            unusable = [f"{row.id}: {row.reason}" for row in self.options.catalog() if not row.ok]
            return [f"no engine for {checkpoint} can serve here" + (f" (not usable: {'; '.join(unusable)})"
                                                                  if unusable else "; build one (pre-build Job)")]
        setting = self.state.require_host().option("sd_unet", "Automatic")
        if setting not in ("Automatic", option.label):
            return [f"the WebUI's SD Unet setting is {setting!r}: set it to Automatic (or {option.label!r})"]
        if loaded:
            return []
        self._warm_up()
        return [f"engine {option.engine_ids[0]} is not loaded yet (loading it when the WebUI is idle)"]

    def _warm_up(self) -> None:
        """Apply the SD Unet now, once at a time, in the background, when the WebUI is idle."""
        with self._lock:
            if self._warming is not None and self._warming.is_alive():
                return
            self._warming = threading.Thread(target=self._apply, name="sdtrt-warm-up", daemon=True)
            self._warming.start()

    def _apply(self) -> None:
        host = self.state.require_host()
        try:
            with host.quiet_torch(lambda why: None):
                host.refresh_unet_list()
                host.apply_unet()
        except Exception:
            log.exception("sdtrt: loading the engine for readiness failed")
        finally:
            self._option = None  # a refused load changes what can serve: the next probe looks again
