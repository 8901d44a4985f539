"""The TensorRT and TensorRT-RTX backends: what each can do (capabilities), whether it can run here, what it builds
for, and the argument checks done before the work is handed to build.py and runner.py with the library's handle."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from sdtrt.backends.base import (
    Backend,
    BackendInfo,
    BuildOptions,
    BuildResult,
    Capabilities,
    EngineProfile,
    EngineRunner,
    ProgressCallback,
    no_progress,
)
from sdtrt.backends.tensorrt import build as _build
from sdtrt.backends.tensorrt import runner as _runner
from sdtrt.backends.tensorrt.build import PLAN_FILE
from sdtrt.backends.tensorrt.library import (
    TENSORRT,
    TENSORRT_RTX,
    Library,
    LibraryHandle,
    open_library,
    unavailable_reason,
)
from sdtrt.backends.tensorrt.runner import TensorRTRunner
from sdtrt.errors import BuildError, StaleEngine


class TensorRTFamily(Backend):
    """One backend class per library; the library itself is imported on first use (`handle`)."""

    library: ClassVar[Library]
    capabilities: ClassVar[Capabilities] = Capabilities(
        devices=("cuda",),
        strips_weights=True,
        refit=True,
        atomic_refit=TensorRTRunner.refit_is_atomic,
        cuda_graphs=True,
    )

    def __init__(self, cache_dir: Path | None = None, *, cuda_graphs: bool = True) -> None:
        # cache_dir: where `load` keeps the TensorRT-RTX runtime cache; `build` sets it from BuildOptions when unset.
        super().__init__(cache_dir, cuda_graphs=cuda_graphs)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return unavailable_reason(cls.library)

    def handle(self) -> LibraryHandle:
        """The imported library; BackendUnavailable when it is not installed."""
        return open_library(self.library)

    def info(self) -> BackendInfo:
        lib = self.handle()
        gpu, major, minor = lib.device()
        return BackendInfo(self.name, lib.version, f"{gpu} (sm{major}{minor})", f"{major}.{minor}")

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
        return _build.build(self.handle(), Path(onnx_path), profiles, Path(out_dir), options, progress)

    def load(self, engine_dir: Path, files: Sequence[str], profiles: Sequence[EngineProfile], *,
             digests: Mapping[str, str] | None = None) -> EngineRunner:
        names = [f for f in files if Path(f).name == PLAN_FILE] or list(files)
        if len(names) != 1:
            raise StaleEngine(f"expected one {PLAN_FILE} among the engine files, got {list(files)}; rebuild the engine")
        expected = (digests or {}).get(names[0])
        return _runner.load(
            self.handle(), Path(engine_dir) / names[0], profiles, self.cache_dir, self.cuda_graphs, expected
        )


class TensorRTBackend(TensorRTFamily):
    """NVIDIA TensorRT 10.x / 11.x (module `tensorrt`)."""

    name = TENSORRT.backend
    library = TENSORRT


class TensorRTRTXBackend(TensorRTFamily):
    """NVIDIA TensorRT for RTX 1.x (module `tensorrt_rtx`): JIT-compiled kernels, runtime cache, built-in CUDA graphs."""

    name = TENSORRT_RTX.backend
    library = TENSORRT_RTX
