"""Fake `backend/patcher/lora.py` with Neo's semantics (N @f95f632 :1-134, a port of ComfyUI v0.3.77
`calculate_weight`): `merge_lora_to_weight(patches, weight, key, computation_dtype=torch.float32)` over Neo's
6-tuples `(strength_patch, adapter, strength_model, offset, function, online_mode)`, in order: the weight (narrowed
by `offset`) times `strength_model` when that is not 1, then a `WeightAdapterBase` adds its change IN PLACE
(`calculate_weight`), a ("diff", (tensor,)) patch adds `function(strength * diff)`, a ("set", (tensor,)) patch copies;
returns the weight. `online_mode` is not read here. Re-exported from `modules_forge.packages.comfy.lora` as in Neo:
`load_lora`, `model_lora_keys_unet`, `model_lora_keys_clip`, `weight_adapter`."""

from __future__ import annotations

import torch
from modules_forge.packages.comfy import weight_adapter
from modules_forge.packages.comfy.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet  # noqa: F401


@torch.inference_mode()
def merge_lora_to_weight(patches, weight, key, computation_dtype=torch.float32):  # type: ignore[no-untyped-def]
    for p in patches:
        strength, v, strength_model, offset, function = p[0], p[1], p[2], p[3], p[4]
        if function is None:
            function = lambda a: a
        old_weight = None
        if offset is not None:
            old_weight = weight
            weight = weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(v, weight_adapter.WeightAdapterBase):
            output = v.calculate_weight(weight, key, strength, strength_model, offset, function, computation_dtype)
            if output is not None:
                weight = output
                if old_weight is not None:
                    weight = old_weight
            continue
        patch_type, v = ("diff", v) if len(v) == 1 else (v[0], v[1])
        if patch_type == "diff":
            if strength != 0.0 and v[0].shape == weight.shape:
                weight += function(strength * v[0].to(weight.device, weight.dtype))
        elif patch_type == "set":
            weight.copy_(v[0])
        else:
            raise ValueError(f'"{key}" of type "{patch_type}" is not recognized...')
        if old_weight is not None:
            weight = old_weight
    return weight
