"""Fake `backend/nn/unet.py` IntegratedUNet2DConditionModel: Forge's own SD UNet. The module tree and state-dict keys
are LDM's (it is sdtrt's LDM-key UNet, built from the same `UNetSpec`), the forward is Forge's:

`forward(x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs)` writes
"original_shape", "transformer_index" and "block" into `transformer_options` (the dict it is given), runs
`block_modifiers` around every block and the `patches` "input_block_patch", "input_block_patch_after_skip",
"output_block_patch" (`h, hsp = patch(h, hsp, transformer_options)`), adds ControlNet residuals (`control["input"]`
/ `["middle"]` / `["output"]`, popped from the end), wraps the final GroupNorm with "group_norm_wrapper", and - the
numerical difference to A1111 - upsamples straight to the next skip connection's size (`Upsample(x, output_shape)`)
where A1111 upsamples x2 and resizes inside the concatenation: the two agree when the latent's sides are multiples of
8 and differ otherwise. "patches_replace" (attention replacements) is not modelled.

Fake-only: every forward is recorded in `fake_forge_trace.calls` ("torch"), every move reaching it in `.reached`."""

from __future__ import annotations

import fake_forge_trace
import torch
import torch.nn.functional as F

from backend import memory_management
from sdtrt.models.torch_unet import ResBlock, SpatialTransformer, Upsample, timestep_embedding
from sdtrt.models.torch_unet import UNetModel as _LdmKeyUNet


def apply_control(h, control, name):  # type: ignore[no-untyped-def]
    if control is not None and name in control and len(control[name]) > 0:
        residual = control[name].pop()
        if residual is not None:
            h = h + residual
    return h


def _run(block, h, emb, context, output_shape=None):  # type: ignore[no-untyped-def]
    for layer in block:
        if isinstance(layer, ResBlock):
            h = layer(h, emb)
        elif isinstance(layer, SpatialTransformer):
            h = layer(h, context)
        elif isinstance(layer, Upsample):
            size = list(output_shape[2:]) if output_shape is not None else [h.shape[2] * 2, h.shape[3] * 2]
            h = layer.conv(F.interpolate(h, size=size, mode="nearest"))
        else:
            h = layer(h)
    return h


class IntegratedUNet2DConditionModel(fake_forge_trace.RecordsReach, _LdmKeyUNet):
    def __init__(self, spec):  # type: ignore[no-untyped-def]
        super().__init__(spec)
        self.num_classes = "sequential" if spec.adm_in_channels is not None else None
        self.storage_dtype = self.computation_dtype = torch.float32
        self.load_device = self.offload_device = self.initial_device = memory_management.cpu

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={},  # type: ignore[no-untyped-def,override]  # noqa: B006
                **kwargs):
        fake_forge_trace.record_call("torch", self, x, timesteps, context, transformer_options, kwargs)
        options = transformer_options
        options["original_shape"] = list(x.shape)
        options["transformer_index"] = 0
        patches = options.get("patches", {})
        modifiers = options.get("block_modifiers", [])
        assert (y is not None) == (self.num_classes is not None)

        def modify(h, when):  # type: ignore[no-untyped-def]
            for modifier in modifiers:
                h = modifier(h, when, options)
            return h

        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h, hs = x, []
        for i, block in enumerate(self.input_blocks):
            options["block"] = ("input", i)
            h = modify(h, "before")
            h = apply_control(_run(block, h, emb, context), control, "input")
            h = modify(h, "after")
            for patch in patches.get("input_block_patch", []):
                h = patch(h, options)
            hs.append(h)
            for patch in patches.get("input_block_patch_after_skip", []):
                h = patch(h, options)
        options["block"] = ("middle", 0)
        h = modify(h, "before")
        h = apply_control(_run(self.middle_block, h, emb, context), control, "middle")
        h = modify(h, "after")
        for i, block in enumerate(self.output_blocks):
            options["block"] = ("output", i)
            skip = apply_control(hs.pop(), control, "output")
            for patch in patches.get("output_block_patch", []):
                h, skip = patch(h, skip, options)
            h = torch.cat([h, skip], dim=1)
            h = modify(h, "before")
            h = _run(block, h, emb, context, hs[-1].shape if hs else None)
            h = modify(h, "after")
        options["block"] = ("last", 0)
        h = modify(h, "before")
        if "group_norm_wrapper" in options:
            h = self.out[1:](options["group_norm_wrapper"](self.out[0], h, options))
        else:
            h = self.out(h)
        h = modify(h, "after")
        return h.type(x.dtype)


class Timestep(torch.nn.Module):
    """Forge's `Timestep(dim)`: the sinusoidal embedding [cos, sin] of its input (SDXL's size/crop/aesthetic
    embeddings of 256 each)."""

    def __init__(self, dim):  # type: ignore[no-untyped-def]
        super().__init__()
        self.dim = dim

    def forward(self, t):  # type: ignore[no-untyped-def]
        return timestep_embedding(t, self.dim)
