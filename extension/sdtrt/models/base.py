"""The model contract: everything about what goes into and comes out of an engine of one architecture, declared as
one row per engine input (`InputRow`: name, dtype, dynamic axes, its shape at a profile point, where it comes from
in the host's call). The contract's methods are derived from the rows:

- export: input and output names, dynamic axes, example inputs (plus the positional module the exporter traces);
- build: the engine shape ranges of a user profile (batch, pixels, tokens);
- serving: the engine feeds of a host UNet call, or `NotServable` with the reason that call must run on PyTorch;
- check and bench: random feeds of given shapes, the host call of given feeds, the PyTorch module on them;
- the registry: `record()` goes into the engine key (contract name, version and dimensions), `bind_record` reads
  it back (also from manifests written before contracts existed).

An architecture module (ldm.py, sgm.py) binds a contract to its rows, its torch module and the families its
detection recognises (`FamilyDef`); the rest of the code asks the contract and never spells an input name itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from sdtrt.constants import CFG_ROWS, CHUNK_LEN, LATENT_FACTOR
from sdtrt.errors import SdtrtError
from sdtrt.models.convention import A1111, HOSTS, check_convention, mismatch
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
    #: how the decoder upsamples to its skip connections (`sdtrt.models.convention`): the host whose numerics the
    #: engine follows at latent sizes that are not multiples of 8
    convention: str = A1111

    def __post_init__(self) -> None:
        check_convention(self.convention)


class CallSize(NamedTuple):
    """The size of one model call in engine units: rows (latents in the call), latent height and width, context
    rows (77 per prompt chunk)."""

    rows: int
    height: int
    width: int
    context: int

    @classmethod
    def of(cls, shape: Shape, rows: int) -> CallSize:
        return cls(rows, *shape.latent_hw, shape.chunks * CHUNK_LEN)


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output: its name, its dynamic axes (index -> name) and whether it carries the export
    dtype (False: always float32)."""

    name: str
    axes: Mapping[int, str]
    model_dtype: bool = True


@dataclass(frozen=True)
class InputRow:
    """One engine input, declared once."""

    name: str
    #: dynamic axes, index -> name
    axes: Mapping[int, str]
    #: its shape in a call of this size
    dims: Callable[[CallSize], Dims]
    #: where it comes from in the host's call: a field of the contract's call type ("x", "context", ...), or
    #: "field.i" for the i-th entry of a sequence field ("skips.3")
    source: str
    #: False: float32 whatever the export dtype (timesteps)
    model_dtype: bool = True
    #: random inputs (check, bench, export examples): normal times `scale`, or uniform in [0, scale)
    scale: float = 1.0
    uniform: bool = False
    #: a call may lack it: then the engine is fed zeros of its shape (ControlNet residuals of a plain call)
    optional: bool = False

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.axes, self.model_dtype)

    def read(self, call: Any) -> torch.Tensor | None:
        field, _, index = self.source.partition(".")
        value = getattr(call, field)
        if not index:
            return value  # type: ignore[no-any-return]
        i = int(index)
        return value[i] if value is not None and i < len(value) else None

    def random(self, dims: Dims, device: torch.device | str, dtype: torch.dtype, g: torch.Generator
               ) -> torch.Tensor:
        t = torch.rand(dims, generator=g) if self.uniform else torch.randn(dims, generator=g)
        t = (t * self.scale) if self.scale != 1.0 else t
        return t.to(device, dtype) if self.model_dtype else t.to(device)


@dataclass(frozen=True)
class FamilyDef:
    """A model family detection recognises: its context width, its `y` width (SDXL) and its default head layout;
    and the model contract its engines follow. Each architecture module declares its families."""

    name: str
    label: str
    context_dim: int
    y_dim: int | None
    contract: type[ModelContract]
    num_heads: int = -1
    num_head_channels: int = -1


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
        self.rows: tuple[InputRow, ...] = self.input_rows()

    @classmethod
    def variant(cls, controlnet: bool) -> type[ModelContract]:
        """This contract, or its variant with ControlNet inputs."""
        if not controlnet or cls.takes_control:
            return cls
        if cls.control_variant is None:
            raise SdtrtError(f"the {cls.name} engines have no variant with ControlNet inputs")
        return cls.control_variant

    # ---- what an architecture declares -------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def build_module(cls, spec: Any, convention: str = A1111) -> torch.nn.Module:
        """The PyTorch module of this architecture for the headless path (CLI, checks), random-initialised;
        `spec` is the architecture as detection read it off the weights, `convention` how it upsamples."""

    @abstractmethod
    def input_rows(self) -> tuple[InputRow, ...]:
        """The engine inputs, in the order the exported module takes them."""

    @abstractmethod
    def output(self) -> TensorSpec:
        """The engine output."""

    @abstractmethod
    def parse_call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], control: Any = None) -> Any:
        """The host call `forward(*args, **kwargs)` (plus what a ControlNet hook adds) as this contract's call
        type, whose fields the rows' sources name; NotServable when the engine cannot take it."""

    @abstractmethod
    def call_size(self, call: Any) -> CallSize:
        """The size of a parsed call."""

    @abstractmethod
    def host_call(self, feeds: Mapping[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
        """(args, kwargs, control) of the host call whose feeds are `feeds` (the inverse of `feeds`)."""

    @abstractmethod
    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """A module taking the inputs positionally, in row order, holding the model as `.model` (WRAPPED)."""

    def require_convention(self, module: torch.nn.Module) -> None:
        """SdtrtError unless `module` computes in this contract's convention (a host's own module, which has no
        `convention` attribute, computes as A1111)."""
        have, want = getattr(module, "convention", A1111), self.io.convention
        if have != want:
            raise SdtrtError(f"the module upsamples as {HOSTS.get(have, have)} does; the {self.name} engine is to "
                             f"follow {HOSTS.get(want, want)}'s convention")

    # ---- export ------------------------------------------------------------------------------------------------
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(r.spec() for r in self.rows)

    def input_names(self) -> list[str]:
        return [r.name for r in self.rows]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: dict(t.axes) for t in (*self.inputs(), self.output())}

    def example_inputs(self, dtype: torch.dtype, *, seed: int = 0, batch: int = 2,
                       latent_hw: tuple[int, int] = (16, 24), chunks: int = 1) -> dict[str, torch.Tensor]:
        """Inputs to trace the export with: latent sizes differ in h and w and are not multiples of the UNet's
        downsampling (so the resizing skip concatenation is traced), and batch is 2, so no dimension is traced as
        a constant by accident."""
        size = CallSize(batch, *latent_hw, chunks * CHUNK_LEN)
        g = torch.Generator().manual_seed(seed)
        return {r.name: r.random(r.dims(size), "cpu", dtype, g) for r in self.rows}

    # ---- profiles ----------------------------------------------------------------------------------------------
    def engine_ranges(self, profile: Profile) -> dict[str, TensorRange]:
        """Engine shape ranges of every input for one user profile. Batch: the smallest call is B rows (cond and
        uncond called separately, or no uncond), the largest 2B (cond + uncond batched, A1111's default), the
        optimum 2B at opt."""
        lo = CallSize.of(profile.min, profile.min.batch)
        opt = CallSize.of(profile.opt, profile.opt.batch * CFG_ROWS)
        hi = CallSize.of(profile.max, profile.max.batch * CFG_ROWS)
        return {r.name: TensorRange(r.name, r.dims(lo), r.dims(opt), r.dims(hi)) for r in self.rows}

    def call_dims(self, shape: Shape, *, cfg: bool = True, rows: int | None = None) -> dict[str, Dims]:
        """The input shapes of one model call for a generation of `shape` (`rows` latents when given, else the
        batch, doubled with `cfg`)."""
        size = CallSize.of(shape, shape.batch * (CFG_ROWS if cfg else 1) if rows is None else rows)
        return {r.name: r.dims(size) for r in self.rows}

    # ---- serving -----------------------------------------------------------------------------------------------
    def feeds(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], control: Any = None
              ) -> dict[str, torch.Tensor]:
        """The engine feeds of a host call `forward(*args, **kwargs)` and what a ControlNet hook adds to it
        (`control`, for the contracts with ControlNet inputs); NotServable when the engine cannot take it (the
        reason names what is extra, missing or of the wrong shape). Optional inputs a call lacks are zeros."""
        call = self.parse_call(args, kwargs, control)
        size: CallSize | None = None
        feeds: dict[str, torch.Tensor] = {}
        for row in self.rows:
            t = row.read(call)
            if row.optional:
                size = size or self.call_size(call)
                dims = row.dims(size)
                if t is None:
                    t = self.zeros(dims, feeds[self.rows[0].name])
                elif tuple(t.shape) != dims:
                    raise NotServable(f"input {row.name} has shape {tuple(t.shape)}, the engine's is {dims}")
            elif t is None:
                raise NotServable(f"the UNet call lacks {row.source}, which this engine needs")
            feeds[row.name] = t
        return feeds

    def zeros(self, dims: Dims, like: torch.Tensor) -> torch.Tensor:
        """Zeros of `dims` in `like`'s dtype and device for an optional input a call lacks."""
        return torch.zeros(dims, dtype=like.dtype, device=like.device)

    def latent_hw(self, dims: Mapping[str, Dims]) -> tuple[int, int]:
        """The latent height and width of a call of these input shapes (its first input is the latent)."""
        shape = dims[self.rows[0].name]
        return int(shape[-2]), int(shape[-1])

    def convention_refusal(self, dims: Mapping[str, Dims], host: str, engine_id: str | None = None) -> str | None:
        """Why this contract's engine cannot serve a call of these shapes in a host computing in convention `host`
        (it follows the other one and the latent size is not a multiple of 8), or None."""
        return mismatch(self.io.convention, host, *self.latent_hw(dims), engine_id)

    def describe(self, dims: Mapping[str, Dims]) -> str:
        """A call's shapes in user units, for notices: '2 rows, 512x768 px, 1 prompt chunk'."""
        first = self.rows[0].name
        context = next((dims[r.name] for r in self.rows if r.source == "context"), None)
        n, _, h, w = dims[first]
        text = f"{n} rows, {h * LATENT_FACTOR}x{w * LATENT_FACTOR} px"
        if context is not None:
            chunks = -(-context[1] // CHUNK_LEN)
            text += f", {chunks} prompt chunk{'s' if chunks > 1 else ''}"
        return text

    # ---- check and bench ---------------------------------------------------------------------------------------
    def random_feeds(self, dims: Mapping[str, Dims], device: torch.device | str, dtype: torch.dtype,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random inputs of the given shapes, as a sampler would send them."""
        return {r.name: r.random(dims[r.name], device, dtype, generator) for r in self.rows if r.name in dims}

    def host_args(self, feeds: Mapping[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The plain host call `forward(*args, **kwargs)` of `feeds` (what a ControlNet hook adds left out)."""
        args, kwargs, _ = self.host_call(feeds)
        return args, kwargs

    def torch_call(self, module: torch.nn.Module, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run the PyTorch module on the engine's feeds (the reference for comparisons)."""
        args, kwargs = self.host_args(feeds)
        return module(*args, **kwargs)

    # ---- registry ----------------------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """What the engine key records of the contract: name, version and the model's dimensions."""
        record = {"contract": self.name, "contract_version": self.version, "in_channels": self.io.in_channels,
                  "context_dim": self.io.context_dim, "y_dim": self.io.y_dim}
        if self.io.convention != A1111:  # recorded only when not A1111's: the ids of A1111 engines stay as they were
            record["convention"] = self.io.convention
        return record


def sources(rows: Sequence[InputRow]) -> dict[str, str]:
    """source -> input name of every row."""
    return {r.source: r.name for r in rows}
