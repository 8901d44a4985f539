"""The engine catalog: every engine in a cache with whether it can serve on this machine and why not. One source
for the CLI's `list`, the REST API, the TensorRT tab and the WebUI service."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from sdtrt.backends import backend_class
from sdtrt.engine_types import BackendInfo
from sdtrt.errors import SdtrtError
from sdtrt.models import record_convention, record_takes_control
from sdtrt.storage.manifest import Manifest, stale_reason
from sdtrt.storage.registry import Registry


class BackendProbe:
    """The identity of each backend on this machine (name, version, GPU), or why it cannot run here. Probed once
    per backend (probing may touch the GPU) and remembered; thread-safe, probing runs outside the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._infos: dict[str, BackendInfo | str] = {}

    def info(self, name: str) -> BackendInfo | str:
        with self._lock:
            known = self._infos.get(name)
        if known is not None:
            return known
        info: BackendInfo | str
        try:
            cls = backend_class(name)
            reason = cls.unavailable_reason()
            info = reason if reason is not None else cls().info()
        except SdtrtError as e:
            info = str(e)
        with self._lock:
            return self._infos.setdefault(name, info)


@dataclass(frozen=True)
class EngineRow:
    """One engine of the cache. `stale`: why it can never serve again as it is (damaged files, an edited manifest,
    another backend version or GPU; rebuild it). `unavailable`: why it cannot serve on this machine now (its
    backend is not installed or has no GPU here) although it may elsewhere. `refused`: why it was refused at load."""

    id: str
    manifest: Manifest | None
    stale: str | None
    unavailable: str | None = None
    refused: str | None = None

    @property
    def ok(self) -> bool:
        """It can serve here."""
        return self.reason is None

    @property
    def reason(self) -> str | None:
        return self.stale or self.unavailable or self.refused

    @property
    def size_bytes(self) -> int | None:
        return None if self.manifest is None else sum(f.size for f in self.manifest.files)

    @property
    def controlnet(self) -> bool:
        """The engine has ControlNet inputs."""
        return bool(self.manifest and record_takes_control(self.manifest.key.io))

    @property
    def convention(self) -> str | None:
        """Whose UNet numerics the engine follows ("a1111" or "forge", `sdtrt.models.convention`)."""
        return None if self.manifest is None else record_convention(self.manifest.key.io, strict=False)


def engine_rows(registry: Registry, probe: BackendProbe,
                refused: Callable[[Manifest], str | None] = lambda manifest: None) -> list[EngineRow]:
    """Every engine in `registry`: cheap checks only (manifest, file sizes, backend identity), nothing hashed or
    loaded. `refused(manifest)` tells engines a loader refused (their files did not match)."""
    rows = []
    for st in registry.list():
        m = st.manifest
        stale, unavailable, why_refused = st.reason, None, None
        if m is not None and stale is None:
            info = probe.info(m.key.backend)
            if isinstance(info, str):
                unavailable = f"backend {m.key.backend} cannot run here: {info}"
            else:
                stale = stale_reason(m.key, info)
        if m is not None and stale is None and unavailable is None:
            why_refused = refused(m)
        rows.append(EngineRow(st.id, m, stale, unavailable, why_refused))
    return rows
