"""Stand-in for sd-webui-controlnet (Mikubill, v1.1.455) in the fake host: how it hooks the UNet, computes and
adds its residuals, and unhooks. Written from the extension's behaviour (scripts/controlnet.py, scripts/hook.py of
that version; no code copied), keeping the shapes sd-webui-trt feature-detects and relies on:

- `process(p)` restores the previous hook first; with enabled units `UnetHook.hook` keeps
  `model._original_forward = model.forward` and sets the instance attribute `model.forward` to a function named
  `forward_webui`, bound to the UNet, whose closure holds the hook object `outer` (with `control_params`) and the
  inner `forward(self, x, timesteps=None, context=None, y=None, **kwargs)`; `forward_webui(*args, **kwargs)`
  calls `forward(*args, **kwargs)`, so `self` is whatever it was called with.
- `ControlParams` carry `control_model_type` (an Enum whose member names are the real ones), `preprocessor`
  ({"name": ...}), `weight`, `start/stop_guidance_percent`, `guidance_stopped` (set from `on_cfg_denoiser`),
  `soft_injection` ("My prompt is more important": weight x 0.825^(12-i)), `cfg_injection` ("ControlNet is more
  important": residuals x cond mark, which zeroes the uncond rows).
- The inner forward computes the units' residuals, then runs the UNet's blocks through `self`: `time_embed`,
  `label_emb` (SDXL), `input_blocks` (T2I-Adapter features added to h after blocks [2, 5, 8, 11], SDXL [3, 5, 8]
  and the fourth after the middle block), `middle_block` (+ the last ControlNet residual), `output_blocks`
  (residual i added to skip i inside the resizing concatenation `th.cat`), `out`; residuals are added with
  `aligned_adding` (a float 0.0 adds nothing and returns the base tensor itself). A `colorfix` preprocessor
  post-processes the output (blend towards a blurred reference), as the real one does after `self.out`.
- `reference_only` (AttentionInjection) first runs a "write" pass through `outer.original_forward` (the class
  forward, which A1111 routes to the active SD Unet) with patched transformer blocks that store their inputs;
  `ip_adapter` patches the cross-attention modules' `forward` on the instance. `restore()` puts everything back,
  leaving `forward` attributes behind bound to the class's own methods, as the real extension does.

Units come from `alwayson_scripts: {"controlnet": {"args": [{"module": "controlnet"|"t2i_adapter"|"reference_only"|
"ip_adapter"|"colorfix", "weight": 1.0, "control_mode": "balanced"|"prompt"|"controlnet", "guidance_start": 0.0,
"guidance_end": 1.0}, ...]}}`. The control models are small deterministic functions of x and a fixed hint pattern.
"""

from __future__ import annotations

import enum

import torch
from modules import script_callbacks, scripts

from sdtrt.models.torch_unet import BasicTransformerBlock, CrossAttention, timestep_embedding

UNITS = 2


class ControlModelType(enum.Enum):
    ControlNet = "ControlNet, Lvmin Zhang"
    T2I_Adapter = "T2I_Adapter, Chong Mou"
    T2I_StyleAdapter = "T2I_StyleAdapter, Chong Mou"
    AttentionInjection = "AttentionInjection, Lvmin Zhang"
    ReVision = "ReVision, Stability"
    IPAdapter = "IPAdapter, Hu Ye"

    @property
    def is_controlnet(self) -> bool:
        return self is ControlModelType.ControlNet


MODULE_TYPES = {"controlnet": ControlModelType.ControlNet, "colorfix": ControlModelType.ControlNet,
                "shuffle": ControlModelType.ControlNet, "inpaint_only": ControlModelType.ControlNet,
                "t2i_adapter": ControlModelType.T2I_Adapter, "reference_only": ControlModelType.AttentionInjection,
                "t2ia_style_clipvision": ControlModelType.T2I_StyleAdapter,
                "revision_clipvision": ControlModelType.ReVision,
                "ip_adapter": ControlModelType.IPAdapter}


class ControlParams:
    def __init__(self, unit: dict, index: int) -> None:
        self.control_model_type = MODULE_TYPES[unit["module"]]
        self.preprocessor = {"name": unit["module"]}
        self.weight = float(unit.get("weight", 1.0))
        self.start_guidance_percent = float(unit.get("guidance_start", 0.0))
        self.stop_guidance_percent = float(unit.get("guidance_end", 1.0))
        mode = unit.get("control_mode", "balanced")
        self.soft_injection = mode == "prompt"
        self.cfg_injection = mode == "controlnet"
        self.guidance_stopped = False
        self.global_average_pooling = unit["module"] == "shuffle"  # a pooled (shuffle) model: [B, C, 1, 1]
        self.seed = 100 * index + 1


class TorchHijackForUnet:
    """torch, with a `cat` that resizes the first of two tensors to the second's size (sizes in steps of 8)."""

    def __getattr__(self, item):  # type: ignore[no-untyped-def]
        return self.cat if item == "cat" else getattr(torch, item)

    def cat(self, tensors, *args, **kwargs):  # type: ignore[no-untyped-def]
        if len(tensors) == 2 and tensors[0].shape[-2:] != tensors[1].shape[-2:]:
            tensors = (torch.nn.functional.interpolate(tensors[0], tensors[1].shape[-2:], mode="nearest"), tensors[1])
        return torch.cat(tensors, *args, **kwargs)


th = TorchHijackForUnet()


def aligned_adding(base, x):  # type: ignore[no-untyped-def]
    if isinstance(x, float):
        return base if x == 0.0 else base + x
    if x.shape[-2:] != base.shape[-2:] and (x.shape[-2] > 1 or x.shape[-1] > 1):
        x = torch.nn.functional.interpolate(x, size=base.shape[-2:], mode="nearest")
    return base + x


def _pattern(seed: int, n: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """A unit's feature map at one skip: a fixed spatial pattern times a fixed per-channel projection."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(c, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    hint = torch.sin(3 * xx + 2 * yy + seed % 7)
    return (0.2 * hint[None, None] * proj[None, :, None, None]).expand(n, c, h, w).to(like)


def _skip_shapes(unet, x):  # type: ignore[no-untyped-def]
    """(channels, h, w) of every input block's output and the middle block's (the fake host's UNet has a spec)."""
    from sdtrt.models.control import level_hw

    return [(c, *level_hw(x.shape[2], x.shape[3], level)) for c, level in unet.spec.skip_layout()]


class UnetHook:
    def __init__(self) -> None:
        self.model = None
        self.control_params: list[ControlParams] | None = None
        self.attention_write = False
        self.original_forward = None
        self.lowvram = False

    def guidance_schedule_handler(self, params) -> None:  # type: ignore[no-untyped-def]
        percent = params.sampling_step / params.total_sampling_steps
        for p in self.control_params or []:
            p.guidance_stopped = percent < p.start_guidance_percent or percent > p.stop_guidance_percent

    def hook(self, model, params: list[ControlParams], is_sdxl: bool) -> None:  # type: ignore[no-untyped-def]
        self.model = model
        self.control_params = params
        outer = self

        def forward(self, x, timesteps=None, context=None, y=None, **kwargs):  # type: ignore[no-untyped-def]
            shapes = _skip_shapes(outer.model, x)
            n_skips = len(shapes)
            total_controlnet = [0.0] * n_skips
            total_t2i = [0.0] * 4
            rows = x.shape[0]
            cond_mark = torch.ones(rows, 1, 1, 1).to(x)
            if rows % 2 == 0:
                cond_mark[rows // 2:] = 0  # A1111 batches the cond rows first, then the uncond rows
            if is_sdxl:  # ReVision: the first 1280 values of y become the image embedding (cond rows only)
                revision = [p for p in outer.control_params if not p.guidance_stopped
                            and p.control_model_type is ControlModelType.ReVision]
                if revision:
                    emb = sum(p.weight * _pattern(p.seed, 1, 1280, 1, 1, y).reshape(1, 1280) for p in revision)
                    y[:, :1280] = emb * cond_mark[:, :, 0, 0]
            for p in outer.control_params:  # the style adapter appends 8 tokens to the context
                if not p.guidance_stopped and p.control_model_type is ControlModelType.T2I_StyleAdapter:
                    tokens = _pattern(p.seed, 1, 8, 1, context.shape[2], context)[0, :, 0]
                    tokens = (tokens * p.weight).expand(rows, 8, context.shape[2]) * cond_mark[:, :, :, 0]
                    context = torch.cat([context, tokens], dim=1)
            for p in outer.control_params:
                if p.guidance_stopped or not (p.control_model_type.is_controlnet
                                              or p.control_model_type is ControlModelType.T2I_Adapter):
                    continue
                if p.control_model_type.is_controlnet:
                    control = [_pattern(p.seed + i, rows, c, h, w, x) * (1 + x.mean()) for i, (c, h, w)
                               in enumerate(shapes)]
                    scales = [p.weight * 0.825 ** float(12 - i) if p.soft_injection else p.weight
                              for i in range(n_skips)]
                    target = total_controlnet
                else:
                    points = [3, 5, 8] if is_sdxl else [2, 5, 8, 11]
                    control = [_pattern(p.seed + 50 + i, rows, *shapes[min(k, n_skips - 1)], x)
                               for i, k in enumerate(points + [n_skips - 1])][:4]
                    scales = [p.weight * s for s in (0.25, 0.62, 0.825, 1.0)] if p.soft_injection else [p.weight] * 4
                    target = total_t2i
                if p.cfg_injection or p.global_average_pooling:
                    control = [c * cond_mark for c in control]
                if p.global_average_pooling:
                    control = [c.mean(dim=(2, 3), keepdim=True) for c in control]
                for i, (c, s) in enumerate(zip(control, scales)):
                    target[i] = c * s + target[i]

            for p in outer.control_params:
                if p.control_model_type is ControlModelType.AttentionInjection and not p.guidance_stopped:
                    ref = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(x)
                    outer.attention_write = True
                    try:
                        outer.original_forward(x=ref, timesteps=timesteps, context=context,
                                               **({"y": y} if is_sdxl else {}))
                    finally:
                        outer.attention_write = False

            x_in = x
            for p in outer.control_params:  # inpaint models: the masked image and mask channels are replaced
                if p.preprocessor["name"] == "inpaint_only" and x.shape[1] == 9:
                    x = torch.cat([x[:, :4], _pattern(p.seed + 7, rows, 5, x.shape[2], x.shape[3], x)], dim=1)

            hs = []
            t_emb = timestep_embedding(timesteps, self.model_channels).to(x.dtype)
            emb = self.time_embed(t_emb)
            if is_sdxl:
                emb = emb + self.label_emb(y)
            h = x
            points = [3, 5, 8] if is_sdxl else [2, 5, 8, 11]
            for i, module in enumerate(self.input_blocks):
                h = module(h, emb, context)
                if i in points:
                    h = aligned_adding(h, total_t2i.pop(0))
                hs.append(h)
            h = self.middle_block(h, emb, context)
            h = aligned_adding(h, total_controlnet.pop())
            if is_sdxl and total_t2i:
                h = aligned_adding(h, total_t2i.pop(0))
            for module in self.output_blocks:
                h = th.cat([h, aligned_adding(hs.pop(), total_controlnet.pop())], dim=1)
                h = module(h, emb, context)
            h = h.type(x.dtype)
            h = self.out(h)

            for p in outer.control_params:
                if p.preprocessor["name"] == "inpaint_only":  # blend towards the input latent, as restore does
                    h = h * 0.8 + 0.2 * x_in[:, :4]
                if p.preprocessor["name"] == "colorfix":
                    blurred = torch.nn.functional.avg_pool2d(h, 3, stride=1, padding=1)
                    h = h * (1 - 0.5 * p.weight) + blurred * 0.5 * p.weight
            return h

        def forward_webui(*args, **kwargs):  # type: ignore[no-untyped-def]
            try:
                return forward(*args, **kwargs)
            finally:
                if outer.lowvram:  # the real one moves its control models off the device here
                    pass

        model._original_forward = model.forward
        self.original_forward = model.forward
        model.forward = forward_webui.__get__(model, type(model))

        if any(p.control_model_type is ControlModelType.AttentionInjection for p in params):
            for block in [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]:
                block.bank = []
                block.forward = _reference_block_forward(outer).__get__(block, type(block))
        if any(p.control_model_type is ControlModelType.IPAdapter for p in params):
            for attn in [m for m in model.modules() if isinstance(m, CrossAttention)]:
                attn.sdtrt_test_original = attn.forward
                attn.forward = _ip_adapter_forward.__get__(attn, type(attn))
        script_callbacks.on_cfg_denoiser(self.guidance_schedule_handler)

    def restore(self) -> None:
        script_callbacks.remove_callbacks_for_function(self.guidance_schedule_handler)
        model = self.model
        if model is None:
            return
        for block in [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]:
            vars(block).pop("bank", None)
            if "forward" in vars(block):
                block.forward = type(block).forward.__get__(block, type(block))  # left behind, restored
        for attn in [m for m in model.modules() if isinstance(m, CrossAttention)]:
            original = vars(attn).pop("sdtrt_test_original", None)
            if original is not None:
                attn.forward = original
        if hasattr(model, "_original_forward"):
            model.forward = model._original_forward
            del model._original_forward


def _ip_adapter_forward(self, x, context=None):  # type: ignore[no-untyped-def]
    return self.sdtrt_test_original(x, context) * 1.1


def _reference_block_forward(outer):  # type: ignore[no-untyped-def]
    def forward(self, x, context):  # type: ignore[no-untyped-def]
        n1 = self.norm1(x)
        if outer.attention_write:
            self.bank.append(n1.detach().clone())
            attn = self.attn1(n1)
        elif self.bank:
            attn = self.attn1(n1, torch.cat([n1] + self.bank, dim=1))
            self.bank = []
        else:
            attn = self.attn1(n1)
        x = attn + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x

    return forward


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
        self.latest_network.hook(unet, [ControlParams(u, i) for i, u in enumerate(enabled)],
                                 is_sdxl=getattr(p.sd_model, "is_sdxl", False))

    def postprocess(self, p, processed, *units):  # type: ignore[no-untyped-def]
        if self.latest_network is not None:
            self.latest_network.restore()
            self.latest_network = None
