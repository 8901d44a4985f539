"""The model contract: everything about what goes into and comes out of an engine of one architecture.

A contract is bound to one model's dimensions (`io`); the rest of the code asks it, and never spells an engine
input name itself:
- export: input and output names, dynamic axes, example inputs, the positional module the exporter traces;
- build: the engine shape ranges of a user profile (batch, pixels, tokens);
- serving: the engine feeds of a host UNet call, or `NotServable` with the reason that call must run on PyTorch;
- check and bench: random feeds of given shapes, and the PyTorch module run on the same feeds;
- the registry: `record()` goes into the engine key (contract name, version and dimensions), `bind_record` reads
  it back (also from manifests written before contracts existed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sdtrt.errors import SdtrtError
from sdtrt.profiles import Dims, Profile, Shape, TensorRange

#: The attribute under which `export_module` wrappers hold the model (its weights' names start with it in the
#: traced graph; the exporter strips it so every weight keeps its state-dict name).
WRAPPED = "model"


class NotServable(SdtrtError):
    """A host call the engine has no inputs for (extra arguments, a missing or unexpected input)."""


@dataclass(frozen=True)
class TensorIO:
    """The dimensions of one model that its engine's inputs depend on."""

    in_channels: int
    context_dim: int
    y_dim: int | None
    #: (channels, downsampling exponent) of each skip connection, the middle block's last (`UNetSpec.skip_layout`);
    #: only the variants with ControlNet inputs record it
    skips: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output: its name, its dynamic axes (index -> name) and whether it carries the export
    dtype (False: always float32)."""

    name: str
    axes: Mapping[int, str]
    model_dtype: bool = True


class ModelContract(ABC):
    #: registered name (recorded in the engine key) and version: a new version means new engines
    name: ClassVar[str]
    version: ClassVar[int]
    #: whether the engine takes ControlNet residuals (see control.py); such a variant serves plain calls too
    takes_control: ClassVar[bool] = False
    #: the variant with ControlNet inputs of a plain contract (set by the architecture's module), if any
    control_variant: ClassVar[type[ModelContract] | None] = None

    def __init__(self, io: TensorIO):
        self.io = io

    @classmethod
    def variant(cls, controlnet: bool) -> type[ModelContract]:
        """This contract, or its variant with ControlNet inputs."""
        if not controlnet or cls.takes_control:
            return cls
        if cls.control_variant is None:
            raise SdtrtError(f"the {cls.name} engines have no variant with ControlNet inputs")
        return cls.control_variant

    @classmethod
    @abstractmethod
    def build_module(cls, spec: Any) -> torch.nn.Module:
        """The PyTorch module of this architecture for the headless path (CLI, checks), random-initialised;
        `spec` is the architecture as detection read it off the weights."""

    # ---- export ------------------------------------------------------------------------------------------------
    @abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The engine inputs in the order the exported module takes them."""

    @abstractmethod
    def output(self) -> TensorSpec:
        """The engine output."""

    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs()]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: dict(t.axes) for t in (*self.inputs(), self.output())}

    @abstractmethod
    def example_inputs(self, dtype: torch.dtype, *, seed: int = 0) -> dict[str, torch.Tensor]:
        """Inputs to trace the export with (sizes chosen so no dynamic dimension is traced as a constant)."""

    @abstractmethod
    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """A module taking the inputs positionally, in `inputs()` order, holding the model as `.model` (WRAPPED)."""

    # ---- profiles ----------------------------------------------------------------------------------------------
    @abstractmethod
    def engine_ranges(self, profile: Profile) -> dict[str, TensorRange]:
        """Engine shape ranges of every input for one user profile."""

    @abstractmethod
    def call_dims(self, shape: Shape, *, cfg: bool = True, rows: int | None = None) -> dict[str, Dims]:
        """The input shapes of one model call for a generation of `shape` (`rows` latents when given, else
        the batch, doubled with `cfg`)."""

    # ---- serving -----------------------------------------------------------------------------------------------
    @abstractmethod
    def feeds(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The engine feeds of a host call `forward(*args, **kwargs)`; NotServable when the engine cannot take
        it (the reason names what is extra or missing)."""

    @abstractmethod
    def describe(self, dims: Mapping[str, Dims]) -> str:
        """A call's shapes in user units (for notices)."""

    # ---- check and bench ---------------------------------------------------------------------------------------
    @abstractmethod
    def random_feeds(self, dims: Mapping[str, Dims], device: torch.device | str, dtype: torch.dtype,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random inputs of the given shapes, as a sampler would send them."""

    @abstractmethod
    def host_args(self, feeds: Mapping[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The host call `forward(*args, **kwargs)` whose feeds are `feeds` (the inverse of `feeds()`)."""

    def torch_call(self, module: torch.nn.Module, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run the PyTorch module on the engine's feeds (the reference for comparisons)."""
        args, kwargs = self.host_args(feeds)
        return module(*args, **kwargs)

    # ---- registry ----------------------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """What the engine key records of the contract: name, version and the model's dimensions."""
        return {"contract": self.name, "contract_version": self.version, "in_channels": self.io.in_channels,
                "context_dim": self.io.context_dim, "y_dim": self.io.y_dim}
