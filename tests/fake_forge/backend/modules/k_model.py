"""Fake `backend/modules/k_model.py` KModel: the module Forge's UNet patcher wraps. `diffusion_model` is the UNet (a
child module, so moving the KModel moves it - unless an object patch replaced it), `predictor` the sigma<->timestep
conversions. `apply_model(x, sigma, c_concat=, c_crossattn=, control=, transformer_options=, **extra)`:
xc = predictor.calculate_input(sigma, x) (+ c_concat channels), t = predictor.timestep(sigma).float(),
out = diffusion_model(xc, t, context=c_crossattn, control=control, transformer_options=..., **extra).float(),
then predictor.calculate_denoised(sigma, out, x)."""

from __future__ import annotations

import fake_forge_trace
import torch

from backend import memory_management
from backend.modules.k_prediction import k_prediction_from_diffusers_scheduler


class KModel(fake_forge_trace.RecordsMoves, torch.nn.Module):
    def __init__(self, model, diffusers_scheduler, k_predictor=None, config=None):  # type: ignore[no-untyped-def]
        super().__init__()
        self.config = config
        self.storage_dtype = model.storage_dtype
        self.computation_dtype = model.computation_dtype
        self.diffusion_model = model
        self.predictor = k_prediction_from_diffusers_scheduler(diffusers_scheduler) if k_predictor is None \
            else k_predictor

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},  # type: ignore[no-untyped-def]  # noqa: B006
                    **kwargs):
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        dtype = self.computation_dtype
        xc = xc.to(dtype)
        t = self.predictor.timestep(t).float()
        context = c_crossattn.to(dtype)
        extra = {k: (v.to(dtype) if hasattr(v, "dtype") and v.dtype not in (torch.int, torch.long) else v)
                 for k, v in kwargs.items()}
        fake_forge_trace.record_call("apply_model", self.diffusion_model, xc, t, context, transformer_options, extra)
        out = self.diffusion_model(xc, t, context=context, control=control, transformer_options=transformer_options,
                                   **extra).float()
        return self.predictor.calculate_denoised(sigma, out, x)

    def memory_required(self, input_shape):  # type: ignore[no-untyped-def]
        area = input_shape[0] * input_shape[2] * input_shape[3]
        return 1.28 * area * memory_management.dtype_size(self.computation_dtype) * 16384
