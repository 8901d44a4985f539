"""Stand-ins for the SD1 (CLIP ViT-L, `transformer`) and SD2 (OpenCLIP ViT-H, `model`) text encoders. A1111 tells
SD2 from SD1 by `hasattr(cond_stage_model, "model")`. Each carries a small module tree with the real layer names
of its first encoder layer (for LoRA name mapping); the embeddings themselves come from `fake_clip`."""

from __future__ import annotations

import fake_clip
import torch
from torch import nn


class _Layer(nn.Module):
    def __init__(self, dim: int, names: tuple[str, str, str, str]):
        super().__init__()
        for n in names:
            self.add_module(n, nn.Linear(dim, dim))


class FrozenCLIPEmbedder(nn.Module):
    """SD1: `transformer.text_model.encoder.layers.0.self_attn.{q,k,v,out}_proj`."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.dim = dim
        self.transformer = nn.Module()
        self.transformer.text_model = nn.Module()
        self.transformer.text_model.encoder = nn.Module()
        layer = nn.Module()
        layer.self_attn = _Layer(8, ("q_proj", "k_proj", "v_proj", "out_proj"))
        self.transformer.text_model.encoder.layers = nn.ModuleList([layer])

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return fake_clip.encode(list(prompts), self.dim, "clip-l")[0]


class FrozenOpenCLIPEmbedder(nn.Module):
    """SD2: `model.transformer.resblocks.0.attn` (attribute `model` marks SD2)."""

    def __init__(self, dim: int = 1024):
        super().__init__()
        self.dim = dim
        self.model = nn.Module()
        self.model.transformer = nn.Module()
        block = nn.Module()
        block.attn = nn.MultiheadAttention(8, 2)
        self.model.transformer.resblocks = nn.ModuleList([block])

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return fake_clip.encode(list(prompts), self.dim, "open-clip-h")[0]
