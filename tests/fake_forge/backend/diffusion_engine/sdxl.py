"""Fake `backend/diffusion_engine/sdxl.py`: `StableDiffusionXL` (base: CLIP-L + OpenCLIP ViT-bigG) and
`StableDiffusionXLRefiner` (ViT-bigG only), as Forge builds them: a UnetPatcher over a KModel over the UNet, a CLIP
patcher over the text encoders (`clip_l` / `clip_g`), a VAE. `get_learned_conditioning(prompts)` returns Forge's SDXL
condition dict:

- base: crossattn = cat(CLIP-L rows 768, CLIP-G rows 1280) = 2048 wide; vector (2816) = pooled CLIP-G (1280) then
  `Timestep(256)` of height, width, crop top (`opts.sdxl_crop_top`), crop left (`opts.sdxl_crop_left`), target
  height, target width (= height, width: Forge passes the prompt's own size);
- refiner: crossattn = CLIP-G rows (1280); vector (2560) = pooled CLIP-G then height, width, crop top, crop left and
  the aesthetic score (`opts.sdxl_refiner_low_aesthetic_score` for negative prompts, else `..._high_...`);
- width/height from the prompt list (A1111's SdConditioning), 1024 when absent; an all-empty negative prompt zeroes
  the pooled output and the rows (force_zero_negative_prompt).
The text encoders are the fake A1111's deterministic `fake_clip` at 768 ("clip-768") and 1280 ("clip-1280") wide -
the salts the fake A1111's SDXL conditioner uses, so both fakes give a prompt the same conditioning - with the
pooled output of the 1280-wide one."""

from __future__ import annotations

import math

import a1111_fakes
import torch
from modules.shared import opts

from backend import memory_management
from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
from backend.nn.unet import Timestep
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from backend.patcher.vae import VAE


class TextEncoders(torch.nn.Module):
    """Stands in for Forge's `cond_stage_model` of SDXL (modules `clip_l`, `clip_g`; no weights: `fake_clip`)."""

    def __init__(self, widths: dict[str, int]):
        super().__init__()
        self.widths = dict(widths)

    def encode(self, name: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (B, 77k, width), pooled (B, width)) of encoder `name`."""
        width = self.widths[name]
        return a1111_fakes.module("fake_clip").encode(list(prompts), width, f"clip-{width}")


def _size_embeddings(embedder, values, batch, like):  # type: ignore[no-untyped-def]
    out = [embedder(torch.Tensor([v])) for v in values]
    return torch.flatten(torch.cat(out)).unsqueeze(dim=0).repeat(batch, 1).to(like)


class _SDXLCommon(ForgeDiffusionEngine):
    def __init__(self, estimated_config, huggingface_components):  # type: ignore[no-untyped-def]
        super().__init__(estimated_config, huggingface_components)
        clip = CLIP(huggingface_components["text_encoder"])
        vae = VAE(model=huggingface_components.get("vae"))
        unet = UnetPatcher.from_model(model=huggingface_components["unet"],
                                      diffusers_scheduler=huggingface_components["scheduler"], config=estimated_config)
        self.embedder = Timestep(256)
        self.forge_objects = ForgeObjects(unet=unet, clip=clip, vae=vae, clipvision=None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.is_sdxl = True  # WebUI legacy (the refiner too)

    def _encode(self, name, prompt):  # type: ignore[no-untyped-def]
        return self.forge_objects.clip.cond_stage_model.encode(name, list(prompt))

    def get_prompt_lengths_on_ui(self, prompt):  # type: ignore[no-untyped-def]
        tokens = len(a1111_fakes.module("fake_clip").tokenize(prompt))
        return tokens, max(1, math.ceil(tokens / 75)) * 75

    @torch.inference_mode()
    def encode_first_stage(self, x):  # type: ignore[no-untyped-def]
        return self.forge_objects.vae.encode(x).to(x)

    @torch.inference_mode()
    def decode_first_stage(self, x):  # type: ignore[no-untyped-def]
        return self.forge_objects.vae.decode(x).to(x)


class StableDiffusionXL(_SDXLCommon):
    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):  # type: ignore[no-untyped-def]
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        cond_l, _ = self._encode("clip_l", prompt)
        cond_g, clip_pooled = self._encode("clip_g", prompt)
        width = getattr(prompt, "width", 1024) or 1024
        height = getattr(prompt, "height", 1024) or 1024
        is_negative_prompt = getattr(prompt, "is_negative_prompt", False)
        crop_w, crop_h = opts.sdxl_crop_left, opts.sdxl_crop_top
        target_width, target_height = width, height
        flat = _size_embeddings(self.embedder, [height, width, crop_h, crop_w, target_height, target_width],
                                clip_pooled.shape[0], clip_pooled)
        if is_negative_prompt and all(x == "" for x in prompt):
            clip_pooled = torch.zeros_like(clip_pooled)
            cond_l = torch.zeros_like(cond_l)
            cond_g = torch.zeros_like(cond_g)
        return {"crossattn": torch.cat([cond_l, cond_g], dim=2), "vector": torch.cat([clip_pooled, flat], dim=1)}


class StableDiffusionXLRefiner(_SDXLCommon):
    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):  # type: ignore[no-untyped-def]
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        cond_g, clip_pooled = self._encode("clip_g", prompt)
        width = getattr(prompt, "width", 1024) or 1024
        height = getattr(prompt, "height", 1024) or 1024
        is_negative_prompt = getattr(prompt, "is_negative_prompt", False)
        crop_w, crop_h = opts.sdxl_crop_left, opts.sdxl_crop_top
        aesthetic = (opts.sdxl_refiner_low_aesthetic_score if is_negative_prompt
                     else opts.sdxl_refiner_high_aesthetic_score)
        flat = _size_embeddings(self.embedder, [height, width, crop_h, crop_w, aesthetic], clip_pooled.shape[0],
                                clip_pooled)
        if is_negative_prompt and all(x == "" for x in prompt):
            clip_pooled = torch.zeros_like(clip_pooled)
            cond_g = torch.zeros_like(cond_g)
        return {"crossattn": cond_g, "vector": torch.cat([clip_pooled, flat], dim=1)}
