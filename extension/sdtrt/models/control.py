"""The UNet contract's variant with ControlNet inputs: the plain inputs plus one residual per skip connection
(`control_0 .. control_{N-1}`, the last added after the middle block) and the T2I-Adapter features
(`adapter_0 ..`), exactly where sd-webui-controlnet's hook adds them when it runs the UNet's blocks itself.

What the engine computes, block by block (`_ControlLoop`):
- after input block i: the skip connection kept for the decoder is `block_i(h) + control_i`, and the hidden state
  going down is `block_i(h) + adapter_j` where i is the architecture's j-th adapter injection point
  (`adapter_after`), else `block_i(h)`. At an injection point `control_i` therefore carries the adapter feature too
  (the hook adds the feature to `h` before keeping it as the skip): serving passes what the hook added to each skip
  as a whole, so nothing is split or subtracted;
- after the middle block: `+ control_{N-1}` (for SDXL the hook's fourth adapter feature is added there too);
- the decoder concatenates as the plain UNet does (resizing to the skip's size, so sizes in steps of 8 work).

Inputs left out of a call are zero: one engine serves plain calls as well. Channels and sizes of every input follow
the UNet's own input blocks (`TensorIO.skips`), so a user profile covers them with no extra profile work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sdtrt.constants import CFG_ROWS
from sdtrt.errors import SdtrtError
from sdtrt.models.base import NotServable, TensorIO, TensorSpec
from sdtrt.models.unet import CONTEXT, CONTROL_KW, SAMPLE, TIMESTEPS, UNetContract, Y
from sdtrt.profiles import Dims, Profile, Shape, TensorRange

#: Distinct zero-input shapes kept per engine (a long-running server sees many sizes).
MAX_ZERO_SHAPES = 16


def control_name(i: int) -> str:
    return f"control_{i}"


def adapter_name(j: int) -> str:
    return f"adapter_{j}"


@dataclass(frozen=True)
class ControlFeeds:
    """What a ControlNet hook adds to one UNet call. `skips[i]` is added to skip connection i (the last entry after
    the middle block), `adapters[j]` to the hidden state after input block `adapter_after[j]`; None adds nothing."""

    skips: Sequence[torch.Tensor | None]
    adapters: Sequence[torch.Tensor | None] = ()


def level_hw(h: int, w: int, level: int) -> tuple[int, int]:
    """A latent size after `level` stride-2 downsamplings (3x3, padding 1: ceil(h / 2) each time)."""
    f = 2**level
    return -(-h // f), -(-w // f)


class _ControlLoop(torch.nn.Module):
    """forward(sample, timesteps, context[, y], control_0.., adapter_0..): the UNet's blocks with the additions
    described in the module docstring. Works on A1111's LDM/SGM UNet and on `sdtrt.models.torch_unet.UNetModel` alike."""

    def __init__(self, unet: torch.nn.Module, with_y: bool, n_skips: int, adapter_after: tuple[int, ...]):
        super().__init__()
        self.model = unet  # base.WRAPPED
        self.with_y = with_y
        self.n_skips = n_skips
        self.adapter_after = adapter_after

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor:
        from sdtrt.models.torch_unet import skip_cat, timestep_embedding

        unet = self.model
        y = rest[0] if self.with_y else None
        rest = rest[1:] if self.with_y else rest
        controls, adapters = rest[: self.n_skips], rest[self.n_skips:]
        dtype = unet.time_embed[0].weight.dtype
        emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels).to(dtype))
        if y is not None:
            emb = emb + unet.label_emb(y.to(dtype))
        h = sample.to(dtype)
        context = context.to(dtype)
        skips = []
        for i, block in enumerate(unet.input_blocks):
            out = block(h, emb, context)
            skips.append(out + controls[i].to(dtype))
            h = out + adapters[self.adapter_after.index(i)].to(dtype) if i in self.adapter_after else out
        h = unet.middle_block(h, emb, context) + controls[-1].to(dtype)
        for block in unet.output_blocks:
            h = block(skip_cat(h, skips.pop()), emb, context)
        return unet.out(h).to(sample.dtype)


class ControlledUNet(UNetContract):
    """A UNet contract plus ControlNet inputs. Subclasses (ldm.py, sgm.py) name the adapter injection points."""

    takes_control = True
    #: input blocks after which a T2I-Adapter feature is added to the hidden state (sd-webui-controlnet's layout)
    adapter_after: ClassVar[tuple[int, ...]]

    def __init__(self, io: TensorIO):
        if not io.skips:
            raise SdtrtError(f"the {self.name} contract needs the UNet's skip layout, which this record lacks")
        super().__init__(io)
        #: the injection points this UNet has (a small UNet has fewer input blocks than SD1's 12 or SDXL's 9)
        self.adapters = tuple(i for i in self.adapter_after if i < len(io.skips) - 1)
        self._zeros: dict[tuple[Any, ...], torch.Tensor] = {}

    # ---- layout ------------------------------------------------------------------------------------------------
    def _control_dims(self, n: int, h: int, w: int) -> list[tuple[str, Dims]]:
        out: list[tuple[str, Dims]] = []
        for i, (channels, level) in enumerate(self.io.skips):
            out.append((control_name(i), (n, channels, *level_hw(h, w, level))))
        for j, i in enumerate(self.adapters):
            channels, level = self.io.skips[i]
            out.append((adapter_name(j), (n, channels, *level_hw(h, w, level))))
        return out

    def control_names(self) -> list[str]:
        return [name for name, _ in self._control_dims(1, 8, 8)]

    # ---- export ------------------------------------------------------------------------------------------------
    def inputs(self) -> tuple[TensorSpec, ...]:
        def axes(level: int) -> dict[int, str]:
            return {0: "batch", 2: "height" if level == 0 else f"height_{level}",
                    3: "width" if level == 0 else f"width_{level}"}

        specs = [TensorSpec(control_name(i), axes(level)) for i, (_, level) in enumerate(self.io.skips)]
        specs += [TensorSpec(adapter_name(j), axes(self.io.skips[i][1])) for j, i in enumerate(self.adapters)]
        return (*super().inputs(), *specs)

    def example_inputs(self, dtype: torch.dtype, *, seed: int = 0, batch: int = 2,
                       latent_hw: tuple[int, int] = (16, 24), chunks: int = 1) -> dict[str, torch.Tensor]:
        feeds = super().example_inputs(dtype, seed=seed, batch=batch, latent_hw=latent_hw, chunks=chunks)
        g = torch.Generator().manual_seed(seed + 1)
        for name, dims in self._control_dims(batch, *latent_hw):
            feeds[name] = (0.1 * torch.randn(dims, generator=g)).to(dtype)
        return feeds

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return _ControlLoop(module, self.takes_y, len(self.io.skips), self.adapters)

    # ---- profiles ----------------------------------------------------------------------------------------------
    def engine_ranges(self, profile: Profile) -> dict[str, TensorRange]:
        ranges = super().engine_ranges(profile)
        lo, mid, hi = profile.min, profile.opt, profile.max
        n_lo, n_opt, n_hi = lo.batch, mid.batch * CFG_ROWS, hi.batch * CFG_ROWS

        def dims(s: Shape, n: int) -> dict[str, Dims]:
            return dict(self._control_dims(n, *s.latent_hw))

        d_lo, d_opt, d_hi = dims(lo, n_lo), dims(mid, n_opt), dims(hi, n_hi)
        for name in d_lo:
            ranges[name] = TensorRange(name, d_lo[name], d_opt[name], d_hi[name])
        return ranges

    # ---- serving -----------------------------------------------------------------------------------------------
    def feeds(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The plain feeds plus the ControlFeeds under CONTROL_KW (zeros where a residual is None or the call
        has none). A residual of another shape than the UNet's skip at this size is NotServable."""
        control = kwargs.get(CONTROL_KW)
        feeds = super().feeds(args, {k: v for k, v in kwargs.items() if k != CONTROL_KW})
        if control is not None and not isinstance(control, ControlFeeds):
            raise NotServable(f"the UNet call's {CONTROL_KW} is a {type(control).__name__}, not ControlFeeds")
        x = feeds[SAMPLE]
        n, _, h, w = x.shape
        expected = self._control_dims(n, h, w)
        given: list[torch.Tensor | None] = [None] * len(expected)
        if control is not None:
            n_skips = len(self.io.skips)
            if len(control.skips) != n_skips or len(control.adapters) > len(self.adapters):
                raise NotServable(f"the ControlNet hook sent {len(control.skips)} residuals and "
                                  f"{len(control.adapters)} adapter features; this engine takes {n_skips} and "
                                  f"{len(self.adapters)}")
            given[:n_skips] = control.skips
            given[n_skips:n_skips + len(control.adapters)] = control.adapters
        for (name, dims), t in zip(expected, given):
            if t is None:
                feeds[name] = self._zero(dims, x)
            elif tuple(t.shape) != dims:
                raise NotServable(f"ControlNet input {name} has shape {tuple(t.shape)}, the engine's is {dims}")
            else:
                feeds[name] = t
        return feeds

    def _zero(self, dims: Dims, like: torch.Tensor) -> torch.Tensor:
        """One zero tensor per shape, reused by every call (no per-step allocation; never written)."""
        key = (dims, like.dtype, like.device)
        t = self._zeros.get(key)
        if t is None:
            if len(self._zeros) >= MAX_ZERO_SHAPES * len(self.io.skips):
                self._zeros.clear()
            t = self._zeros[key] = torch.zeros(dims, dtype=like.dtype, device=like.device)
        return t

    def describe(self, dims: Mapping[str, Dims]) -> str:
        return super().describe(dims) + ", ControlNet inputs"

    # ---- check and bench ---------------------------------------------------------------------------------------
    def random_feeds(self, dims: Mapping[str, Dims], device: torch.device | str, dtype: torch.dtype,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        feeds = super().random_feeds(dims, device, dtype, generator)
        for name in self.control_names():
            feeds[name] = (0.1 * torch.randn(dims[name], generator=generator)).to(device, dtype)
        return feeds

    def host_args(self, feeds: Mapping[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = super().host_args(feeds)
        n_skips = len(self.io.skips)
        kwargs[CONTROL_KW] = ControlFeeds(
            [feeds.get(control_name(i)) for i in range(n_skips)],
            [feeds.get(adapter_name(j)) for j in range(len(self.adapters))])
        return args, kwargs

    def torch_call(self, module: torch.nn.Module, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The PyTorch UNet's blocks with the same additions (plain calls: zeros), as the engine computes them."""
        names = [SAMPLE, TIMESTEPS, CONTEXT] + ([Y] if self.takes_y else [])
        plain = {k: v for k, v in feeds.items() if k in names}
        full = self.feeds(*self.host_args(plain)) if len(plain) == len(feeds) else dict(feeds)
        return self.export_module(module)(*(full[name] for name in self.input_names()))

    # ---- registry ----------------------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        return {**super().record(), "skips": [list(s) for s in self.io.skips],
                "adapter_after": list(self.adapters)}
