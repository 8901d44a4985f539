"""The contract shared by the LDM and SGM UNets (`forward(x, timesteps, context[, y])`); `ldm.py` and `sgm.py`
bind it to their architecture. The engine input names live here and nowhere else in the product code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from sdtrt.constants import CFG_ROWS, CHUNK_LEN, LATENT_FACTOR
from sdtrt.models.base import ModelContract, NotServable, TensorSpec
from sdtrt.profiles import Dims, Profile, Shape, TensorRange

SAMPLE = "sample"
TIMESTEPS = "timesteps"
CONTEXT = "encoder_hidden_states"
Y = "y"
LATENT = "latent"
#: The keyword under which a host call carries what a ControlNet hook adds (`control.ControlFeeds`); only the
#: ControlNet serving path sends it, and only the variants with ControlNet inputs take it.
CONTROL_KW = "sdtrt_control"


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
    """x (N, C, h, w) in the model dtype, timesteps (N,) float32 (embedded in float32 as A1111 does), context
    (N, 77k, ctx), y (N, y_dim) for SGM; output (N, 4, h, w). N, h, w and the context rows are dynamic."""

    #: whether the architecture takes the `y` vector (SGM) or not (LDM)
    takes_y: ClassVar[bool]

    @classmethod
    def build_module(cls, spec: Any) -> torch.nn.Module:
        from sdtrt.models.torch_unet import UNetModel, UNetSpec

        if not isinstance(spec, UNetSpec) or (spec.adm_in_channels is not None) != cls.takes_y:
            raise TypeError(f"{cls.name} builds from a UNetSpec {'with' if cls.takes_y else 'without'} a y width")
        return UNetModel(spec)

    def inputs(self) -> tuple[TensorSpec, ...]:
        batch = {0: "batch"}
        specs = [TensorSpec(SAMPLE, {0: "batch", 2: "height", 3: "width"}),
                 TensorSpec(TIMESTEPS, batch, model_dtype=False),
                 TensorSpec(CONTEXT, {0: "batch", 1: "context"})]
        if self.takes_y:
            specs.append(TensorSpec(Y, batch))
        return tuple(specs)

    def output(self) -> TensorSpec:
        return TensorSpec(LATENT, {0: "batch", 2: "height", 3: "width"})

    def example_inputs(self, dtype: torch.dtype, *, seed: int = 0, batch: int = 2,
                       latent_hw: tuple[int, int] = (16, 24), chunks: int = 1) -> dict[str, torch.Tensor]:
        """Latent sizes differ in h and w, are not multiples of the UNet's downsampling (so the resizing skip
        concatenation is traced), and batch is 2, so no dimension is traced as a constant by accident."""
        g = torch.Generator().manual_seed(seed)
        io = self.io
        feeds = {
            SAMPLE: torch.randn(batch, io.in_channels, *latent_hw, generator=g).to(dtype),
            TIMESTEPS: torch.rand(batch, generator=g) * 999,
            CONTEXT: torch.randn(batch, chunks * CHUNK_LEN, io.context_dim, generator=g).to(dtype),
        }
        if self.takes_y:
            assert io.y_dim is not None
            feeds[Y] = torch.randn(batch, io.y_dim, generator=g).to(dtype)
        return feeds

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return _Positional(module, self.takes_y)

    def engine_ranges(self, profile: Profile) -> dict[str, TensorRange]:
        """Batch: the smallest call is B rows (cond and uncond called separately, or no uncond), the largest 2B
        (cond + uncond batched, A1111's default), the optimum 2B at opt."""
        io = self.io
        lo, mid, hi = profile.min, profile.opt, profile.max
        n_lo, n_opt, n_hi = lo.batch, mid.batch * CFG_ROWS, hi.batch * CFG_ROWS

        def sample(s: Shape, n: int) -> Dims:
            h, w = s.latent_hw
            return (n, io.in_channels, h, w)

        def context(s: Shape, n: int) -> Dims:
            return (n, s.chunks * CHUNK_LEN, io.context_dim)

        ranges = {
            SAMPLE: TensorRange(SAMPLE, sample(lo, n_lo), sample(mid, n_opt), sample(hi, n_hi)),
            TIMESTEPS: TensorRange(TIMESTEPS, (n_lo,), (n_opt,), (n_hi,)),
            CONTEXT: TensorRange(CONTEXT, context(lo, n_lo), context(mid, n_opt), context(hi, n_hi)),
        }
        if self.takes_y:
            assert io.y_dim is not None
            ranges[Y] = TensorRange(Y, (n_lo, io.y_dim), (n_opt, io.y_dim), (n_hi, io.y_dim))
        return ranges

    def call_dims(self, shape: Shape, *, cfg: bool = True, rows: int | None = None) -> dict[str, Dims]:
        rows = shape.batch * (CFG_ROWS if cfg else 1) if rows is None else rows
        return {name: (rows, *r.opt[1:]) for name, r in self.engine_ranges(Profile.static(shape)).items()}

    def feeds(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """forward(x, timesteps, context, *args, y=..., **kwargs) as A1111 routes it (SD1/2: timesteps
        positional, context keyword; SGM: all keywords, so `y` arrives in kwargs)."""
        if len(args) < 3:
            raise NotServable(f"the UNet call has {len(args)} positional inputs, not x, timesteps and context")
        x, timesteps, context, *rest = args
        if kwargs.get(CONTROL_KW) is not None:
            raise NotServable("this engine has no ControlNet inputs (build one with ControlNet inputs to serve "
                              "ControlNet units)")
        y = kwargs.get("y")
        extra = sorted(k for k, v in kwargs.items() if k != "y" and v is not None)
        if rest or extra:
            # ControlNet-style residuals or other extensions' arguments: the engine has no inputs for them
            raise NotServable(f"the UNet call carries extra inputs the engine lacks ({', '.join(extra) or 'positional'})")
        if self.takes_y and y is None:
            raise NotServable("the UNet call has no `y` vector, which this engine (SDXL) needs")
        if not self.takes_y and y is not None:
            raise NotServable("the UNet call carries a `y` vector, which this engine does not take")
        feeds = {SAMPLE: x, TIMESTEPS: timesteps, CONTEXT: context}
        if y is not None:
            feeds[Y] = y
        return feeds

    @staticmethod
    def split_call(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, Any, Any, Any]:
        """(x, timesteps, context, y) of a host call `forward(x, timesteps=None, context=None, y=None, **kw)`."""
        values = [*args[:4], *([None] * (4 - min(len(args), 4)))]
        for i, name in enumerate(("x", "timesteps", "context", "y")):
            if name in kwargs:
                values[i] = kwargs[name]
        return values[0], values[1], values[2], values[3]

    @staticmethod
    def make_call(x: Any, timesteps: Any, context: Any, y: Any, **extra: Any
                  ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The host call (args, kwargs) of these inputs, as A1111 routes it (`y` as a keyword), plus `extra`."""
        return (x, timesteps, context), {**extra, **({"y": y} if y is not None else {})}

    def describe(self, dims: Mapping[str, Dims]) -> str:
        """'2 rows, 512x768 px, 1 prompt chunk'."""
        n, _, h, w = dims[SAMPLE]
        chunks = -(-dims[CONTEXT][1] // CHUNK_LEN)
        return f"{n} rows, {h * LATENT_FACTOR}x{w * LATENT_FACTOR} px, {chunks} prompt chunk{'s' if chunks > 1 else ''}"

    def random_feeds(self, dims: Mapping[str, Dims], device: torch.device | str, dtype: torch.dtype,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        feeds = {
            SAMPLE: torch.randn(dims[SAMPLE], generator=generator).to(device, dtype),
            TIMESTEPS: (torch.rand(dims[TIMESTEPS], generator=generator) * 999).to(device),
            CONTEXT: torch.randn(dims[CONTEXT], generator=generator).to(device, dtype),
        }
        if Y in dims:
            feeds[Y] = torch.randn(dims[Y], generator=generator).to(device, dtype)
        return feeds

    def host_args(self, feeds: Mapping[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (feeds[SAMPLE], feeds[TIMESTEPS], feeds[CONTEXT]), ({"y": feeds[Y]} if Y in feeds else {})
