"""Stand-in for sd-webui-controlnet (Mikubill, v1.1.455) in the fake host: how it hooks and unhooks the UNet.

What it reproduces (scripts/controlnet.py and scripts/hook.py of that version; no code copied):
- `process(p)`: the previous hook is restored first; with no enabled unit nothing is hooked. Otherwise
  `UnetHook.hook` keeps `model._original_forward = model.forward` (the class forward bound to the instance, i.e.
  A1111's routed forward) and sets `model.forward` as an *instance* attribute to its own `forward_webui`.
- `postprocess`: `restore()` puts `model._original_forward` back as the instance attribute (it stays behind, bound
  to the class's forward) and deletes `_original_forward`.
- The hooked forward runs the UNet's blocks itself: control residuals are added to the skips (and after the middle
  block), T2I-Adapter features to `h` after some input blocks. A `reference_only` unit first runs a "write" pass
  through `outer.original_forward` (the class forward, so A1111 routes it to the active SD Unet) while patched
  transformer blocks store their self-attention inputs in banks; the "read" pass then attends to them.

Units come from `alwayson_scripts: {"controlnet": {"args": [{"module": "controlnet"|"t2i_adapter"|"reference_only",
"weight": 1.0}, ...]}}`. The control models are small deterministic functions of the hint (a fixed random
projection per unit), enough to change the result the way a real unit does.
"""

from __future__ import annotations

import torch
from modules import scripts

from sdtrt.unet import BasicTransformerBlock, skip_cat, timestep_embedding

UNITS = 2


class UnetHook:
    def __init__(self) -> None:
        self.model = None
        self.units: list[dict] = []
        self.writing = False
        self.reading = False
        self.original_forward = None

    def hook(self, model, units: list[dict]) -> None:  # type: ignore[no-untyped-def]
        self.model = model
        self.units = units
        outer = self

        def forward_webui(self, x, timesteps=None, context=None, y=None, **kwargs):  # type: ignore[no-untyped-def]
            if any(u["module"] == "reference_only" for u in outer.units):
                ref = _reference_latent(x)
                outer.writing = True
                try:
                    outer.original_forward(x=ref, timesteps=timesteps, context=context, **({"y": y} if y is not None
                                                                                            else {}))
                finally:
                    outer.writing = False
                outer.reading = True
            try:
                return _block_loop(self, x, timesteps, context, y, outer.units)
            finally:
                outer.reading = False

        model._original_forward = model.forward
        self.original_forward = model.forward
        model.forward = forward_webui.__get__(model, type(model))
        if any(u["module"] == "reference_only" for u in units):
            for block in [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]:
                block.bank = []
                block.forward = _reference_block_forward(block, outer).__get__(block, type(block))

    def restore(self) -> None:
        model = self.model
        if model is None:
            return
        for block in [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]:
            vars(block).pop("forward", None)
            vars(block).pop("bank", None)
        if hasattr(model, "_original_forward"):
            model.forward = model._original_forward
            del model._original_forward


def _reference_latent(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(x.shape, generator=g).to(x)


def _reference_block_forward(block, outer):  # type: ignore[no-untyped-def]
    def forward(self, x, context):  # type: ignore[no-untyped-def]
        n1 = self.norm1(x)
        if outer.writing:
            self.bank.append(n1.detach().clone())
            attn = self.attn1(n1)
        elif outer.reading and self.bank:
            attn = self.attn1(n1, torch.cat([n1] + self.bank, dim=1))
            self.bank = []
        else:
            attn = self.attn1(n1)
        x = attn + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x

    return forward


def _projection(seed: int, channels: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(channels, generator=g).to(like)[None, :, None, None]


def _control(unit: dict, index: int, like: torch.Tensor) -> torch.Tensor:
    """A unit's residual for one skip: its hint (a fixed pattern) at that size, projected to its channels."""
    _, c, h, w = like.shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    hint = torch.sin(3 * xx + 2 * yy + index).to(like)[None, None]
    return float(unit.get("weight", 1.0)) * 0.2 * hint * _projection(100 * index + 1, c, like)


def _block_loop(self, x, timesteps, context, y, units):  # type: ignore[no-untyped-def]
    """The UNet's blocks as the hook runs them, with ControlNet residuals and T2I-Adapter features."""
    controls = [u for u in units if u["module"] == "controlnet"]
    adapters = [u for u in units if u["module"] == "t2i_adapter"]
    emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.dtype))
    if y is not None:
        emb = emb + self.label_emb(y.to(self.dtype))
    h = x.to(self.dtype)
    context = context.to(self.dtype)
    hs = []
    for i, block in enumerate(self.input_blocks):
        h = block(h, emb, context)
        if i % 3 == 2:
            for unit in adapters:
                h = h + _control(unit, 50 + i, h)
        hs.append(h)
    h = self.middle_block(h, emb, context)
    for unit in controls:
        h = h + _control(unit, len(hs), h)
    for block in self.output_blocks:
        skip = hs.pop()
        for unit in controls:
            skip = skip + _control(unit, len(hs), skip)
        h = block(skip_cat(h, skip), emb, context)
    return self.out(h).to(x.dtype)


class Script(scripts.Script):
    def __init__(self) -> None:
        self.latest_network: UnetHook | None = None

    def title(self):  # type: ignore[no-untyped-def]
        return "ControlNet"

    def show(self, is_img2img):  # type: ignore[no-untyped-def]
        return scripts.AlwaysVisible

    def ui(self, is_img2img):  # type: ignore[no-untyped-def]
        return [None] * UNITS

    def process(self, p, *units):  # type: ignore[no-untyped-def]
        unet = p.sd_model.model.diffusion_model
        if self.latest_network is not None:
            self.latest_network.restore()  # always restore first, as the real extension does
        enabled = [dict(u) for u in units if isinstance(u, dict) and u.get("enabled", True)]
        if not enabled:
            self.latest_network = None
            return
        self.latest_network = UnetHook()
        self.latest_network.hook(unet, enabled)

    def postprocess(self, p, processed, *units):  # type: ignore[no-untyped-def]
        if self.latest_network is not None:
            self.latest_network.restore()
            self.latest_network = None
