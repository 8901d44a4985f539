"""Neo's `modules_forge/packages/comfy/weight_adapter/` (a ComfyUI port; `base.py` WeightAdapterBase, `lora.py`
LoRAAdapter), as far as plain LoRA goes: `LoRAAdapter.load(x, lora, alpha, dora_scale, loaded_keys)` takes
`<x>.lora_up.weight` / `<x>.lora_down.weight` (weights = [up, down, alpha, mid, dora_scale, reshape]);
`calculate_weight(weight, key, strength, strength_model, offset, function, intermediate_dtype)` adds
`function(strength * alpha/rank * up @ down)` into `weight` (in place, as Neo does) and returns it. LoCon mid
weights, DoRA, reshape and the other adapter kinds (LoHa, LoKr, OFT, GLoRA, BOFT) are not modelled."""

from __future__ import annotations

import torch


class WeightAdapterBase:
    name: str
    loaded_keys: set
    weights: list

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,  # type: ignore[no-untyped-def]
                         intermediate_dtype=torch.float32, original_weight=None):
        raise NotImplementedError


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    def __init__(self, loaded_keys, weights):  # type: ignore[no-untyped-def]
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):  # type: ignore[no-untyped-def]
        up, down = f"{x}.lora_up.weight", f"{x}.lora_down.weight"
        if up not in lora or down not in lora:
            return None
        if dora_scale is not None or f"{x}.lora_mid.weight" in lora:
            raise NotImplementedError("the fake Neo merges plain LoRA only")
        return cls({up, down}, [lora[up], lora[down], alpha, None, None, None])

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,  # type: ignore[no-untyped-def]
                         intermediate_dtype=torch.float32, original_weight=None):
        up, down, alpha = self.weights[0], self.weights[1], self.weights[2]
        mat1 = up.to(weight.device, intermediate_dtype).flatten(start_dim=1)
        mat2 = down.to(weight.device, intermediate_dtype).flatten(start_dim=1)
        scale = 1.0 if alpha is None else alpha / mat2.shape[0]
        diff = torch.mm(mat1, mat2)
        if strength * scale != 1.0:
            diff.mul_(strength * scale)
        weight += function(diff.reshape(weight.shape)).type(weight.dtype)
        return weight


adapters = [LoRAAdapter]
