"""A minimal in-process Host (no A1111) over a tiny checkpoint, for the host-agnostic WebUI tests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sdtrt.errors import SdtrtError
from sdtrt.pipeline.checkpoint import build_unet, open_checkpoint
from sdtrt.webui.host import CheckpointRef, HostDefaults, Settings


@dataclass
class DictHost(HostDefaults):
    """Implements sdtrt.webui.host.Host over plain attributes; every call is recorded."""

    models: Path
    refs: list[CheckpointRef] = field(default_factory=list)
    loaded: CheckpointRef | None = None
    unet: torch.nn.Module | None = None
    settings_: Settings = field(default_factory=Settings)
    told: list[tuple[object, str]] = field(default_factory=list)
    refreshes: int = 0
    lock: Any = field(default_factory=threading.Lock)
    low: bool = False
    net_key: Any = ()
    net_weights: Callable[[Any], Any] = field(default=lambda base: {})

    def settings(self) -> Settings:
        return self.settings_

    def set(self, **changes: Any) -> None:
        self.settings_ = replace(self.settings_, **changes)

    def models_dir(self) -> Path:
        return self.models

    def device(self) -> torch.device:
        return torch.device("cpu")

    def torch_unet(self) -> torch.nn.Module | None:
        return self.unet

    def torch_forward(self, unet: torch.nn.Module) -> Callable[..., torch.Tensor]:
        return unet.forward

    def lowvram(self) -> bool:
        return self.low

    def loaded_checkpoint(self) -> CheckpointRef | None:
        return self.loaded

    def checkpoints(self) -> list[CheckpointRef]:
        return list(self.refs)

    def resolve_checkpoint(self, name: str) -> CheckpointRef:
        for r in self.refs:
            if name in (r.title, r.model_name):
                return r
        raise SdtrtError(f"unknown checkpoint {name!r}")

    def refresh_unet_list(self) -> None:
        self.refreshes += 1

    @contextlib.contextmanager
    def quiet_torch(self, waiting: Any) -> Any:
        if not self.lock.acquire(blocking=False):
            waiting("waiting for the generation in progress to finish")
            self.lock.acquire()
        try:
            yield
        finally:
            self.lock.release()

    def tell_user(self, p: object, text: str) -> None:
        self.told.append((p, text))

    def network_key(self) -> Any:
        return self.net_key

    def network_weights(self, base: Any) -> Any:
        return self.net_weights(base)

    # ---- helpers for tests ------------------------------------------------------------------------------
    def add_checkpoint(self, path: Path, *, load: bool = False) -> CheckpointRef:
        ref = CheckpointRef(title=f"{path.name} [0000000000]", model_name=path.stem, filename=str(path),
                            config=str(path.with_suffix(".yaml")))
        self.refs.append(ref)
        if load:
            self.load(ref)
        return ref

    def load(self, ref: CheckpointRef) -> None:
        ckpt, sd = open_checkpoint(Path(ref.filename))
        self.unet, self.loaded = build_unet(ckpt.info, sd), ref


@contextlib.contextmanager
def fresh_service(host: DictHost):  # type: ignore[no-untyped-def]
    from sdtrt.webui.service import EngineService

    svc = EngineService()
    svc.attach(host)
    try:
        yield svc
    finally:
        svc.close_sessions()


def close_webuis(hosts: Iterable[Any]) -> None:
    """Close booted fake WebUIs and drop the process-wide EngineService they shared (its engine sessions closed),
    so the next boot starts with a fresh one as a new WebUI process would."""
    import sdtrt.webui.service as service_module

    for host in hosts:
        host.close()
    if service_module._SERVICE is not None:
        service_module._SERVICE.close_sessions()
    service_module._SERVICE = None
