"""Running an engine plan with one TensorRT library: read and check the plan, deserialize it, create the execution
context (with TensorRT-RTX's runtime cache and graph strategy), select profiles and shapes, run calls, refit
weights, close."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sdtrt.backends.base import EngineProfile, EngineRunner, check_weight_names
from sdtrt.backends.graphs import GraphCache
from sdtrt.backends.tensorrt.graph_ops import StaticBuffers, TensorRTGraphOps
from sdtrt.backends.tensorrt.library import LibraryHandle
from sdtrt.backends.tensorrt.messages import QUOTED_MESSAGES, Messages, make_logger
from sdtrt.backends.tensorrt.tensors import dims, torch_dtype
from sdtrt.errors import CorruptEngine, NoMatchingProfile, RefitError, RefitRejected, SdtrtError, StaleEngine
from sdtrt.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    import tensorrt
    import torch


def load(
    lib: LibraryHandle,
    plan_path: Path,
    profiles: Sequence[EngineProfile],
    cache_dir: Path | None,
    cuda_graphs: bool = True,
    sha256: str | None = None,
) -> TensorRTRunner:
    """Read `plan_path` (checked against `sha256` in memory), refuse it before deserializing where the library can
    tell it will not run here, deserialize it and check its profiles against the manifest's. Raises StaleEngine."""
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
    messages = Messages()
    logger = make_logger(lib, messages)
    runtime = lib.trt.Runtime(logger)
    validity = getattr(runtime, "get_engine_validity", None)
    invalid = lib.enum_member("EngineValidity", "INVALID")
    if validity is not None and invalid is not None:
        state, diagnostics = validity(plan)
        if state == invalid:
            raise StaleEngine(
                f"{lib.name} cannot run {plan_path} on this GPU/driver ({_diagnostics(lib, diagnostics)}); "
                "rebuild the engine for this GPU (or with --target naming it)"
            )
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise StaleEngine(f"{lib.name} refused {plan_path}: {messages.text()}; rebuild the engine")
    _check_profiles(engine, profiles, plan_path)
    return TensorRTRunner(lib, runtime, engine, logger, messages, cache_dir, cuda_graphs)


def _diagnostics(lib: LibraryHandle, diagnostics: Any) -> str:
    """The names of the set bits of an engine-validity diagnostics mask (UNSUPPORTED_CC, VERSION_MISMATCH, ...),
    read from the library's EngineInvalidityDiagnostics enum by name; the raw value when it cannot be read."""
    enum = getattr(lib.trt, "EngineInvalidityDiagnostics", None)
    try:
        mask = int(diagnostics)
        names = [n for n in dir(enum) if n.isupper() and int(getattr(enum, n)) & mask]
    except (TypeError, ValueError):
        names = []
    return ", ".join(sorted(names)) or f"diagnostics {diagnostics!r}"


def _check_profiles(engine: tensorrt.ICudaEngine, profiles: Sequence[EngineProfile], plan_path: Path) -> None:
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
            got = [dims(d) for d in engine.get_tensor_profile_shape(name, index)]
            if got != [tuple(r.min), tuple(r.opt), tuple(r.max)]:
                raise StaleEngine(f"{plan_path} profile {index} input {name!r} is {got}, the manifest says {r}")


class TensorRTRunner(EngineRunner):
    """One execution context over one engine. Not thread-safe: one UNet call at a time."""

    #: A refit sets weights one by one inside the library: a failure half-way leaves a mix (see RefitRejected for
    #: the refusals that come before anything changed).
    refit_is_atomic: ClassVar[bool] = False

    def __init__(
        self,
        lib: LibraryHandle,
        runtime: tensorrt.Runtime,
        engine: tensorrt.ICudaEngine,
        logger: tensorrt.ILogger,
        messages: Messages,
        cache_dir: Path | None,
        cuda_graphs: bool = True,
    ) -> None:
        import torch

        self.lib = lib
        # The runtime, engine and logger must outlive the context: the library holds raw pointers to them.
        self._runtime: tensorrt.Runtime | None = runtime
        self._engine: tensorrt.ICudaEngine | None = engine
        self._logger = logger
        self._messages = messages
        self.device = torch.device("cuda", torch.cuda.current_device())
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {n: engine.get_tensor_mode(n) for n in names}
        self.inputs = [n for n in names if modes[n] == lib.trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if modes[n] == lib.trt.TensorIOMode.OUTPUT]
        if not self.outputs:
            raise StaleEngine("the engine has no output tensor; rebuild it")
        self.main_output = self.outputs[0]  # every model contract's engine has one output
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self._profile = -1
        self._side_stream: torch.cuda.Stream | None = None
        self._weight_names: set[str] | None = None
        self._runtime_cache: Any = None
        self._runtime_cache_path: Path | None = None
        # TensorRT-RTX captures graphs itself (runtime config); full TensorRT through our GraphCache. Either way
        # the cache keeps static buffers per shape, so repeated calls of one shape skip all binding.
        self._builtin_graphs = cuda_graphs and lib.rtx
        self.graphs: GraphCache[StaticBuffers, Any, torch.Tensor] = GraphCache(
            TensorRTGraphOps(self), enabled=cuda_graphs and not lib.rtx
        )
        if lib.rtx:
            self.graphs.disabled_reason = "TensorRT-RTX captures graphs itself" if cuda_graphs else "switched off"
        self._context: tensorrt.IExecutionContext | None = self._create_context(engine, cache_dir)
        self.needs_weights = bool(engine.refittable) and bool(self._new_refitter().get_missing_weights())

    def _create_context(self, engine: tensorrt.ICudaEngine, cache_dir: Path | None) -> tensorrt.IExecutionContext:
        """Through a runtime config where one exists: on RTX it carries the built-in CUDA graph strategy and the
        runtime cache of JIT-compiled kernels (loaded before, saved after context creation and at close)."""
        context = None
        if hasattr(engine, "create_runtime_config"):
            config = engine.create_runtime_config()
            rtx_config: Any = config  # RTX members the 10.13 stubs lack; each is checked by name before use
            strategy = self.lib.enum_member(
                "CudaGraphStrategy", "WHOLE_GRAPH_CAPTURE" if self._builtin_graphs else "DISABLED"
            )
            if strategy is not None and hasattr(config, "cuda_graph_strategy"):
                rtx_config.cuda_graph_strategy = strategy
            if cache_dir is not None and hasattr(self.lib.trt, "IRuntimeCache") and hasattr(
                config, "create_runtime_cache"
            ):
                cache = rtx_config.create_runtime_cache()
                path = self.lib.cache_file(Path(cache_dir), "runtime")
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
                atomic_write_bytes(
                    self._runtime_cache_path, memoryview(self._runtime_cache.serialize()), make_parents=True
                )
            except OSError:
                pass  # a cache is an optimization; failing to write it must not fail generation

    def live(self) -> tuple[tensorrt.ICudaEngine, tensorrt.IExecutionContext]:
        """The engine and its execution context; SdtrtError once closed."""
        if self._engine is None or self._context is None:
            raise SdtrtError("this engine runner was closed; load the engine again")
        return self._engine, self._context

    def streams(self) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        """(caller's stream, stream to run on). Work runs on the caller's current stream, so torch's ordering holds
        without host syncs; only on the legacy default stream, which makes TensorRT synchronize the device and
        cannot be graph-captured, it runs on a private stream ordered by events (wait_stream both ways)."""
        import torch

        current = torch.cuda.current_stream(self.device)
        if current.cuda_stream != 0:
            return current, current
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        self._side_stream.wait_stream(current)
        return current, self._side_stream

    def infer(self, feeds: Mapping[str, torch.Tensor], profile_index: int) -> torch.Tensor:
        """Run one call. The returned tensor is the runner's static output buffer for this (profile, shape): it is
        overwritten by the next call with the same shape, so consume (or clone) it before calling again.

        Per call this copies the inputs into static buffers and launches: a captured CUDA graph from the third
        call of a shape on (see graphs.py), the engine itself before that. No allocation, no host sync."""
        engine, _ = self.live()
        if not 0 <= profile_index < engine.num_optimization_profiles:
            raise NoMatchingProfile(
                f"profile {profile_index} does not exist; the engine has {engine.num_optimization_profiles}"
            )
        try:
            key = (profile_index, *(tuple(feeds[n].shape) for n in self.inputs))
        except KeyError:
            missing = [n for n in self.inputs if n not in feeds]
            raise SdtrtError(f"missing engine inputs {missing}; the engine takes {self.inputs}") from None
        return self.graphs.run(key, feeds)

    def select(self, profile_index: int, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Set the context's profile and input shapes (raises NoMatchingProfile outside the profile)."""
        _, context = self.live()
        if profile_index != self._profile:
            _, stream = self.streams()
            if not context.set_optimization_profile_async(profile_index, stream.cuda_stream):
                raise NoMatchingProfile(f"cannot switch to profile {profile_index}: {self._messages.text()}")
            if self._profile != -1:
                self.graphs.invalidate()  # every graph is captured again after a profile switch
            self._profile = profile_index
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise NoMatchingProfile(f"input {name!r} of shape {shape} is outside profile {profile_index}")

    def execute(self, stream: torch.cuda.Stream) -> None:
        """Run the engine once on `stream` with the bound tensors."""
        _, context = self.live()
        if not context.execute_async_v3(stream.cuda_stream):
            raise SdtrtError(f"{self.lib.module_name} failed to run the engine: {self._messages.text()}")

    def stats(self) -> dict[str, Any]:
        return {"cuda_graphs": self.graphs.describe()}

    def _new_refitter(self) -> tensorrt.Refitter:
        engine, _ = self.live()
        refitter = self.lib.trt.Refitter(engine, self._logger)
        if hasattr(refitter, "weights_validation"):
            refitter.weights_validation = False  # skips a host-side scan of every weight; shapes are checked here
        return refitter

    def weight_names(self) -> set[str]:
        engine, _ = self.live()
        if not engine.refittable:
            return set()
        if self._weight_names is None:
            self._weight_names = set(self._new_refitter().get_all_weights())
        return set(self._weight_names)

    def refit(self, weights: Mapping[str, torch.Tensor],
              fill: Callable[[Sequence[str]], Mapping[str, torch.Tensor]] | None = None) -> None:
        """Set the given weights from GPU memory and refit. A fresh Refitter per call: a refitter keeps pointers
        to the weights it was given, which are gone after this call."""
        engine, _ = self.live()
        if not engine.refittable:
            raise RefitRejected("this engine was built without refit; rebuild it with refit enabled")
        check_weight_names(weights, self.weight_names())
        refitter = self._new_refitter()
        keep = []  # device copies must stay alive until the refit has read them
        for name, tensor in weights.items():
            keep.append(self._set_weight(refitter, name, tensor, check_size=True))
        missing = sorted(refitter.get_missing_weights())
        if missing and fill is not None:  # partners of given weights in fused layers: their current values
            for name, tensor in fill(missing).items():
                keep.append(self._set_weight(refitter, name, tensor, check_size=False))
            missing = sorted(refitter.get_missing_weights())
        _, stream = self.streams()  # after the copies above: a private stream must wait for them
        if missing:
            raise RefitRejected(
                f"the engine also needs {len(missing)} weights that were not given, e.g. "
                f"{missing[:QUOTED_MESSAGES]} (fused with given ones, or never set on a weight-stripped engine)"
            )
        self.graphs.invalidate()  # captured graphs may hold the old weights' addresses
        if not refitter.refit_cuda_engine_async(stream.cuda_stream):
            raise RefitError(f"{self.lib.module_name} refit failed: {self._messages.text()}")
        stream.synchronize()  # refit is rare; after this `keep` may go and timings mean something
        self.needs_weights = False

    def _set_weight(
        self, refitter: tensorrt.Refitter, name: str, tensor: torch.Tensor, *, check_size: bool
    ) -> torch.Tensor:
        """Hand one weight to the refitter as a device copy in the engine's dtype; the copy is returned and must
        stay alive until the refit has run."""
        prototype = refitter.get_weights_prototype(name)
        data = tensor.to(device=self.device, dtype=torch_dtype(prototype.dtype)).contiguous()
        if check_size and data.numel() != prototype.size:
            raise RefitRejected(f"weight {name!r} has {data.numel()} elements, the engine expects {prototype.size}")
        trt = self.lib.trt
        if not refitter.set_named_weights(name, trt.Weights(prototype.dtype, data.data_ptr(), data.numel()),
                                          trt.TensorLocation.DEVICE):
            raise RefitRejected(f"weight {name!r} was refused: {self._messages.text()}")
        return data

    def close(self) -> None:
        if self._context is None and self._engine is None:
            return
        import torch

        self._save_runtime_cache()
        torch.cuda.synchronize(self.device)  # buffers may still be in use on a private stream
        self.graphs.clear()  # graphs before the context whose memory they use
        self._context = None  # context before engine before runtime
        self._engine = None
        self._runtime_cache = None
        self._runtime = None
