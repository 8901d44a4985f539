"""Building an engine plan from ONNX with one TensorRT library: parse into a strongly typed network, configure the
builder (profiles, refit and strip flags, workspace, optimization level, timing cache or the RTX compute
capabilities: this GPU, or named targets ahead of time without one),
report progress and honour cancels, check the fresh plan (serializing it again so it stays refittable), write it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrt.backends.base import BuildOptions, BuildResult, EngineProfile, ProgressCallback
from sdtrt.backends.tensorrt.library import LibraryHandle, library_of_module, open_library
from sdtrt.backends.tensorrt.messages import QUOTED_MESSAGES, Messages, make_logger
from sdtrt.engine_types import RefitMode, WeightsMode
from sdtrt.errors import BuildError, TargetError
from sdtrt.fsutil import atomic_write_bytes
from sdtrt.targets import describe, enum_name

if TYPE_CHECKING:
    import tensorrt

#: The one file a build writes.
PLAN_FILE = "unet.plan"


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


def _progress_monitor(lib: LibraryHandle, relay: _Progress) -> tensorrt.IProgressMonitor:
    if TYPE_CHECKING:
        from tensorrt import IProgressMonitor  # the base class as the stubs type it
    else:
        IProgressMonitor = lib.trt.IProgressMonitor  # the base class of this library

    class _Monitor(IProgressMonitor):
        def __init__(self) -> None:
            IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
            relay.steps[phase_name] = max(int(num_steps), 1)
            relay.report(phase_name, 0.0)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return relay.report(phase_name, (step + 1) / relay.steps.get(phase_name, step + 1))

        def phase_finish(self, phase_name: str) -> None:
            relay.report(phase_name, 1.0)

    return _Monitor()


def _network(
    lib: LibraryHandle, messages: Messages, onnx_path: Path
) -> tuple[tensorrt.ILogger, tensorrt.Builder, tensorrt.INetworkDefinition, tensorrt.OnnxParser, bool]:
    trt = lib.trt
    logger = make_logger(lib, messages)
    builder = trt.Builder(logger)
    if builder is None:
        raise BuildError(f"{lib.name} could not create a builder: {messages.text()}")
    # Strongly typed: the ONNX graph carries the precision; TensorRT 11 and RTX know no other mode.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))  # from a path, so >2 GB external data is found
    return logger, builder, network, parser, bool(ok)


def parse(lib: LibraryHandle, onnx_path: Path) -> list[str]:
    """The parser's error strings for `onnx_path`, empty when it parsed."""
    messages = Messages()
    held = _network(lib, messages, onnx_path)  # logger, builder, network must outlive the parser: keep all
    parser, ok = held[3], held[4]
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok and not errors:
        errors = [messages.text(f"{onnx_path} could not be parsed")]
    return errors


def parse_onnx(onnx_path: Path, module_name: str = "tensorrt_rtx") -> list[str]:
    """Parse `onnx_path` into a strongly typed network with the library's OnnxParser; the parser's error strings,
    empty when it parsed. Needs no GPU with TensorRT-RTX, so CI can check exported graphs."""
    return parse(open_library(library_of_module(module_name)), Path(onnx_path))


def build(
    lib: LibraryHandle,
    onnx_path: Path,
    profiles: Sequence[EngineProfile],
    out_dir: Path,
    options: BuildOptions,
    progress: ProgressCallback,
) -> BuildResult:
    """Build `onnx_path` with every profile into `out_dir`/PLAN_FILE. Raises BuildError."""
    trt = lib.trt
    relay = _Progress(progress)
    started = time.monotonic()

    def step(phase: str, fraction: float) -> None:
        if not relay.report(phase, fraction):
            raise BuildError(f"engine build cancelled ({type(relay.cancelled).__name__})") from relay.cancelled

    step("parse", 0.0)
    messages = Messages()
    logger, builder, network, parser, ok = _network(lib, messages, onnx_path)
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or [messages.text()]
        raise BuildError(f"{lib.name} cannot parse {onnx_path}: " + "; ".join(errors[:QUOTED_MESSAGES]))
    step("parse", 1.0)

    config = builder.create_builder_config()
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for index, profile in enumerate(profiles):
        if set(profile) != inputs:
            raise BuildError(f"profile {index} names inputs {sorted(profile)} but the ONNX graph has {sorted(inputs)}")
        opt_profile = builder.create_optimization_profile()
        for name, r in profile.items():
            opt_profile.set_shape(name, trt.Dims(list(r.min)), trt.Dims(list(r.opt)), trt.Dims(list(r.max)))
        if config.add_optimization_profile(opt_profile) < 0:
            raise BuildError(f"profile {index} is invalid for this graph: {messages.text()}")

    extra: dict[str, object] = {"library": lib.module_name, "version": str(getattr(trt, "__version__", ""))}
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.strip_weights:
        # Only together with REFIT: STRIP_PLAN alone implies REFIT_IDENTICAL, which breaks LoRA refits.
        if not hasattr(trt.BuilderFlag, "STRIP_PLAN"):
            raise BuildError(f"{lib.module_name} has no BuilderFlag.STRIP_PLAN; build with strip_weights off")
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level

    timing_cache = None
    if lib.rtx:
        extra["compute_capability"] = _set_compute_capabilities(lib, config, options.targets)
    elif options.targets:
        raise TargetError(f"{lib.name} builds only for the GPU it runs on; ahead-of-time targets "
                          f"({describe(options.targets)}) need TensorRT-RTX (--backend tensorrt-rtx)")
    elif options.cache_dir is not None:  # RTX ignores timing caches, and they force a GPU query there
        timing_cache = lib.cache_file(Path(options.cache_dir), "timing")
        _load_timing_cache(config, timing_cache)
        extra["timing_cache"] = timing_cache.name

    monitor = None
    if hasattr(trt, "IProgressMonitor"):
        monitor = _progress_monitor(lib, relay)
        config.progress_monitor = monitor
    step("build", 0.0)
    plan = builder.build_serialized_network(network, config)
    if relay.cancelled is not None:
        raise BuildError(f"engine build cancelled ({type(relay.cancelled).__name__})") from relay.cancelled
    if plan is None:
        raise BuildError(f"{lib.name} could not build the engine: {messages.text()}")
    step("build", 1.0)
    if timing_cache is not None:
        try:
            atomic_write_bytes(timing_cache, _bytes(config.get_timing_cache().serialize()), make_parents=True)
        except OSError as exc:
            extra["timing_cache_error"] = str(exc)
    del parser, network, config, builder, monitor  # free builder memory before the check below

    data, extra["include_refit"] = _check_plan(lib, plan, options, logger, messages)
    step("write", 0.0)  # the last point where a cancel is honoured
    atomic_write_bytes(out_dir / PLAN_FILE, _bytes(data))
    relay.report("write", 1.0)
    extra.update(
        profiles=len(profiles),
        strongly_typed=True,
        plan_bytes=(out_dir / PLAN_FILE).stat().st_size,
        build_seconds=round(time.monotonic() - started, 1),
        warnings=messages.warnings[-QUOTED_MESSAGES:],
    )
    return BuildResult(
        files=[PLAN_FILE],
        weights=WeightsMode.STRIPPED if options.strip_weights else WeightsMode.EMBEDDED,
        refit_mode=RefitMode.REFIT if options.refit else RefitMode.NONE,
        extra=extra,
    )


def _set_compute_capabilities(lib: LibraryHandle, config: tensorrt.IBuilderConfig, targets: Sequence[str]) -> str:
    """Kernels for the named targets (ahead of time, no GPU needed) or, without targets, for this GPU only (a
    smaller plan; the engine key names the GPU). Returns what the manifest records. Raises TargetError for a
    target the library does not build for."""
    members = [lib.enum_member("ComputeCapability", enum_name(t) if targets else "CURRENT") for t in targets or [""]]
    known = hasattr(config, "num_compute_capabilities")
    if targets and (not known or None in members):
        missing = [t for t, m in zip(targets, members) if m is None] if known else list(targets)
        raise TargetError(
            f"{lib.name} {lib.version} cannot build for {describe(missing)}; it builds for: "
            f"{describe(lib.targets()) if known and lib.targets() else 'its current GPU only'}"
        )
    if None in members or not known:
        return "default"
    rtx_config: Any = config  # members the 10.13 stubs lack, present (checked above) in RTX
    rtx_config.num_compute_capabilities = len(members)
    for index, member in enumerate(members):
        rtx_config.set_compute_capability(member, index)
    return ",".join(targets) if targets else "current"


def _bytes(data: Any) -> memoryview:
    """The bytes of a library buffer (IHostMemory) without copying them."""
    return memoryview(data)


def _load_timing_cache(config: tensorrt.IBuilderConfig, path: Path) -> None:
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
    lib: LibraryHandle, plan: tensorrt.IHostMemory, options: BuildOptions, logger: tensorrt.ILogger, messages: Messages
) -> tuple[Any, bool]:
    """Deserialize the fresh plan once: a plan that does not load, or is not refittable although refit was asked
    for, fails the build instead of the first generation. Where SerializationFlag.INCLUDE_REFIT exists, the plan
    is serialized again with it (and EXCLUDE_WEIGHTS when stripped) so it stays refittable."""
    if not options.refit:
        return plan, False
    trt = lib.trt
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise BuildError(f"the engine just built does not load: {messages.text()}")
    if not engine.refittable:
        raise BuildError("the engine was built without refit support although refit was requested")
    include_refit = lib.enum_member("SerializationFlag", "INCLUDE_REFIT")
    if include_refit is None:
        return plan, False
    serialization = engine.create_serialization_config()
    serialization.set_flag(include_refit)
    if options.strip_weights:
        serialization.set_flag(trt.SerializationFlag.EXCLUDE_WEIGHTS)
    again = engine.serialize_with_config(serialization)
    del serialization, engine  # before the runtime that made it
    return (plan, False) if again is None else (again, True)
