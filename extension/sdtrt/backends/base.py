"""The one small interface every backend implements: probe, build, load; and the runner it loads: infer, refit.

A backend never publishes files itself: `build` writes into a folder the registry gives it, and the registry
checks and publishes the result atomically. Backends import their libraries lazily (inside methods), so this
package imports on machines without TensorRT, ONNX Runtime or a GPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sdtrt.engine_types import BackendInfo, BuildResult, ProgressCallback
from sdtrt.errors import UnknownWeights
from sdtrt.profiles import TensorRange

if TYPE_CHECKING:
    import torch

#: One optimization profile in engine units: input name -> min/opt/max.
EngineProfile = Mapping[str, TensorRange]


#: How many unknown weight names an UnknownWeights message lists.
_LISTED_NAMES = 8


def no_progress(phase: str, fraction: float) -> None:
    """Default progress callback: does nothing."""


def check_weight_names(given: Iterable[str], known: set[str]) -> None:
    """Refuse a refit that names weights the engine does not have: UnknownWeights, the same type in every backend."""
    unknown = sorted(set(given) - known)
    if unknown:
        raise UnknownWeights(f"the engine has no weights named {unknown[:_LISTED_NAMES]} ({len(unknown)} unknown)")


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared on its class: callers ask these instead of comparing backend names.

    devices: where its engines run ("cuda": an NVIDIA GPU; "cpu").
    strips_weights: honours BuildOptions.strip_weights (plans without weights, filled by refit at load).
    refit: engine weights can be replaced by name after the build (checkpoint switch, LoRA).
    atomic_refit: a failed refit leaves every previous weight in place (its runners' `refit_is_atomic`).
    cuda_graphs: loaded engines replay CUDA graphs, so the backend's `cuda_graphs` switch means something.
    ahead_of_time: builds for named GPU targets (BuildOptions.targets), also on a machine without a GPU.
    """

    devices: tuple[str, ...] = ()
    strips_weights: bool = False
    refit: bool = False
    atomic_refit: bool = False
    cuda_graphs: bool = False
    ahead_of_time: bool = False


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
    targets: GPU compute capabilities to build for ahead of time ("sm86", ...; see sdtrt.targets); empty: the GPU
        of this machine. Only backends with Capabilities.ahead_of_time take them.
    """

    refit: bool = True
    strip_weights: bool = True
    cache_dir: Path | None = None
    workspace_bytes: int | None = None
    optimization_level: int | None = None
    targets: tuple[str, ...] = ()


class EngineRunner(ABC):
    """A loaded engine. One runner serves calls for every profile of its engine without reloading."""

    #: True until weights were supplied, for weight-stripped engines.
    needs_weights: bool = False
    #: A failed refit changes nothing (all or nothing). False: after a failure other than RefitRejected the
    #: engine's weights are unknown. The backend's Capabilities.atomic_refit says the same for its runners.
    refit_is_atomic: ClassVar[bool] = False

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
        weight it fused with a given one). Raises RefitError; UnknownWeights (a RefitRejected) for names the engine
        does not have."""

    def close(self) -> None:
        """Free device memory. Safe to call twice."""

    def stats(self) -> dict[str, Any]:
        """Facts about how calls were served (e.g. CUDA graph captures and replays), for status and benchmarks."""
        return {}


class Backend(ABC):
    """A strategy that turns an ONNX file into an engine and loads it."""

    name: ClassVar[str]
    #: What this backend can do (see Capabilities); a backend that declares nothing can do none of it.
    capabilities: ClassVar[Capabilities] = Capabilities()

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

    @classmethod
    def build_unavailable_reason(cls, targets: Sequence[str] = ()) -> str | None:
        """Like unavailable_reason, for building only: an ahead-of-time build (`targets`) needs no GPU where the
        backend can build for named targets; a backend that cannot is refused with the way out."""
        if targets and not cls.capabilities.ahead_of_time:
            return (f"{cls.name} builds only for the device it runs on, not for named targets ({', '.join(targets)}); "
                    "ahead-of-time builds need --backend tensorrt-rtx")
        return cls.unavailable_reason()

    def build_options(self, options: BuildOptions) -> tuple[BuildOptions, str | None]:
        """The options a build here will really use, and why they differ from `options` (None: they do not).
        Decided before the engine key is made, so the key records what the engine is."""
        return options, None

    def build_info(self, options: BuildOptions) -> BackendInfo:
        """The identity an engine built with `options` records: this GPU's, or for an ahead-of-time build the
        library alone (the targets are recorded in the key)."""
        return self.info()

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
