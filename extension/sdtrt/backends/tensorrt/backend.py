"""The TensorRT and TensorRT-RTX backends: what each can do (capabilities), whether it can run here, what it builds
for, and the argument checks done before the work is handed to build.py and runner.py with the library's handle."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
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
from sdtrt.errors import BackendUnavailable, BuildError, StaleEngine

#: The `device` an ahead-of-time engine's key records: it was built for its targets, not for a GPU at hand.
AHEAD_OF_TIME_DEVICE = "ahead-of-time"


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

    @classmethod
    def build_unavailable_reason(cls, targets: Sequence[str] = ()) -> str | None:
        if targets and cls.capabilities.ahead_of_time:
            try:
                lib = open_library(cls.library)  # the library alone: an ahead-of-time build needs no GPU
            except BackendUnavailable as exc:
                return str(exc)
            unknown = [t for t in targets if t not in lib.targets()]
            if unknown:  # said before the export, not after it
                return (f"{lib.name} {lib.version} cannot build for {', '.join(unknown)}; it builds for: "
                        f"{', '.join(lib.targets()) or 'its current GPU only'}")
            return None
        return super().build_unavailable_reason(targets)

    def build_options(self, options: BuildOptions) -> tuple[BuildOptions, str | None]:
        if not options.targets or not (options.refit or options.strip_weights):
            return options, None
        here = self.handle().gpu_target()
        if here in options.targets:
            return options, None
        why = "no GPU here" if here is None else f"this GPU ({here}) is not among the targets"
        return replace(options, refit=False, strip_weights=False), (
            f"{why}: the engine for {', '.join(options.targets)} embeds its checkpoint's weights ({self.name} builds "
            "refittable or weight-stripped engines only on a GPU of their targets), so it serves that checkpoint "
            "only and LoRA runs on PyTorch with it"
        )

    def build_info(self, options: BuildOptions) -> BackendInfo:
        if not options.targets:
            return self.info()
        lib = self.handle()
        return BackendInfo(self.name, lib.version, AHEAD_OF_TIME_DEVICE, None)

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
        if options.targets and not self.capabilities.ahead_of_time:
            raise BuildError(str(self.build_unavailable_reason(options.targets)))
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
    capabilities: ClassVar[Capabilities] = replace(TensorRTFamily.capabilities, ahead_of_time=True)
