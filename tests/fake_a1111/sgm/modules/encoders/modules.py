"""Stand-in for sgm's `GeneralConditioner` of SDXL base (CLIP-L + CLIP-G, original size, crop, target size) and
refiner (CLIP-G, original size, crop, aesthetic score). Output: {"crossattn": (B, 77k, 2048|1280),
"vector": (B, 2816|2560)}: pooled CLIP-G (1280) then 256-wide Fourier embeddings of each size value, like sgm."""

from __future__ import annotations

import fake_clip
import torch
from torch import nn

from sdtrt.models.torch_unet import timestep_embedding


class _Embedder(nn.Module):
    def __init__(self, input_key: str, dim: int = 0):
        super().__init__()
        self.input_key = input_key
        self.dim = dim
        self.ucg_rate = 0.0
        if dim:  # a text encoder: one named layer for LoRA name mapping
            self.transformer = nn.Module()
            self.transformer.text_model = nn.Module()
            self.transformer.text_model.encoder = nn.Module()
            layer = nn.Module()
            layer.self_attn = nn.Module()
            layer.self_attn.q_proj = nn.Linear(8, 8)
            self.transformer.text_model.encoder.layers = nn.ModuleList([layer])


class GeneralConditioner(nn.Module):
    def __init__(self, refiner: bool):
        super().__init__()
        self.refiner = refiner
        if refiner:
            keys = [("txt", 1280), ("original_size_as_tuple", 0), ("crop_coords_top_left", 0), ("aesthetic_score", 0)]
        else:
            keys = [("txt", 768), ("txt", 1280), ("original_size_as_tuple", 0), ("crop_coords_top_left", 0),
                    ("target_size_as_tuple", 0)]
        self.embedders = nn.ModuleList([_Embedder(k, d) for k, d in keys])

    def forward(self, batch: dict, force_zero_embeddings: list[str] | None = None) -> dict[str, torch.Tensor]:
        force_zero_embeddings = force_zero_embeddings or []
        crossattn, vector = [], []
        for emb in self.embedders:
            if emb.input_key == "txt":
                z, pooled = fake_clip.encode(list(batch["txt"]), emb.dim, f"clip-{emb.dim}")
                if "txt" in force_zero_embeddings:
                    z, pooled = torch.zeros_like(z), torch.zeros_like(pooled)
                crossattn.append(z)
                if emb.dim == 1280:
                    vector.append(pooled)
            else:
                v = batch[emb.input_key].float()
                b, n = v.shape
                vector.append(timestep_embedding(v.reshape(-1), 256).reshape(b, n * 256))
        return {"crossattn": torch.cat(crossattn, 2), "vector": torch.cat(vector, 1)}
