"""The contract shared by the LDM and SGM UNets (`forward(x, timesteps, context[, y])`); `ldm.py` and `sgm.py`
bind it to their architecture. Its engine inputs are the rows below; their names live here and nowhere else in the
product code.

x (N, C, h, w) in the model dtype, timesteps (N,) float32 (embedded in float32 as A1111 does), context (N, 77k,
ctx), y (N, y_dim) for SGM; output (N, 4, h, w). N, h, w and the context rows are dynamic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sdtrt.errors import SdtrtError
from sdtrt.models.base import CallSize, InputRow, ModelContract, NotServable, TensorSpec, sources
from sdtrt.models.convention import A1111

SAMPLE = "sample"
TIMESTEPS = "timesteps"
CONTEXT = "encoder_hidden_states"
Y = "y"
LATENT = "latent"
#: sampler timesteps run 0..999: random timesteps are uniform in [0, 999)
MAX_TIMESTEP = 999.0


@dataclass(frozen=True)
class ControlFeeds:
    """What a ControlNet hook adds to one UNet call. `skips[i]` is added to skip connection i (the last entry after
    the middle block), `adapters[j]` to the hidden state after the j-th T2I-Adapter injection point; None adds
    nothing."""

    skips: Sequence[torch.Tensor | None]
    adapters: Sequence[torch.Tensor | None] = ()


@dataclass(frozen=True)
class UNetCall:
    """One host UNet call, parsed: the fields the input rows' sources name."""

    x: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    y: torch.Tensor | None = None
    control: ControlFeeds | None = None

    @property
    def skips(self) -> Sequence[torch.Tensor | None]:
        return self.control.skips if self.control is not None else ()

    @property
    def adapters(self) -> Sequence[torch.Tensor | None]:
        return self.control.adapters if self.control is not None else ()


def split_unet_call(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(x, timesteps, context, y) of a host call `forward(x, timesteps=None, context=None, y=None, **kw)`."""
    values = [*args[:4], *([None] * (4 - min(len(args), 4)))]
    for i, name in enumerate(("x", "timesteps", "context", "y")):
        if name in kwargs:
            values[i] = kwargs[name]
    return values[0], values[1], values[2], values[3]


def unet_host_call(x: Any, timesteps: Any, context: Any, y: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The host call (args, kwargs) of these inputs, as A1111 routes it (`y` as a keyword)."""
    return (x, timesteps, context), ({"y": y} if y is not None else {})


class _Positional(torch.nn.Module):
    """forward(sample, timesteps, context[, y]) -> unet(sample, timesteps, context[, y=y]): fixed input order."""

    def __init__(self, unet: torch.nn.Module, with_y: bool):
        super().__init__()
        self.model = unet  # base.WRAPPED
        self.with_y = with_y

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        if self.with_y:
            return self.model(sample, timesteps, context, y=y)
        return self.model(sample, timesteps, context)


class UNetContract(ModelContract):
    #: whether the architecture takes the `y` vector (SGM) or not (LDM)
    takes_y: ClassVar[bool]

    @classmethod
    def build_module(cls, spec: Any, convention: str = A1111) -> torch.nn.Module:
        from sdtrt.models.torch_unet import UNetModel, UNetSpec

        if not isinstance(spec, UNetSpec) or (spec.adm_in_channels is not None) != cls.takes_y:
            raise TypeError(f"{cls.name} builds from a UNetSpec {'with' if cls.takes_y else 'without'} a y width")
        return UNetModel(spec, convention)

    def input_rows(self) -> tuple[InputRow, ...]:
        io = self.io
        rows = [
            InputRow(SAMPLE, {0: "batch", 2: "height", 3: "width"},
                     lambda s: (s.rows, io.in_channels, s.height, s.width), "x"),
            InputRow(TIMESTEPS, {0: "batch"}, lambda s: (s.rows,), "timesteps", model_dtype=False,
                     scale=MAX_TIMESTEP, uniform=True),
            InputRow(CONTEXT, {0: "batch", 1: "context"}, lambda s: (s.rows, s.context, io.context_dim), "context"),
        ]
        if self.takes_y:
            y_dim = io.y_dim
            if y_dim is None:
                raise SdtrtError(f"the {self.name} contract needs the model's y width")
            rows.append(InputRow(Y, {0: "batch"}, lambda s: (s.rows, y_dim), "y"))
        return tuple(rows)

    def output(self) -> TensorSpec:
        return TensorSpec(LATENT, {0: "batch", 2: "height", 3: "width"})

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        self.require_convention(module)
        return _Positional(module, self.takes_y)

    def parse_call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], control: Any = None) -> UNetCall:
        """forward(x, timesteps, context, *args, y=..., **kwargs) as A1111 routes it (SD1/2: timesteps
        positional, context keyword; SGM: all keywords, so `y` arrives in kwargs)."""
        if len(args) < 3:
            raise NotServable(f"the UNet call has {len(args)} positional inputs, not x, timesteps and context")
        x, timesteps, context, *rest = args
        if control is not None and not self.takes_control:
            raise NotServable("this engine has no ControlNet inputs (build one with ControlNet inputs to serve "
                              "ControlNet units)")
        if control is not None and not isinstance(control, ControlFeeds):
            raise NotServable(f"what the ControlNet hook added is a {type(control).__name__}, not ControlFeeds")
        y = kwargs.get("y")
        extra = sorted(k for k, v in kwargs.items() if k != "y" and v is not None)
        if rest or extra:
            # ControlNet-style residuals or other extensions' arguments: the engine has no inputs for them
            raise NotServable(f"the UNet call carries extra inputs the engine lacks ({', '.join(extra) or 'positional'})")
        if self.takes_y and y is None:
            raise NotServable("the UNet call has no `y` vector, which this engine (SDXL) needs")
        if not self.takes_y and y is not None:
            raise NotServable("the UNet call carries a `y` vector, which this engine does not take")
        return UNetCall(x, timesteps, context, y, control)

    def call_size(self, call: UNetCall) -> CallSize:
        n, _, h, w = call.x.shape
        return CallSize(n, h, w, call.context.shape[1])

    def host_call(self, feeds: Mapping[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
        by_source = sources(self.rows)
        x, timesteps, context = (feeds[by_source[f]] for f in ("x", "timesteps", "context"))
        y = feeds.get(by_source["y"]) if "y" in by_source else None
        return (*unet_host_call(x, timesteps, context, y), None)
