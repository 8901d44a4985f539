"""Helpers for tests/test_reliability_serving.py: trial counts, lock-wait instrumentation, fault injection at named
points, a host whose PyTorch UNet carries the active LoRA (as A1111's does), a fake TensorRT module, a pickle bomb,
and a toy engine whose refit is deliberately not atomic (so a refit racing a call would show as mixed weights)."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch

from sdtrt.backends.base import Backend, BackendInfo, BuildOptions, BuildResult, EngineProfile, EngineRunner
from sdtrt.errors import RefitError, SdtrtError, StaleEngine
from sdtrt.pipeline.checkpoint import build_unet, open_checkpoint
from sdtrt.pipeline.refit import merge
from webui_support import DictHost

#: CI sets SDTRT_LONG=1 for the full trial counts; without it the file stays well under 90 s on 2 cores.
LONG = os.environ.get("SDTRT_LONG") == "1"


def count(short: int, long: int) -> int:
    return long if LONG else short


def report(name: str, **figures: object) -> None:
    """One line per figure, visible with `pytest -s` and in CI logs on failure."""
    print(f"\n[figure] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# ---- lock waits -------------------------------------------------------------------------------------------------
class WaitLog:
    """Every acquire of an instrumented lock: (thread name, lock name, seconds waited)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, float]] = []
        self._lock = threading.Lock()

    def add(self, thread: str, lock: str, waited: float) -> None:
        with self._lock:
            self.records.append((thread, lock, waited))

    def worst(self, thread_prefix: str) -> tuple[float, str]:
        with self._lock:
            mine = [(w, lock) for t, lock, w in self.records if t.startswith(thread_prefix)]
        return max(mine, default=(0.0, "none"))

    def acquires(self, thread_prefix: str) -> int:
        with self._lock:
            return sum(t.startswith(thread_prefix) for t, _, _ in self.records)


class TimedLock:
    """A Lock/RLock that records how long each acquire waited (success or timeout)."""

    def __init__(self, inner: Any, name: str, log: WaitLog) -> None:
        self._inner, self.name, self._log = inner, name, log

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        start = time.perf_counter()
        ok = self._inner.acquire(blocking, timeout)
        self._log.add(threading.current_thread().name, self.name, time.perf_counter() - start)
        return bool(ok)

    def release(self) -> None:
        self._inner.release()

    def locked(self) -> bool:
        return bool(getattr(self._inner, "locked", lambda: False)())

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _ThreadingProxy:
    """Stands in for the `threading` module inside one module: its Lock/RLock are instrumented."""

    def __init__(self, log: WaitLog, prefix: str) -> None:
        self._log, self._prefix = log, prefix

    def Lock(self) -> TimedLock:
        return TimedLock(threading.Lock(), f"{self._prefix}.Lock", self._log)

    def RLock(self) -> TimedLock:
        return TimedLock(threading.RLock(), f"{self._prefix}.RLock", self._log)

    def __getattr__(self, name: str) -> Any:
        return getattr(threading, name)


def instrument_locks(svc: Any, monkeypatch: Any, log: WaitLog) -> None:
    """Time every lock a UNet call can take: the service's, its per-engine load locks, each engine session's, the
    counters' and the job queue's."""
    import sdtrt.webui.activation as activation_module
    import sdtrt.webui.state as state_module
    from sdtrt.serving.session import EngineSession

    svc.state.lock = TimedLock(svc.state.lock, "service._lock", log)
    svc.counters._lock = TimedLock(svc.counters._lock, "counters._lock", log)
    svc.jobs._lock = TimedLock(svc.jobs._lock, "jobs._lock", log)
    for module in (state_module, activation_module):
        monkeypatch.setattr(module, "threading", _ThreadingProxy(log, "service"))
    real_open = EngineSession.__dict__["open"].__func__

    def open_timed(cls: type, *a: Any, **k: Any) -> Any:
        session = real_open(cls, *a, **k)
        session.lock = TimedLock(threading.RLock(), f"session[{session.manifest.id}].lock", log)
        return session

    monkeypatch.setattr(EngineSession, "open", classmethod(open_timed))


# ---- fault injection ------------------------------------------------------------------------------------------
class Injected(RuntimeError):
    """Marker base for exceptions raised by the injector (so a test can tell them from real ones)."""


def fault(kind: str, where: str) -> BaseException:
    text = f"injected fault at {where}"
    return {
        "runtime": RuntimeError(text),
        "oserror": OSError(errno.EIO, text),
        "value": ValueError(text),
        "memory": MemoryError(text),
        "refit": RefitError(text),
        "stale": StaleEngine(text),
    }[kind]


FAULT_KINDS = ("runtime", "oserror", "value", "memory", "refit", "stale")


@dataclass
class Point:
    name: str
    owner: Any
    attr: str


class Injector:
    """Wraps named callables: counts their calls, and raises a chosen exception at the n-th call of one of them."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.fired: list[str] = []
        self._saved: list[tuple[Any, str, Any, bool]] = []
        self._lock = threading.Lock()
        self._armed: tuple[str, int, BaseException] | None = None
        self._local = threading.local()

    def wrap(self, points: Sequence[Point]) -> None:
        for p in points:
            self._wrap(p)

    def arm(self, point: str, hit: int, exc: BaseException) -> None:
        with self._lock:
            self.calls = {}
            self.fired = []
            self._armed = (point, hit, exc)

    def count_only(self) -> None:
        with self._lock:
            self.calls = {}
            self.fired = []
            self._armed = None

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The test harness's own calls (references, loading the host's model) neither count nor fault."""
        self._local.paused = True
        try:
            yield
        finally:
            self._local.paused = False

    def _hit(self, name: str) -> None:
        if getattr(self._local, "paused", False):
            return
        with self._lock:
            n = self.calls[name] = self.calls.get(name, 0) + 1
            armed = self._armed
            if armed is None or armed[0] != name or armed[1] != n:
                return
            self.fired.append(name)
            exc = armed[2]
        raise exc

    def _wrap(self, p: Point) -> None:
        owner, attr = p.owner, p.attr
        is_class = isinstance(owner, type)
        raw = owner.__dict__[attr] if is_class and attr in owner.__dict__ else getattr(owner, attr)
        had = (attr in owner.__dict__) if is_class else (attr in getattr(owner, "__dict__", {}))
        hit = self._hit
        name = p.name
        if isinstance(raw, classmethod):
            func = raw.__func__

            def cm(cls: Any, *a: Any, **k: Any) -> Any:
                hit(name)
                return func(cls, *a, **k)

            new: Any = classmethod(cm)
        elif isinstance(raw, staticmethod):
            sfunc = raw.__func__

            def sm(*a: Any, **k: Any) -> Any:
                hit(name)
                return sfunc(*a, **k)

            new = staticmethod(sm)
        else:
            target = raw

            def fn(*a: Any, **k: Any) -> Any:
                hit(name)
                return target(*a, **k)

            new = fn
        self._saved.append((owner, attr, raw if had else None, had))
        setattr(owner, attr, new)

    def restore(self) -> None:
        for owner, attr, raw, had in reversed(self._saved):
            if had:
                setattr(owner, attr, raw)
            else:
                with contextlib.suppress(AttributeError):
                    delattr(owner, attr)
        self._saved.clear()


# ---- a host whose PyTorch UNet carries the LoRA (A1111 merges LoRA into its torch weights) ----------------------
@dataclass
class LoraHost(DictHost):
    """DictHost plus A1111's LoRA behaviour: `lora` names the active set (None: none). network_key/network_weights
    describe it to the engine, and the PyTorch fallback runs a UNet with the set merged, as A1111's does."""

    loras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # set -> {weight name: delta}
    #: sets given as final weight values, handed to the engine as they are (wrong names or shapes); the PyTorch
    #: UNet skips them, as A1111 skips a LoRA it cannot apply
    raw: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    lora: str | None = None
    files: list[str] = field(default_factory=list)  # what network_files() reports (see service._check_network_files)
    _torch: dict[tuple[str, str | None], torch.nn.Module] = field(default_factory=dict)

    def network_key(self) -> Any:
        return () if self.lora is None else ((self.lora, 1.0),)

    def network_weights(self, base: Any) -> Any:
        if self.lora is None:
            return {}
        if self.lora in self.raw:
            return dict(self.raw[self.lora])
        deltas = self.loras[self.lora]
        bases = base(sorted(deltas))
        missing = sorted(set(deltas) - set(bases))
        if missing:
            raise SdtrtError(f"no base weights for {missing[:3]}")
        return {n: merge(bases[n], d) for n, d in deltas.items()}

    def network_files(self) -> list[str]:
        return list(self.files)

    def reference_unet(self, lora: str | None) -> torch.nn.Module:
        assert self.loaded is not None
        if lora in self.raw:
            lora = None
        key = (self.loaded.filename, lora)
        if key not in self._torch:
            ckpt, sd = open_checkpoint(Path(self.loaded.filename))
            if lora is not None:
                sd = {**sd}
                for n, d in self.loras[lora].items():
                    sd[n] = merge(sd[n], d)
            self._torch[key] = build_unet(ckpt.info, sd).eval()
        return self._torch[key]

    def torch_forward(self, unet: torch.nn.Module) -> Callable[..., torch.Tensor]:
        ref = self.reference_unet(self.lora)

        def forward(*a: Any, **k: Any) -> torch.Tensor:
            with torch.no_grad():
                return ref(*a, **k)

        return forward


def make_lora(sd: Mapping[str, torch.Tensor], names: Sequence[str], seed: int, scale: float = 0.5
              ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * sd[n].float().std() * torch.randn(sd[n].shape, generator=g) for n in names}


# ---- fake TensorRT ------------------------------------------------------------------------------------------------
FAKE_TRT_HEADER = b"FAKE-TRT-PLAN v10.99.0\n"


@dataclass
class FakeTrtCalls:
    deserialize: int = 0
    validity: int = 0


def fake_tensorrt(version: str, calls: FakeTrtCalls, *, rtx_validity: bool, deserialized: Any = None
                  ) -> ModuleType:
    """A `tensorrt`-like module: enough of ILogger, Runtime and EngineValidity for the backends/tensorrt package's load.
    deserialize_cuda_engine returns `deserialized` (None: what the real one returns for a foreign or damaged plan).
    With `rtx_validity`, Runtime.get_engine_validity (TensorRT-RTX 1.1+) reads the header only, like the real one."""
    import enum

    mod = ModuleType("tensorrt")
    mod.__version__ = version  # type: ignore[attr-defined]

    class Builder:
        pass

    class ILogger:
        class Severity(enum.IntEnum):
            INTERNAL_ERROR = 0
            ERROR = 1
            WARNING = 2
            INFO = 3
            VERBOSE = 4

        def __init__(self) -> None:
            pass

    class EngineValidity(enum.Enum):
        VALID = 0
        SUBOPTIMAL = 1
        INVALID = 2

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes) -> Any:
            calls.deserialize += 1
            self.logger.log(ILogger.Severity.ERROR, "Error Code 6: The engine plan file is not compatible with this "
                                                    "version of TensorRT")
            return deserialized

        if rtx_validity:
            def get_engine_validity(self, plan: bytes) -> tuple[Any, int]:
                calls.validity += 1
                ok = bytes(plan[: len(FAKE_TRT_HEADER)]) == FAKE_TRT_HEADER
                return (EngineValidity.VALID if ok else EngineValidity.INVALID), (0 if ok else 1)

    mod.Builder = Builder  # type: ignore[attr-defined]
    mod.ILogger = ILogger  # type: ignore[attr-defined]
    mod.Runtime = Runtime  # type: ignore[attr-defined]
    if rtx_validity:
        mod.EngineValidity = EngineValidity  # type: ignore[attr-defined]
    return mod


# ---- pickle bomb --------------------------------------------------------------------------------------------------
class _Bomb:
    """Unpickling this calls open(canary, "w"): the canary file appears iff the bytes were ever unpickled."""

    def __init__(self, canary: Path) -> None:
        self.canary = str(canary)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.canary, "w"))


def write_pickle_bomb(path: Path, canary: Path) -> Path:
    """A LoRA-looking pickle (what `torch.save` of a state dict is, minus the zip) whose loading creates `canary`."""
    payload = {"lora_unet_input_blocks_1_1_proj_in.lora_up.weight": _Bomb(canary),
               "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": [0.0] * 4}
    path.write_bytes(pickle.dumps(payload, protocol=2))
    return path


# ---- a toy engine whose refit is not atomic ------------------------------------------------------------------------
@dataclass
class ToyState:
    """What a ToyRunner starts with, shared by every runner the ToyBackend loads."""

    names: list[str]
    initial: dict[str, torch.Tensor]
    coef: dict[str, float]
    loads: int = 0
    pause: float = 0.0  # seconds between weights, inside infer and refit: widens any race window


def toy_value(state: ToyState, weights: Mapping[str, torch.Tensor]) -> float:
    return float(sum(state.coef[n] * float(weights[n].double().sum()) for n in state.names))


class ToyRunner(EngineRunner):
    """infer returns sample * (sum over weights of coef * sum(weight)), reading the weights one by one; refit writes
    them one by one, in place. Without serialization a call overlapping a refit sees a mix: a value no consistent
    weight set gives."""

    refit_is_atomic = False

    def __init__(self, state: ToyState) -> None:
        self.state = state
        self.w = {n: t.clone() for n, t in state.initial.items()}
        self.closed = False

    def _pause(self) -> None:
        if self.state.pause:
            time.sleep(self.state.pause)

    def infer(self, feeds: Mapping[str, torch.Tensor], profile_index: int) -> torch.Tensor:
        if self.closed:
            raise RuntimeError("toy engine used after close (a real engine would crash here)")
        total = 0.0
        for n in self.state.names:
            total += self.state.coef[n] * float(self.w[n].double().sum())
            self._pause()
        return torch.full(feeds["sample"].shape, total, dtype=torch.float64)

    def weight_names(self) -> set[str]:
        return set(self.state.names)

    def refit(self, weights: Mapping[str, torch.Tensor],
              fill: Callable[[Sequence[str]], Mapping[str, torch.Tensor]] | None = None) -> None:
        for n, t in weights.items():
            if tuple(t.shape) != tuple(self.w[n].shape):
                raise RefitError(f"weight {n} has shape {tuple(t.shape)}, the engine expects {tuple(self.w[n].shape)}")
        for n, t in weights.items():
            self.w[n].copy_(t.to(self.w[n].dtype))
            self._pause()

    def close(self) -> None:
        self.closed = True


class ToyBackend(Backend):
    """Loads ToyRunners for the published onnxruntime engines (same name, version and device, so verification
    passes): the registry, the verification and the serving code are the real ones."""

    name: ClassVar[str] = "onnxruntime"
    state: ClassVar[ToyState | None] = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None

    def info(self) -> BackendInfo:
        from sdtrt.backends.ort import OrtBackend

        return OrtBackend().info()

    def build(self, onnx_path: Path, profiles: Sequence[EngineProfile], out_dir: Path, options: BuildOptions,
              progress: Any = None) -> BuildResult:
        raise NotImplementedError

    def load(self, engine_dir: Path, files: Sequence[str], profiles: Sequence[EngineProfile], *,
             digests: Mapping[str, str] | None = None) -> EngineRunner:
        assert self.state is not None
        self.state.loads += 1
        return ToyRunner(self.state)


def pick(rng: random.Random, options: Sequence[Any]) -> Any:
    return options[rng.randrange(len(options))]


@contextlib.contextmanager
def thread_named(name: str) -> Iterator[None]:
    t = threading.current_thread()
    old = t.name
    t.name = name
    try:
        yield
    finally:
        t.name = old
