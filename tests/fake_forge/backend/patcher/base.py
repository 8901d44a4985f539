"""Fake `backend/patcher/base.py` ModelPatcher, with Forge's semantics (its own implementation):

- a patcher wraps a shared `model`; `clone()` shares that model and copies `lora_patches`, `object_patches`
  (shallow) and `model_options` (deep) - never `object_patches_backup`;
- `add_patches(filename=, patches=, strength_patch=, strength_model=, online_mode=)` keeps the patches whose key
  is one of the model's `named_parameters()` under `lora_patches[(filename, strength_patch, strength_model,
  online_mode)]` and returns the keys it kept; `refresh_loras()` has the model's LoraLoader merge them;
- `add_object_patch(name, obj)` only records; `forge_patch_model(device)` sets every object patch on the model
  (`set_attr_raw`, remembering the original in `object_patches_backup` once) and THEN moves the model;
  `forge_unpatch_model(device)` moves first, then puts every backed-up original back and empties the backup;
- `model_options["transformer_options"]`: `set_model_patch(patch, name)` appends to its "patches"[name],
  `set_model_patch_replace` fills "patches_replace"; `set_model_unet_function_wrapper` etc. set model_options keys."""

from __future__ import annotations

import copy

from backend import memory_management, utils
from backend.patcher.lora import LoraLoader


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, current_device=None, **kwargs):  # type: ignore[no-untyped-def]
        self.size = size
        self.model = model
        self.lora_patches: dict = {}
        self.object_patches: dict = {}
        self.object_patches_backup: dict = {}
        self.model_options: dict = {"transformer_options": {}}
        self.model_size()
        self.load_device = load_device
        self.offload_device = offload_device
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader
        self.current_device = offload_device if current_device is None else current_device

    def model_size(self):  # type: ignore[no-untyped-def]
        if self.size <= 0:
            self.size = memory_management.module_size(self.model)
        return self.size

    def clone(self):  # type: ignore[no-untyped-def]
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        self._copy_patches_to(n)
        return n

    def _copy_patches_to(self, n):  # type: ignore[no-untyped-def]
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)

    def is_clone(self, other):  # type: ignore[no-untyped-def]
        return getattr(other, "model", None) is self.model

    # ---- LoRA ---------------------------------------------------------------------------------------------
    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):  # type: ignore[no-untyped-def]
        identifier = (filename, strength_patch, strength_model, online_mode)
        parameter_names = {name for name, _ in self.model.named_parameters()}
        kept, by_key = set(), {}
        for k, patch in patches.items():
            key, offset, function = (k, None, None) if isinstance(k, str) else \
                (k[0], k[1], k[2] if len(k) > 2 else None)
            if key not in parameter_names:
                continue
            kept.add(k)
            by_key.setdefault(key, []).append([strength_patch, patch, strength_model, offset, function])
        self.lora_patches[identifier] = by_key
        return kept

    def has_online_lora(self):  # type: ignore[no-untyped-def]
        return any(online for (_, _, _, online) in self.lora_patches)

    def refresh_loras(self):  # type: ignore[no-untyped-def]
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)

    def memory_required(self, input_shape):  # type: ignore[no-untyped-def]
        return self.model.memory_required(input_shape=input_shape)

    # ---- model options ------------------------------------------------------------------------------------
    def set_model_unet_function_wrapper(self, unet_wrapper_function):  # type: ignore[no-untyped-def]
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def set_model_sampler_cfg_function(self, sampler_cfg_function, disable_cfg1_optimization=False):  # type: ignore[no-untyped-def]
        self.model_options["sampler_cfg_function"] = sampler_cfg_function
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):  # type: ignore[no-untyped-def]
        self.model_options["sampler_post_cfg_function"] = \
            self.model_options.get("sampler_post_cfg_function", []) + [post_cfg_function]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_patch(self, patch, name):  # type: ignore[no-untyped-def]
        options = self.model_options["transformer_options"]
        options.setdefault("patches", {})
        options["patches"][name] = options["patches"].get(name, []) + [patch]

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):  # type: ignore[no-untyped-def]
        options = dict(self.model_options["transformer_options"])
        replace = {k: dict(v) for k, v in options.get("patches_replace", {}).items()}
        block = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        replace.setdefault(name, {})[block] = patch
        options["patches_replace"] = replace
        self.model_options["transformer_options"] = options

    def set_model_attn1_patch(self, patch):  # type: ignore[no-untyped-def]
        self.set_model_patch(patch, "attn1_patch")

    def set_model_attn2_patch(self, patch):  # type: ignore[no-untyped-def]
        self.set_model_patch(patch, "attn2_patch")

    def set_model_input_block_patch(self, patch):  # type: ignore[no-untyped-def]
        self.set_model_patch(patch, "input_block_patch")

    def set_model_input_block_patch_after_skip(self, patch):  # type: ignore[no-untyped-def]
        self.set_model_patch(patch, "input_block_patch_after_skip")

    def set_model_output_block_patch(self, patch):  # type: ignore[no-untyped-def]
        self.set_model_patch(patch, "output_block_patch")

    # ---- object patches -----------------------------------------------------------------------------------
    def add_object_patch(self, name, obj):  # type: ignore[no-untyped-def]
        self.object_patches[name] = obj

    def get_model_object(self, name):  # type: ignore[no-untyped-def]
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        return utils.get_attr(self.model, name)

    def model_patches_to(self, device):  # type: ignore[no-untyped-def]
        options = self.model_options["transformer_options"]
        for patch_list in options.get("patches", {}).values():
            for i, patch in enumerate(patch_list):
                if hasattr(patch, "to"):
                    patch_list[i] = patch.to(device)
        for patch_dict in options.get("patches_replace", {}).values():
            for k, patch in patch_dict.items():
                if hasattr(patch, "to"):
                    patch_dict[k] = patch.to(device)
        wrapper = self.model_options.get("model_function_wrapper")
        if hasattr(wrapper, "to"):
            self.model_options["model_function_wrapper"] = wrapper.to(device)

    def model_dtype(self):  # type: ignore[no-untyped-def]
        return self.model.get_dtype() if hasattr(self.model, "get_dtype") else None

    def model_state_dict(self, filter_prefix=None):  # type: ignore[no-untyped-def]
        sd = self.model.state_dict()
        return sd if filter_prefix is None else {k: v for k, v in sd.items() if k.startswith(filter_prefix)}

    def forge_patch_model(self, target_device=None):  # type: ignore[no-untyped-def]
        for name, obj in self.object_patches.items():
            original = utils.get_attr(self.model, name)
            self.object_patches_backup.setdefault(name, original)
            utils.set_attr_raw(self.model, name, obj)
        if target_device is not None:
            self.model.to(target_device)
            self.current_device = target_device
        return self.model

    def forge_unpatch_model(self, target_device=None):  # type: ignore[no-untyped-def]
        if target_device is not None:
            self.model.to(target_device)
            self.current_device = target_device
        for name, original in list(self.object_patches_backup.items()):
            utils.set_attr_raw(self.model, name, original)
        self.object_patches_backup = {}
