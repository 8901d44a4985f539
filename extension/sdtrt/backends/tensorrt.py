"""TensorRT (10.x, 11.x, module `tensorrt`) and TensorRT-RTX (1.x, module `tensorrt_rtx`) behind one implementation.

Both libraries share the core API (builder, ONNX parser, profiles, refitter, runtime, execute_async_v3) and differ in
a few members, so everything here detects features by attribute and enum *names* (``hasattr``), never by version
numbers or literal flag integers: flag values moved between 10.x, 11.x and RTX (STRONGLY_TYPED is 1 in 10.x, 0 in
11.x and RTX; STRIP_PLAN 19 versus 18).

Why this file is executed once more per library: the code below calls the library through a module-global ``trt``.
For mypy that global *is* the `tensorrt` stub module (``if TYPE_CHECKING: import tensorrt as trt``), so every call,
class base and annotation is checked against tensorrt-stubs. At run time `_bound()` executes this same file again as
a private module whose ``trt`` is the real library, once per library, so `tensorrt` and `tensorrt_rtx` can be used
side by side in one process. Members the 10.13 stubs lack (IRuntimeCache, CudaGraphStrategy, ComputeCapability,
SerializationFlag.INCLUDE_REFIT, ...) are reached with ``getattr`` after a name check, so mypy stays clean.

Nothing is imported at import time: the library and torch are imported inside functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, cast

from sdtrt.backends.base import (
    Backend,
    BackendInfo,
    BuildOptions,
    BuildResult,
    EngineProfile,
    EngineRunner,
    ProgressCallback,
    no_progress,
)
from sdtrt.backends.graphs import GraphCache
from sdtrt.constants import OUTPUT_LATENT
from sdtrt.errors import (
    BackendUnavailable,
    BuildError,
    CorruptEngine,
    NoMatchingProfile,
    RefitError,
    RefitRejected,
    SdtrtError,
    StaleEngine,
)

if TYPE_CHECKING:
    import tensorrt as trt  # tensorrt-stubs 10.13 type both libraries
    import torch
else:
    trt = None  # bound to the real library in each copy made by _bound()

#: The one file a build writes.
PLAN_FILE = "unet.plan"

#: backend name -> (python module, install hint).
LIBRARIES: dict[str, tuple[str, str]] = {
    "tensorrt": (
        "tensorrt",
        "pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com (tensorrt-cu13 for CUDA 13)",
    ),
    "tensorrt-rtx": ("tensorrt_rtx", "pip install tensorrt-rtx-cu12 (tensorrt-rtx-cu13 for CUDA 13)"),
}

#: TensorRT DataType member name -> torch dtype name. The one table for inputs, outputs and refit weights.
TORCH_DTYPES: dict[str, str] = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "FP8": "float8_e4m3fn",
}

#: How many library messages an error text quotes (the last ones: they name the cause).
_QUOTED_MESSAGES = 8


# ---------------------------------------------------------------------------------------------------------------------
# Library-independent part: probing, the per-library binding, the Backend classes.


def _import_library(module_name: str) -> ModuleType:
    """Import the real library or raise BackendUnavailable. A module without `Builder` (e.g. the namespace package
    that tensorrt-stubs leaves behind) does not count as installed."""
    hint = next((h for m, h in LIBRARIES.values() if m == module_name), f"pip install {module_name}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or OSError when the shared libraries are missing
        raise BackendUnavailable(f"Python module {module_name!r} cannot be imported ({exc}); {hint}") from exc
    if not hasattr(module, "Builder"):
        raise BackendUnavailable(
            f"Python module {module_name!r} is only type stubs or a partial install (no Builder); {hint}"
        )
    return module


_BOUND: dict[str, ModuleType] = {}
_BOUND_LOCK = threading.Lock()


def _bound(module_name: str) -> ModuleType:
    """This file executed again as a private module whose global `trt` is `module_name` (see the module docstring)."""
    with _BOUND_LOCK:
        copy = _BOUND.get(module_name)
        if copy is None:
            library = _import_library(module_name)
            qualname = f"sdtrt.backends._{module_name}_bound"
            spec = importlib.util.spec_from_file_location(qualname, __file__)
            if spec is None or spec.loader is None:
                raise BackendUnavailable(f"cannot load {__file__} for {module_name}")
            copy = importlib.util.module_from_spec(spec)
            sys.modules[qualname] = copy
            try:
                spec.loader.exec_module(copy)
            except BaseException:
                del sys.modules[qualname]
                raise
            vars(copy)["trt"] = library
            _BOUND[module_name] = copy
        return copy


def _cuda_device() -> tuple[str, int, int]:
    """(name, major, minor) of the current CUDA device; BackendUnavailable without one."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); "
            "TensorRT needs an NVIDIA GPU and its driver"
        )
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), major, minor


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


class _TensorRTFamily(Backend):
    """Shared facade: probes without the library, delegates the work to `_Impl` inside the bound copy."""

    module_name: ClassVar[str]
    rtx: ClassVar[bool]

    def __init__(self, cache_dir: Path | None = None, *, cuda_graphs: bool = True) -> None:
        # cache_dir: where `load` keeps the TensorRT-RTX runtime cache; `build` sets it from BuildOptions when unset.
        super().__init__(cache_dir, cuda_graphs=cuda_graphs)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            _import_library(cls.module_name)
            _cuda_device()
        except BackendUnavailable as exc:
            return str(exc)
        return None

    def _impl(self) -> _Impl:
        return cast(_Impl, _bound(self.module_name)._Impl(self.name, self.rtx))

    def info(self) -> BackendInfo:
        gpu, major, minor = _cuda_device()
        version = str(getattr(_import_library(self.module_name), "__version__", "unknown"))
        return BackendInfo(self.name, version, f"{gpu} (sm{major}{minor})", f"{major}.{minor}")

    def build(
        self,
        onnx_path: Path,
        profiles: Sequence[EngineProfile],
        out_dir: Path,
        options: BuildOptions,
        progress: ProgressCallback = no_progress,
    ) -> BuildResult:
        if not profiles:
            raise BuildError("no optimization profile given: an engine needs at least one")
        if options.strip_weights and not options.refit:
            raise BuildError(
                "strip_weights needs refit: a weight-stripped engine gets its weights by refit at load "
                "(STRIP_PLAN alone would mean REFIT_IDENTICAL, which cannot take LoRA weights)"
            )
        if self.cache_dir is None:
            self.cache_dir = options.cache_dir
        return self._impl().build(Path(onnx_path), profiles, Path(out_dir), options, progress)

    def load(self, engine_dir: Path, files: Sequence[str], profiles: Sequence[EngineProfile], *,
             digests: Mapping[str, str] | None = None) -> EngineRunner:
        names = [f for f in files if Path(f).name == PLAN_FILE] or list(files)
        if len(names) != 1:
            raise StaleEngine(f"expected one {PLAN_FILE} among the engine files, got {list(files)}; rebuild the engine")
        expected = (digests or {}).get(names[0])
        return self._impl().load(Path(engine_dir) / names[0], profiles, self.cache_dir, self.cuda_graphs, expected)


class TensorRTBackend(_TensorRTFamily):
    """NVIDIA TensorRT 10.x / 11.x (module `tensorrt`)."""

    name = "tensorrt"
    module_name = "tensorrt"
    rtx = False


class TensorRTRTXBackend(_TensorRTFamily):
    """NVIDIA TensorRT for RTX 1.x (module `tensorrt_rtx`): JIT-compiled kernels, runtime cache, built-in CUDA graphs."""

    name = "tensorrt-rtx"
    module_name = "tensorrt_rtx"
    rtx = True


def backend_for(name: str) -> type[Backend]:
    """The Backend class for "tensorrt" or "tensorrt-rtx"."""
    classes: dict[str, type[Backend]] = {c.name: c for c in (TensorRTBackend, TensorRTRTXBackend)}
    if name not in classes:
        raise BackendUnavailable(f"unknown TensorRT backend {name!r}; choose one of {', '.join(classes)}")
    return classes[name]


def parse_onnx(onnx_path: Path, module_name: str = "tensorrt_rtx") -> list[str]:
    """Parse `onnx_path` into a strongly typed network with the library's OnnxParser; the parser's error strings,
    empty when it parsed. Needs no GPU with TensorRT-RTX, so CI can check exported graphs."""
    return cast(_Impl, _bound(module_name)._Impl(module_name, module_name == "tensorrt_rtx")).parse(Path(onnx_path))


# ---------------------------------------------------------------------------------------------------------------------
# Library-dependent part: everything below runs inside a bound copy, where `trt` is the real library.


class _Messages:
    """What the library logged. Builds and loads quote the errors, so users see TensorRT's own reason."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def add(self, error: bool, warning: bool, msg: str) -> None:
        if error:
            self.errors.append(msg)
        elif warning:
            self.warnings.append(msg)

    def text(self, fallback: str = "no error message from the library") -> str:
        return "; ".join(self.errors[-_QUOTED_MESSAGES:]) or fallback


def _logger(messages: _Messages) -> trt.ILogger:
    """A trt.ILogger that collects instead of printing. Keep it referenced while the library may call it."""
    error = int(trt.ILogger.Severity.ERROR)
    warning = int(trt.ILogger.Severity.WARNING)

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            level = int(severity)
            messages.add(level <= error, level == warning, msg)

    return _Logger()


class _Progress:
    """Forwards build phases to the callback. A raising callback (e.g. KeyboardInterrupt) cancels the build: the
    exception cannot cross the C++ boundary, so it is kept and the next step_complete answers False."""

    def __init__(self, callback: ProgressCallback) -> None:
        self.callback = callback
        self.steps: dict[str, int] = {}
        self.cancelled: BaseException | None = None

    def report(self, phase: str, fraction: float) -> bool:
        if self.cancelled is None:
            try:
                self.callback(phase, min(max(fraction, 0.0), 1.0))
            except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt is the cancel signal
                self.cancelled = exc
        return self.cancelled is None


def _progress_monitor(relay: _Progress) -> trt.IProgressMonitor:
    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
            relay.steps[phase_name] = max(int(num_steps), 1)
            relay.report(phase_name, 0.0)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return relay.report(phase_name, (step + 1) / relay.steps.get(phase_name, step + 1))

        def phase_finish(self, phase_name: str) -> None:
            relay.report(phase_name, 1.0)

    return _Monitor()


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _torch_dtype(dtype: trt.DataType) -> torch.dtype:
    import torch

    name = TORCH_DTYPES.get(dtype.name)
    if name is None or not hasattr(torch, name):
        raise SdtrtError(f"TensorRT data type {dtype.name} has no torch equivalent here")
    return cast("torch.dtype", getattr(torch, name))


def _write_atomic(path: Path, data: Any) -> None:
    """Write bytes (or a buffer such as IHostMemory) so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cache_file(cache_dir: Path, kind: str) -> Path:
    """Caches are only valid for one library version and GPU, so both are in the name."""
    gpu, major, minor = _cuda_device()
    version = str(getattr(trt, "__version__", "unknown"))
    return cache_dir / f"{kind}-{trt.__name__}-{version}-{_slug(gpu)}-sm{major}{minor}.cache"


def _enum_member(enum_name: str, member: str) -> Any | None:
    """trt.<enum_name>.<member> when this library has it, else None (feature detection by name)."""
    return getattr(getattr(trt, enum_name, None), member, None)


class _Impl:
    """The work: parse, build, load. One instance per call; holds no library objects."""

    def __init__(self, backend_name: str, rtx: bool) -> None:
        self.backend_name = backend_name
        self.rtx = rtx

    def _network(
        self, messages: _Messages, onnx_path: Path
    ) -> tuple[trt.ILogger, trt.Builder, trt.INetworkDefinition, trt.OnnxParser, bool]:
        logger = _logger(messages)
        builder = trt.Builder(logger)
        if builder is None:
            raise BuildError(f"{self.backend_name} could not create a builder: {messages.text()}")
        # Strongly typed: the ONNX graph carries the precision; TensorRT 11 and RTX know no other mode.
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse_from_file(str(onnx_path))  # from a path, so >2 GB external data is found
        return logger, builder, network, parser, bool(ok)

    def parse(self, onnx_path: Path) -> list[str]:
        messages = _Messages()
        held = self._network(messages, onnx_path)  # logger, builder, network must outlive the parser: keep all
        parser, ok = held[3], held[4]
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        if not ok and not errors:
            errors = [messages.text(f"{onnx_path} could not be parsed")]
        return errors

    def build(
        self,
        onnx_path: Path,
        profiles: Sequence[EngineProfile],
        out_dir: Path,
        options: BuildOptions,
        progress: ProgressCallback,
    ) -> BuildResult:
        relay = _Progress(progress)
        started = time.monotonic()

        def step(phase: str, fraction: float) -> None:
            if not relay.report(phase, fraction):
                raise BuildError(f"engine build cancelled ({type(relay.cancelled).__name__})") from relay.cancelled

        step("parse", 0.0)
        messages = _Messages()
        logger, builder, network, parser, ok = self._network(messages, onnx_path)
        if not ok:
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or [messages.text()]
            raise BuildError(f"{self.backend_name} cannot parse {onnx_path}: " + "; ".join(errors[:_QUOTED_MESSAGES]))
        step("parse", 1.0)

        config = builder.create_builder_config()
        inputs = {network.get_input(i).name for i in range(network.num_inputs)}
        for index, profile in enumerate(profiles):
            if set(profile) != inputs:
                raise BuildError(
                    f"profile {index} names inputs {sorted(profile)} but the ONNX graph has {sorted(inputs)}"
                )
            opt_profile = builder.create_optimization_profile()
            for name, r in profile.items():
                opt_profile.set_shape(name, trt.Dims(list(r.min)), trt.Dims(list(r.opt)), trt.Dims(list(r.max)))
            if config.add_optimization_profile(opt_profile) < 0:
                raise BuildError(f"profile {index} is invalid for this graph: {messages.text()}")

        extra: dict[str, object] = {"library": trt.__name__, "version": str(getattr(trt, "__version__", ""))}
        if options.refit:
            config.set_flag(trt.BuilderFlag.REFIT)
        if options.strip_weights:
            # Only together with REFIT: STRIP_PLAN alone implies REFIT_IDENTICAL, which breaks LoRA refits.
            if not hasattr(trt.BuilderFlag, "STRIP_PLAN"):
                raise BuildError(f"{trt.__name__} has no BuilderFlag.STRIP_PLAN; build with strip_weights off")
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        if options.workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
        if options.optimization_level is not None:
            config.builder_optimization_level = options.optimization_level

        timing_cache = None
        if self.rtx:
            current = _enum_member("ComputeCapability", "CURRENT")
            if current is not None and hasattr(config, "num_compute_capabilities"):
                # Kernels for this GPU only: smaller plan; the engine key already names the GPU.
                rtx_config: Any = config  # members the 10.13 stubs lack, present (checked above) in RTX
                rtx_config.num_compute_capabilities = 1
                rtx_config.set_compute_capability(current, 0)
                extra["compute_capability"] = "current"
        elif options.cache_dir is not None:  # RTX ignores timing caches, and they force a GPU query there
            timing_cache = _cache_file(Path(options.cache_dir), "timing")
            self._load_timing_cache(config, timing_cache)
            extra["timing_cache"] = timing_cache.name

        monitor = None
        if hasattr(trt, "IProgressMonitor"):
            monitor = _progress_monitor(relay)
            config.progress_monitor = monitor
        step("build", 0.0)
        plan = builder.build_serialized_network(network, config)
        if relay.cancelled is not None:
            raise BuildError(f"engine build cancelled ({type(relay.cancelled).__name__})") from relay.cancelled
        if plan is None:
            raise BuildError(f"{self.backend_name} could not build the engine: {messages.text()}")
        step("build", 1.0)
        if timing_cache is not None:
            try:
                _write_atomic(timing_cache, config.get_timing_cache().serialize())
            except OSError as exc:
                extra["timing_cache_error"] = str(exc)
        del parser, network, config, builder, monitor  # free builder memory before the check below

        data, extra["include_refit"] = self._check_plan(plan, options, logger, messages)
        step("write", 0.0)  # the last point where a cancel is honoured
        _write_atomic(out_dir / PLAN_FILE, data)
        relay.report("write", 1.0)
        extra.update(
            profiles=len(profiles),
            strongly_typed=True,
            plan_bytes=(out_dir / PLAN_FILE).stat().st_size,
            build_seconds=round(time.monotonic() - started, 1),
            warnings=messages.warnings[-_QUOTED_MESSAGES:],
        )
        return BuildResult(
            files=[PLAN_FILE],
            weights="stripped" if options.strip_weights else "embedded",
            refit_mode="refit" if options.refit else "none",
            extra=extra,
        )

    @staticmethod
    def _load_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
        """Reuse tactic timings from earlier builds; a corrupt or foreign file just means starting fresh."""
        blob = b""
        try:
            blob = path.read_bytes()
        except OSError:
            pass
        cache = None
        if blob:
            try:
                cache = config.create_timing_cache(blob)
            except Exception:  # noqa: BLE001 - corrupt cache: start fresh
                cache = None
        if cache is None or not config.set_timing_cache(cache, False):
            config.set_timing_cache(config.create_timing_cache(b""), False)

    def _check_plan(
        self, plan: trt.IHostMemory, options: BuildOptions, logger: trt.ILogger, messages: _Messages
    ) -> tuple[Any, bool]:
        """Deserialize the fresh plan once: a plan that does not load, or is not refittable although refit was asked
        for, fails the build instead of the first generation. Where SerializationFlag.INCLUDE_REFIT exists, the plan
        is serialized again with it (and EXCLUDE_WEIGHTS when stripped) so it stays refittable."""
        if not options.refit:
            return plan, False
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BuildError(f"the engine just built does not load: {messages.text()}")
        if not engine.refittable:
            raise BuildError("the engine was built without refit support although refit was requested")
        include_refit = _enum_member("SerializationFlag", "INCLUDE_REFIT")
        if include_refit is None:
            return plan, False
        serialization = engine.create_serialization_config()
        serialization.set_flag(include_refit)
        if options.strip_weights:
            serialization.set_flag(trt.SerializationFlag.EXCLUDE_WEIGHTS)
        again = engine.serialize_with_config(serialization)
        del serialization, engine  # before the runtime that made it
        return (plan, False) if again is None else (again, True)

    def load(
        self,
        plan_path: Path,
        profiles: Sequence[EngineProfile],
        cache_dir: Path | None,
        cuda_graphs: bool = True,
        sha256: str | None = None,
    ) -> _Runner:
        try:
            plan = plan_path.read_bytes()
        except OSError as exc:
            raise StaleEngine(f"cannot read engine file {plan_path} ({exc}); rebuild the engine") from exc
        if sha256 is not None and hashlib.sha256(plan).hexdigest() != sha256:
            # the bytes in memory are what gets deserialized: checked here too, not only on disk before reading
            raise CorruptEngine(
                f"{plan_path} changed after it was verified (sha256 differs from the manifest); it was not "
                "deserialized. Rebuild the engine"
            )
        messages = _Messages()
        logger = _logger(messages)
        runtime = trt.Runtime(logger)
        validity = getattr(runtime, "get_engine_validity", None)
        invalid = _enum_member("EngineValidity", "INVALID")
        if validity is not None and invalid is not None:
            state, diagnostics = validity(plan)
            if state == invalid:
                raise StaleEngine(
                    f"{self.backend_name} cannot run {plan_path} on this GPU/driver (diagnostics {diagnostics!r}); "
                    "rebuild the engine"
                )
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise StaleEngine(f"{self.backend_name} refused {plan_path}: {messages.text()}; rebuild the engine")
        _check_profiles(engine, profiles, plan_path)
        return _Runner(runtime, engine, logger, messages, cache_dir, cuda_graphs, self.rtx)


def _check_profiles(engine: trt.ICudaEngine, profiles: Sequence[EngineProfile], plan_path: Path) -> None:
    """The manifest's profiles must be the engine's, else profile indices would select the wrong shapes."""
    if not profiles:
        return
    if engine.num_optimization_profiles != len(profiles):
        raise StaleEngine(
            f"{plan_path} has {engine.num_optimization_profiles} profiles, its manifest {len(profiles)}; rebuild it"
        )
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    for index, profile in enumerate(profiles):
        for name, r in profile.items():
            if name not in names:
                raise StaleEngine(f"{plan_path} has no input {name!r} (it has {sorted(names)}); rebuild it")
            got = [_dims(d) for d in engine.get_tensor_profile_shape(name, index)]
            if got != [tuple(r.min), tuple(r.opt), tuple(r.max)]:
                raise StaleEngine(f"{plan_path} profile {index} input {name!r} is {got}, the manifest says {r}")


class _Runner(EngineRunner):
    """One execution context over one engine. Not thread-safe: one UNet call at a time."""

    def __init__(
        self,
        runtime: trt.Runtime,
        engine: trt.ICudaEngine,
        logger: trt.ILogger,
        messages: _Messages,
        cache_dir: Path | None,
        cuda_graphs: bool = True,
        rtx: bool = False,
    ) -> None:
        import torch

        # The runtime, engine and logger must outlive the context: the library holds raw pointers to them.
        self._runtime: trt.Runtime | None = runtime
        self._engine: trt.ICudaEngine | None = engine
        self._logger = logger
        self._messages = messages
        self._device = torch.device("cuda", torch.cuda.current_device())
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {n: engine.get_tensor_mode(n) for n in names}
        self._inputs = [n for n in names if modes[n] == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
        if not self._outputs:
            raise StaleEngine("the engine has no output tensor; rebuild it")
        self._main_output = OUTPUT_LATENT if OUTPUT_LATENT in self._outputs else self._outputs[0]
        self._dtypes = {n: _torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self._profile = -1
        self._side_stream: torch.cuda.Stream | None = None
        self._capture_stream: torch.cuda.Stream | None = None
        self._weight_names: set[str] | None = None
        self._runtime_cache: Any = None
        self._runtime_cache_path: Path | None = None
        # TensorRT-RTX captures graphs itself (runtime config); full TensorRT through our GraphCache. Either way
        # the cache keeps static buffers per shape, so repeated calls of one shape skip all binding.
        self._builtin_graphs = cuda_graphs and rtx
        self.graphs: GraphCache[_Static, Any, torch.Tensor] = GraphCache(
            _GraphOps(self), enabled=cuda_graphs and not rtx
        )
        if rtx:
            self.graphs.disabled_reason = "TensorRT-RTX captures graphs itself" if cuda_graphs else "switched off"
        self._context: trt.IExecutionContext | None = self._create_context(engine, cache_dir)
        self.needs_weights = bool(engine.refittable) and bool(self._new_refitter().get_missing_weights())

    def _create_context(self, engine: trt.ICudaEngine, cache_dir: Path | None) -> trt.IExecutionContext:
        """Through a runtime config where one exists: on RTX it carries the built-in CUDA graph strategy and the
        runtime cache of JIT-compiled kernels (loaded before, saved after context creation and at close)."""
        context = None
        if hasattr(engine, "create_runtime_config"):
            config = engine.create_runtime_config()
            rtx_config: Any = config  # RTX members the 10.13 stubs lack; each is checked by name before use
            strategy = _enum_member("CudaGraphStrategy", "WHOLE_GRAPH_CAPTURE" if self._builtin_graphs else "DISABLED")
            if strategy is not None and hasattr(config, "cuda_graph_strategy"):
                rtx_config.cuda_graph_strategy = strategy
            if cache_dir is not None and hasattr(trt, "IRuntimeCache") and hasattr(config, "create_runtime_cache"):
                cache = rtx_config.create_runtime_cache()
                path = _cache_file(Path(cache_dir), "runtime")
                try:
                    blob = path.read_bytes()
                except OSError:
                    blob = b""
                # deserialize answers False on a version/GPU/driver mismatch; a corrupt file may raise. Either way
                # the cache stays empty and fills again.
                with contextlib.suppress(Exception):
                    if blob:
                        cache.deserialize(blob)
                rtx_config.set_runtime_cache(cache)
                self._runtime_cache, self._runtime_cache_path = cache, path
            context = engine.create_execution_context(config)
        else:
            context = engine.create_execution_context()
        if context is None:
            raise StaleEngine(f"cannot create an execution context: {self._messages.text()}")
        self._save_runtime_cache()
        return context

    def _save_runtime_cache(self) -> None:
        if self._runtime_cache is not None and self._runtime_cache_path is not None:
            try:
                _write_atomic(self._runtime_cache_path, self._runtime_cache.serialize())
            except OSError:
                pass  # a cache is an optimization; failing to write it must not fail generation

    def _live(self) -> tuple[trt.ICudaEngine, trt.IExecutionContext]:
        if self._engine is None or self._context is None:
            raise SdtrtError("this engine runner was closed; load the engine again")
        return self._engine, self._context

    def _stream(self) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        """(caller's stream, stream to run on). Work runs on the caller's current stream, so torch's ordering holds
        without host syncs; only on the legacy default stream, which makes TensorRT synchronize the device and
        cannot be graph-captured, it runs on a private stream ordered by events (wait_stream both ways)."""
        import torch

        current = torch.cuda.current_stream(self._device)
        if current.cuda_stream != 0:
            return current, current
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self._device)
        self._side_stream.wait_stream(current)
        return current, self._side_stream

    def infer(self, feeds: Mapping[str, torch.Tensor], profile_index: int) -> torch.Tensor:
        """Run one call. The returned tensor is the runner's static output buffer for this (profile, shape): it is
        overwritten by the next call with the same shape, so consume (or clone) it before calling again.

        Per call this copies the inputs into static buffers and launches: a captured CUDA graph from the third
        call of a shape on (see graphs.py), the engine itself before that. No allocation, no host sync."""
        engine, _ = self._live()
        if not 0 <= profile_index < engine.num_optimization_profiles:
            raise NoMatchingProfile(
                f"profile {profile_index} does not exist; the engine has {engine.num_optimization_profiles}"
            )
        try:
            key = (profile_index, *(tuple(feeds[n].shape) for n in self._inputs))
        except KeyError:
            missing = [n for n in self._inputs if n not in feeds]
            raise SdtrtError(f"missing engine inputs {missing}; the engine takes {self._inputs}") from None
        return self.graphs.run(key, feeds)

    def _select(self, profile_index: int, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Set the context's profile and input shapes (raises NoMatchingProfile outside the profile)."""
        _, context = self._live()
        if profile_index != self._profile:
            _, stream = self._stream()
            if not context.set_optimization_profile_async(profile_index, stream.cuda_stream):
                raise NoMatchingProfile(f"cannot switch to profile {profile_index}: {self._messages.text()}")
            if self._profile != -1:
                self.graphs.invalidate()  # every graph is captured again after a profile switch
            self._profile = profile_index
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise NoMatchingProfile(f"input {name!r} of shape {shape} is outside profile {profile_index}")

    def _execute(self, stream: torch.cuda.Stream) -> None:
        _, context = self._live()
        if not context.execute_async_v3(stream.cuda_stream):
            raise SdtrtError(f"{trt.__name__} failed to run the engine: {self._messages.text()}")

    def stats(self) -> dict[str, Any]:
        return {"cuda_graphs": self.graphs.describe()}

    def _new_refitter(self) -> trt.Refitter:
        engine, _ = self._live()
        refitter = trt.Refitter(engine, self._logger)
        if hasattr(refitter, "weights_validation"):
            refitter.weights_validation = False  # skips a host-side scan of every weight; shapes are checked here
        return refitter

    def weight_names(self) -> set[str]:
        engine, _ = self._live()
        if not engine.refittable:
            return set()
        if self._weight_names is None:
            self._weight_names = set(self._new_refitter().get_all_weights())
        return set(self._weight_names)

    def refit(self, weights: Mapping[str, torch.Tensor],
              fill: Callable[[Sequence[str]], Mapping[str, torch.Tensor]] | None = None) -> None:
        """Set the given weights from GPU memory and refit. A fresh Refitter per call: a refitter keeps pointers
        to the weights it was given, which are gone after this call."""
        engine, _ = self._live()
        if not engine.refittable:
            raise RefitRejected("this engine was built without refit; rebuild it with refit enabled")
        known = self.weight_names()
        unknown = sorted(set(weights) - known)
        if unknown:
            raise RefitRejected(f"the engine has no weights named {unknown[:_QUOTED_MESSAGES]} ({len(unknown)} unknown)")
        refitter = self._new_refitter()
        keep = []  # device copies must stay alive until the refit has read them
        for name, tensor in weights.items():
            prototype = refitter.get_weights_prototype(name)
            data = tensor.to(device=self._device, dtype=_torch_dtype(prototype.dtype)).contiguous()
            if data.numel() != prototype.size:
                raise RefitRejected(f"weight {name!r} has {data.numel()} elements, the engine expects {prototype.size}")
            w = trt.Weights(prototype.dtype, data.data_ptr(), data.numel())
            if not refitter.set_named_weights(name, w, trt.TensorLocation.DEVICE):
                raise RefitRejected(f"weight {name!r} was refused: {self._messages.text()}")
            keep.append(data)
        missing = sorted(refitter.get_missing_weights())
        if missing and fill is not None:  # partners of given weights in fused layers: their current values
            for name, tensor in fill(missing).items():
                prototype = refitter.get_weights_prototype(name)
                data = tensor.to(device=self._device, dtype=_torch_dtype(prototype.dtype)).contiguous()
                if not refitter.set_named_weights(name, trt.Weights(prototype.dtype, data.data_ptr(), data.numel()),
                                                  trt.TensorLocation.DEVICE):
                    raise RefitRejected(f"weight {name!r} was refused: {self._messages.text()}")
                keep.append(data)
            missing = sorted(refitter.get_missing_weights())
        _, stream = self._stream()  # after the copies above: a private stream must wait for them
        if missing:
            raise RefitRejected(
                f"the engine also needs {len(missing)} weights that were not given, e.g. "
                f"{missing[:_QUOTED_MESSAGES]} (fused with given ones, or never set on a weight-stripped engine)"
            )
        self.graphs.invalidate()  # captured graphs may hold the old weights' addresses
        if not refitter.refit_cuda_engine_async(stream.cuda_stream):
            raise RefitError(f"{trt.__name__} refit failed: {self._messages.text()}")
        stream.synchronize()  # refit is rare; after this `keep` may go and timings mean something
        self.needs_weights = False

    def close(self) -> None:
        if self._context is None and self._engine is None:
            return
        import torch

        self._save_runtime_cache()
        torch.cuda.synchronize(self._device)  # buffers may still be in use on a private stream
        self.graphs.clear()  # graphs before the context whose memory they use
        self._context = None  # context before engine before runtime
        self._engine = None
        self._runtime_cache = None
        self._runtime = None


@dataclass
class _Static:
    """One key's static buffers: the graph (or the bound context) reads and writes exactly these."""

    profile: int
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    main: torch.Tensor


class _GraphOps:
    """GraphOps (graphs.py) over one _Runner's execution context and streams."""

    def __init__(self, runner: _Runner) -> None:
        self._r = runner

    def allocate(self, key: Hashable, feeds: Mapping[str, torch.Tensor]) -> _Static:
        import torch

        r = self._r
        _, context = r._live()
        profile = cast(tuple[Any, ...], key)[0]
        shapes = {n: tuple(feeds[n].shape) for n in r._inputs}
        r._select(profile, shapes)  # output shapes follow from the input shapes
        inputs = {n: torch.empty(shapes[n], dtype=r._dtypes[n], device=r._device) for n in r._inputs}
        outputs = {
            n: torch.empty(_dims(context.get_tensor_shape(n)), dtype=r._dtypes[n], device=r._device)
            for n in r._outputs
        }
        return _Static(profile, inputs, outputs, outputs[r._main_output])

    def bind(self, buffers: _Static) -> None:
        r = self._r
        _, context = r._live()
        r._select(buffers.profile, {n: tuple(t.shape) for n, t in buffers.inputs.items()})
        for name, tensor in (*buffers.inputs.items(), *buffers.outputs.items()):
            context.set_tensor_address(name, tensor.data_ptr())

    def load(self, buffers: _Static, feeds: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in buffers.inputs.items():
            tensor.copy_(feeds[name], non_blocking=True)  # converts dtype and device on the caller's stream

    def launch(self) -> None:
        caller, stream = self._r._stream()
        self._r._execute(stream)
        if stream is not caller:
            caller.wait_stream(stream)

    def capture(self) -> Any:
        import torch

        r = self._r
        if r._capture_stream is None:
            r._capture_stream = torch.cuda.Stream(r._device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's unrelated CUDA calls (a preview decode) do not break this capture.
        with torch.cuda.graph(graph, stream=r._capture_stream, capture_error_mode="thread_local"):
            r._execute(r._capture_stream)
        return graph

    def replay(self, graph: Any) -> None:
        graph.replay()  # on the caller's current stream, after the input copies queued there

    def release(self, graph: Any) -> None:
        graph.reset()

    def output(self, buffers: _Static) -> torch.Tensor:
        return buffers.main
