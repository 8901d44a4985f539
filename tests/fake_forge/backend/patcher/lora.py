"""Fake `backend/patcher/lora.py`, for plain LoRA (`lora_up`/`lora_down`/`alpha`) files:

- `model_lora_keys_unet(kmodel)`: file names -> model keys, from the KModel's `state_dict()` (so an object patch that
  hides `diffusion_model` hides every UNet key): `lora_unet_<path with _>` and the model key itself;
- `load_lora(lora, to_load)`: (patches by model key `("lora", (up, down, alpha, mid, dora_scale))`, unmatched keys);
- `merge_lora_to_weight(patches, weight, key)`: each patch `[strength_patch, patch, strength_model, offset,
  function]` in order: the weight times strength_model, plus strength_patch * alpha/rank * up @ down, computed in
  float32 and returned in the weight's dtype;
- `LoraLoader(model).refresh(lora_patches)`: nothing when the patches' identities are those merged last; else the
  backed-up weights go back first, then every patched key is resolved through the model (`get_attr_with_parent`,
  so through an object patch that passes attribute lookups on), backed up once and replaced by the merged weight
  (a ValueError "Wrong LoRA Key" when it does not resolve to a Parameter). Online (fp8/nf4) LoRA is not modelled."""

from __future__ import annotations

import torch

from backend import utils

CPU = torch.device("cpu")


def model_lora_keys_unet(model, key_map=None):  # type: ignore[no-untyped-def]
    key_map = {} if key_map is None else key_map
    for k in model.state_dict():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            path = k[len("diffusion_model."):-len(".weight")]
            key_map[f"lora_unet_{path.replace('.', '_')}"] = k
            key_map[k[:-len(".weight")]] = k
    return key_map


def model_lora_keys_clip(model, key_map=None):  # type: ignore[no-untyped-def]
    return {} if key_map is None else key_map  # the fake text encoder takes no LoRA


def load_lora(lora, to_load):  # type: ignore[no-untyped-def]
    patches, used = {}, set()
    for name, target in to_load.items():
        up, down, alpha = f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"
        if up not in lora or down not in lora:
            continue
        a = lora[alpha].item() if alpha in lora else None
        patches[target] = ("lora", (lora[up], lora[down], a, None, None))
        used.update(k for k in (up, down, alpha) if k in lora)
    return patches, {k: v for k, v in lora.items() if k not in used}


def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):  # type: ignore[no-untyped-def]
    dtype = weight.dtype
    weight = weight.to(dtype=computation_dtype, copy=True)
    for strength_patch, patch, strength_model, offset, function in patches:
        if offset is not None or function is not None:
            raise NotImplementedError(f"the fake Forge merges whole-weight patches only ({key})")
        if strength_model != 1.0:
            weight = weight * strength_model
        kind, v = patch
        if kind != "lora":
            raise NotImplementedError(f"the fake Forge merges plain LoRA only, not {kind!r} ({key})")
        up, down, alpha = v[0], v[1], v[2]
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        diff = (up.flatten(1).to(computation_dtype) @ down.flatten(1).to(computation_dtype)).reshape(weight.shape)
        weight = weight + (strength_patch * scale) * diff
    return weight.to(dtype)


class LoraLoader:
    def __init__(self, model):  # type: ignore[no-untyped-def]
        self.model = model
        self.backup: dict = {}
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=CPU, force_refresh=False):  # type: ignore[no-untyped-def]
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        merged: dict = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current in patches.items():
                merged[(key, online_mode)] = merged.get((key, online_mode), []) + current
        for key, weight in self.backup.items():
            utils.set_attr_raw(self.model, key, utils.tensor2parameter(weight))
        self.backup = {}
        for (key, online_mode), current in merged.items():
            if online_mode:
                raise NotImplementedError("the fake Forge has no online LoRA")
            try:
                _, _, weight = utils.get_attr_with_parent(self.model, key)
                assert isinstance(weight, torch.nn.Parameter)
            except (AttributeError, AssertionError):
                raise ValueError(f"Wrong LoRA Key: {key}") from None
            self.backup.setdefault(key, weight.to(device=offload_device))
            utils.set_attr_raw(self.model, key, torch.nn.Parameter(merge_lora_to_weight(current, weight, key),
                                                                   requires_grad=False))
        self.loaded_hash = hashes
