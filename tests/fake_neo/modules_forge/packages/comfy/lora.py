"""Neo's `modules_forge/packages/comfy/lora.py` (ComfyUI port), the parts Neo's LoRA flow calls:

- `model_lora_keys_unet(model, key_map)` (:186-199): from the KModel's `state_dict()` (so an object patch that hides
  `diffusion_model` hides every UNet key): `lora_unet_<path with _>` and `diffusion_model.<path>` for `.weight` keys,
  the key itself otherwise. (Neo also maps diffusers names from `diffusion_model.config`: not modelled.)
- `model_lora_keys_clip`: none (the fake text encoder takes no LoRA).
- `load_lora(lora, to_load)` (:42-110): {model key: adapter} for every name an adapter loads, plus the file's keys
  nothing used (`remaining_dict`); `.alpha` keys are consumed."""

from __future__ import annotations

from modules_forge.packages.comfy import weight_adapter


def model_lora_keys_unet(model, key_map={}):  # type: ignore[no-untyped-def]  # noqa: B006
    for k in model.state_dict():
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                path = k[len("diffusion_model."):-len(".weight")]
                key_map[f"lora_unet_{path.replace('.', '_')}"] = k
                key_map[k[:-len(".weight")]] = k
            else:
                key_map[k] = k
    return key_map


def model_lora_keys_clip(model, key_map={}):  # type: ignore[no-untyped-def]  # noqa: B006
    return key_map


def load_lora(lora, to_load):  # type: ignore[no-untyped-def]
    patch_dict, loaded_keys = {}, set()
    for x in to_load:
        alpha_name = f"{x}.alpha"
        alpha = None
        if alpha_name in lora:
            alpha = lora[alpha_name].item()
            loaded_keys.add(alpha_name)
        for adapter_cls in weight_adapter.adapters:
            adapter = adapter_cls.load(x, lora, alpha, None, loaded_keys)
            if adapter is not None:
                patch_dict[to_load[x]] = adapter
                loaded_keys.update(adapter.loaded_keys)
                break
    return patch_dict, {k: v for k, v in lora.items() if k not in loaded_keys}
