"""Fake `backend/diffusion_engine/sd15.py` StableDiffusion (SD1.x): a UnetPatcher over a KModel over the UNet, a CLIP
patcher over the text encoder, a VAE; conditioning from the fake A1111's deterministic text encoder (`fake_clip`,
768 wide, 77 rows per chunk of 75 words), images from its deterministic VAE."""

from __future__ import annotations

import math

import a1111_fakes
import torch

from backend import memory_management
from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from backend.patcher.vae import VAE


class TextEncoder(torch.nn.Module):
    """Stands in for CLIP ViT-L (no weights: `fake_clip` maps words to fixed vectors)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.dim = dim

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return a1111_fakes.module("fake_clip").encode(list(prompts), self.dim, "clip-l")[0]


class StableDiffusion(ForgeDiffusionEngine):
    def __init__(self, estimated_config, huggingface_components):  # type: ignore[no-untyped-def]
        super().__init__(estimated_config, huggingface_components)
        clip = CLIP(huggingface_components["text_encoder"])
        vae = VAE(model=huggingface_components.get("vae"))
        unet = UnetPatcher.from_model(model=huggingface_components["unet"],
                                      diffusers_scheduler=huggingface_components["scheduler"], config=estimated_config)
        self.forge_objects = ForgeObjects(unet=unet, clip=clip, vae=vae, clipvision=None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.is_sd1 = True

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):  # type: ignore[no-untyped-def]
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        return self.forge_objects.clip.cond_stage_model(list(prompt))

    def get_prompt_lengths_on_ui(self, prompt):  # type: ignore[no-untyped-def]
        tokens = len(a1111_fakes.module("fake_clip").tokenize(prompt))
        return tokens, max(1, math.ceil(tokens / 75)) * 75

    @torch.inference_mode()
    def encode_first_stage(self, x):  # type: ignore[no-untyped-def]
        return self.forge_objects.vae.encode(x).to(x)

    @torch.inference_mode()
    def decode_first_stage(self, x):  # type: ignore[no-untyped-def]
        return self.forge_objects.vae.decode(x).to(x)
