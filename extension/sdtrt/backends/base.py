"""The one small interface every backend implements: probe, build, load; and the runner it loads: infer, refit.

A backend never publishes files itself: `build` writes into a folder the registry gives it, and the registry
checks and publishes the result atomically. Backends import their libraries lazily (inside methods), so this
package imports on machines without TensorRT, ONNX Runtime or a GPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sdtrt.profiles import TensorRange

if TYPE_CHECKING:
    import torch

#: progress(phase, fraction) with fraction in [0, 1]. It may raise to cancel a build (e.g. KeyboardInterrupt).
ProgressCallback = Callable[[str, float], None]

#: One optimization profile in engine units: input name -> min/opt/max.
EngineProfile = Mapping[str, TensorRange]


def no_progress(phase: str, fraction: float) -> None:
    """Default progress callback: does nothing."""


@dataclass(frozen=True)
class BuildOptions:
    """How to build. Each field's trade-off:

    refit: engine weights can be replaced after the build (checkpoint switch, LoRA) without a rebuild. TensorRT may
        disable some fusions for refittable engines; the benchmark measures it.
    strip_weights: leave the weights out of the plan (TensorRT STRIP_PLAN): small files, weights come from the
        checkpoint by refit at load. Needs `refit`.
    cache_dir: where the TensorRT timing cache / TensorRT-RTX runtime cache lives (None: no cache).
    workspace_bytes: builder workspace limit (None: library default).
    optimization_level: TensorRT builder optimization level 0-5 (None: library default, 3).
    """

    refit: bool = True
    strip_weights: bool = True
    cache_dir: Path | None = None
    workspace_bytes: int | None = None
    optimization_level: int | None = None


@dataclass(frozen=True)
class BackendInfo:
    """What an engine depends on: an engine built under one BackendInfo is stale under another."""

    name: str
    version: str
    device: str
    compute_capability: str | None = None


@dataclass
class BuildResult:
    """Files the build wrote (relative to the folder it was given) and facts for the manifest."""

    files: list[str]
    weights: str  # "stripped": must be refit from a checkpoint before use; "embedded": carries its weights
    refit_mode: str  # "refit" or "none"
    extra: dict[str, object] = field(default_factory=dict)


class EngineRunner(ABC):
    """A loaded engine. One runner serves calls for every profile of its engine without reloading."""

    #: True until weights were supplied, for weight-stripped engines.
    needs_weights: bool = False

    @abstractmethod
    def infer(self, feeds: Mapping[str, torch.Tensor], profile_index: int) -> torch.Tensor:
        """Run one UNet call. `feeds` are torch tensors named like the engine's inputs, on the runner's device."""

    @abstractmethod
    def weight_names(self) -> set[str]:
        """Names of every refittable weight (equal to UNet state-dict keys)."""

    @abstractmethod
    def refit(self, weights: Mapping[str, torch.Tensor],
              fill: Callable[[Sequence[str]], Mapping[str, torch.Tensor]] | None = None) -> None:
        """Replace the named weights (state-dict layout and names); any others keep their values. `fill(names)`
        supplies current values of weights the backend needs along with the given ones (TensorRT asks for every
        weight it fused with a given one). Raises RefitError."""

    def close(self) -> None:
        """Free device memory. Safe to call twice."""

    def stats(self) -> dict[str, Any]:
        """Facts about how calls were served (e.g. CUDA graph captures and replays), for status and benchmarks."""
        return {}


class Backend(ABC):
    """A strategy that turns an ONNX file into an engine and loads it."""

    name: ClassVar[str]

    def __init__(self, cache_dir: Path | None = None, *, cuda_graphs: bool = True) -> None:
        """`cache_dir`: where a backend keeps its caches (TensorRT timing cache, TensorRT-RTX runtime cache).
        `cuda_graphs`: whether loaded engines may replay captured CUDA graphs (backends without graphs ignore it)."""
        self.cache_dir = cache_dir
        self.cuda_graphs = cuda_graphs

    @classmethod
    @abstractmethod
    def unavailable_reason(cls) -> str | None:
        """None when this backend can build and run here, else a sentence saying what is missing and how to fix it.
        Cheap: imports the library at most, never builds."""

    @abstractmethod
    def info(self) -> BackendInfo:
        """Library version and device this backend builds for."""

    @abstractmethod
    def build(
        self,
        onnx_path: Path,
        profiles: Sequence[EngineProfile],
        out_dir: Path,
        options: BuildOptions,
        progress: ProgressCallback = no_progress,
    ) -> BuildResult:
        """Build an engine with all `profiles` into `out_dir` (an empty private folder). Raises BuildError."""

    @abstractmethod
    def load(self, engine_dir: Path, files: Sequence[str], profiles: Sequence[EngineProfile], *,
             digests: Mapping[str, str] | None = None) -> EngineRunner:
        """Load a published engine. Raises StaleEngine if the library refuses the file. `digests` (file name ->
        sha256 from the manifest): a backend that reads an executable plan into memory checks the bytes it read
        against it, so only verified bytes are ever deserialized (no window between check and load)."""
