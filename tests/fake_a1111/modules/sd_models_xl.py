"""A1111's SDXL glue: adds `get_learned_conditioning` (SdConditioning width/height -> size embeddings; empty
negative prompts zeroed), `apply_model` (inpaint concat, then `self.model(x, t, cond)`) and
`get_first_stage_encoding` to `DiffusionEngine`."""

from __future__ import annotations

import sgm.models.diffusion
import torch

from modules import devices, shared


def get_learned_conditioning(self, batch):  # type: ignore[no-untyped-def]
    for embedder in self.conditioner.embedders:
        embedder.ucg_rate = 0.0
    width = getattr(batch, "width", 1024) or 1024
    height = getattr(batch, "height", 1024) or 1024
    is_negative_prompt = getattr(batch, "is_negative_prompt", False)
    aesthetic_score = (shared.opts.sdxl_refiner_low_aesthetic_score if is_negative_prompt
                       else shared.opts.sdxl_refiner_high_aesthetic_score)
    devices_args = {"device": devices.device, "dtype": devices.dtype}
    sdxl_conds = {
        "txt": batch,
        "original_size_as_tuple": torch.tensor([height, width], **devices_args).repeat(len(batch), 1),
        "crop_coords_top_left": torch.tensor([shared.opts.sdxl_crop_top, shared.opts.sdxl_crop_left],
                                             **devices_args).repeat(len(batch), 1),
        "target_size_as_tuple": torch.tensor([height, width], **devices_args).repeat(len(batch), 1),
        "aesthetic_score": torch.tensor([aesthetic_score], **devices_args).repeat(len(batch), 1),
    }
    force_zero_negative_prompt = is_negative_prompt and all(x == "" for x in batch)
    return self.conditioner(sdxl_conds, force_zero_embeddings=["txt"] if force_zero_negative_prompt else [])


def apply_model(self, x, t, cond):  # type: ignore[no-untyped-def]
    if self.model.diffusion_model.in_channels == 9:
        x = torch.cat([x] + cond["c_concat"], dim=1)
    return self.model(x, t, cond)


def get_first_stage_encoding(self, x):  # type: ignore[no-untyped-def]
    return x


sgm.models.diffusion.DiffusionEngine.get_learned_conditioning = get_learned_conditioning
sgm.models.diffusion.DiffusionEngine.apply_model = apply_model
sgm.models.diffusion.DiffusionEngine.get_first_stage_encoding = get_first_stage_encoding


def extend_sdxl(model):  # type: ignore[no-untyped-def]
    """Sets the attributes A1111 gives SDXL models (the UNet's `dtype` is already the real param dtype)."""
    model.model.conditioning_key = "crossattn"
    model.cond_stage_key = "txt"
