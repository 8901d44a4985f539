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
- the decoder concatenates as the plain UNet does, in the engine's convention (A1111's: resizing to the skip's size
  in the concatenation; Forge's: upsampling to it), so sizes in steps of 8 work.

Inputs left out of a call are zero: one engine serves plain calls as well. Channels and sizes of every input follow
the UNet's own input blocks (`TensorIO.skips`), so a user profile covers them with no extra profile work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from sdtrt.errors import SdtrtError
from sdtrt.models.base import CallSize, InputRow, NotServable, TensorIO
from sdtrt.models.convention import A1111
from sdtrt.models.unet import ControlFeeds, UNetCall, UNetContract
from sdtrt.profiles import Dims

#: Distinct zero-input shapes kept per engine (a long-running server sees many sizes).
MAX_ZERO_SHAPES = 16


def control_name(i: int) -> str:
    return f"control_{i}"


def adapter_name(j: int) -> str:
    return f"adapter_{j}"


def level_hw(h: int, w: int, level: int) -> tuple[int, int]:
    """A latent size after `level` stride-2 downsamplings (3x3, padding 1: ceil(h / 2) each time)."""
    f = 2**level
    return -(-h // f), -(-w // f)


class _ControlLoop(torch.nn.Module):
    """forward(sample, timesteps, context[, y], control_0.., adapter_0..): the UNet's blocks with the additions
    described in the module docstring. Works on A1111's LDM/SGM UNet and on `sdtrt.models.torch_unet.UNetModel` alike."""

    def __init__(self, unet: torch.nn.Module, with_y: bool, n_skips: int, adapter_after: tuple[int, ...],
                 convention: str = A1111):
        super().__init__()
        self.model = unet  # base.WRAPPED
        self.convention = convention
        self.with_y = with_y
        self.n_skips = n_skips
        self.adapter_after = adapter_after

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor:
        from sdtrt.models.torch_unet import decoder_step, timestep_embedding

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
            skip = skips.pop()
            h = decoder_step(block, h, skip, skips[-1] if skips else None, emb, context, self.convention)
        return unet.out(h).to(sample.dtype)


class ControlledUNet(UNetContract):
    """A UNet contract plus ControlNet inputs: a row per skip residual (`control_i`, source `skips.i`) and per
    T2I-Adapter injection point (`adapter_j`, source `adapters.j`), optional (zeros when a call lacks them). The
    architecture modules (ldm.py, sgm.py) name the adapter injection points."""

    takes_control = True
    #: input blocks after which a T2I-Adapter feature is added to the hidden state (sd-webui-controlnet's layout)
    adapter_after: ClassVar[tuple[int, ...]]

    def __init__(self, io: TensorIO):
        if not io.skips:
            raise SdtrtError(f"the {self.name} contract needs the UNet's skip layout, which this record lacks")
        #: the injection points this UNet has (a small UNet has fewer input blocks than SD1's 12 or SDXL's 9)
        self.adapters = tuple(i for i in self.adapter_after if i < len(io.skips) - 1)
        self._zeros: dict[tuple[Any, ...], torch.Tensor] = {}
        super().__init__(io)

    def input_rows(self) -> tuple[InputRow, ...]:
        def axes(level: int) -> dict[int, str]:
            return {0: "batch", 2: "height" if level == 0 else f"height_{level}",
                    3: "width" if level == 0 else f"width_{level}"}

        def at(channels: int, level: int) -> Any:
            return lambda s: (s.rows, channels, *level_hw(s.height, s.width, level))

        skips = self.io.skips
        rows = [InputRow(control_name(i), axes(level), at(channels, level), f"skips.{i}", scale=0.1, optional=True)
                for i, (channels, level) in enumerate(skips)]
        rows += [InputRow(adapter_name(j), axes(skips[i][1]), at(*skips[i]), f"adapters.{j}", scale=0.1,
                          optional=True) for j, i in enumerate(self.adapters)]
        return (*super().input_rows(), *rows)

    def control_names(self) -> list[str]:
        return [r.name for r in self.rows if r.optional]

    def control_dims(self, size: CallSize) -> list[tuple[str, Dims]]:
        """(name, shape) of every ControlNet input in a call of this size."""
        return [(r.name, r.dims(size)) for r in self.rows if r.optional]

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        self.require_convention(module)
        return _ControlLoop(module, self.takes_y, len(self.io.skips), self.adapters, self.io.convention)

    # ---- serving -----------------------------------------------------------------------------------------------
    def parse_call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], control: Any = None) -> UNetCall:
        """The plain call plus what the hook added. A residual of another shape than the UNet's skip at this size
        is NotServable (checked with the feeds), and so are more residuals or features than the engine has."""
        call = super().parse_call(args, kwargs, control)
        if call.control is not None:
            n_skips = len(self.io.skips)
            if len(call.control.skips) != n_skips or len(call.control.adapters) > len(self.adapters):
                raise NotServable(f"the ControlNet hook sent {len(call.control.skips)} residuals and "
                                  f"{len(call.control.adapters)} adapter features; this engine takes {n_skips} and "
                                  f"{len(self.adapters)}")
        return call

    def zeros(self, dims: Dims, like: torch.Tensor) -> torch.Tensor:
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
    def host_call(self, feeds: Mapping[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
        args, kwargs, _ = super().host_call(feeds)
        n_skips = len(self.io.skips)
        control = ControlFeeds([feeds.get(control_name(i)) for i in range(n_skips)],
                               [feeds.get(adapter_name(j)) for j in range(len(self.adapters))])
        return args, kwargs, control

    def torch_call(self, module: torch.nn.Module, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The PyTorch UNet's blocks with the same additions (plain calls: zeros), as the engine computes them."""
        full = self.feeds(*self.host_call(feeds))
        return self.export_module(module)(*(full[name] for name in self.input_names()))

    # ---- registry ----------------------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        return {**super().record(), "skips": [list(s) for s in self.io.skips],
                "adapter_after": list(self.adapters)}
