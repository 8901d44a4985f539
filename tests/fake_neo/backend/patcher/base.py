"""Fake `backend/patcher/base.py` ModelPatcher with Neo's semantics (N @f95f632, "a port of ComfyUI v0.27.1
`comfy/model_patcher.py`", :169-851), in its own words. What it keeps, and what the fake follows exactly:

- state (:169-199): `patches` {weight key: [(strength_patch, adapter, strength_model, offset, function,
  online_mode), ...]}, `patches_uuid` (a new uuid4 whenever patches change), `backup` {key: (weight,
  inplace_update)}, `object_patches`, `object_patches_backup`, `model_options`, `parent`; on the MODEL (shared by
  every clone): `model_loaded_weight_memory`, `current_weight_patches_uuid`, `model_lowvram`,
  `lowvram_patch_counter`, `device` (`current_device` is a property reading it);
- `clone()` (:221-241): patches copied per key, the SAME `patches_uuid`, `object_patches` copied, `model_options`
  through `utils.deepcopy_`, `parent = self`, and `backup` / `backup_buffers` / `object_patches_backup` / `pinned`
  SHARED by reference with the original;
- `add_patches(patches, strength_patch, strength_model, *, filename, online_mode)` (:414-435): keeps the keys that
  are in `self.model.state_dict()` (an object patch hiding a module hides its keys), appends the 6-tuple to
  `patches[key]`, a new `patches_uuid`, returns the kept keys as a list. The filename is NOT stored;
- `add_object_patch(name, obj)` (:342) only records; `get_model_object` (:353-363);
- `patch_weight_to_device(key, device_to)` (:467-493): the weight resolved THROUGH the model's attributes
  (`get_key_weight`, so through an object patch that passes attribute lookups on), backed up once into `backup`,
  merged by `merge_lora_to_weight(patches[key], copy in lora_compute_dtype, key)` and set as a new Parameter;
- `load(device_to, lowvram_model_memory, force_patch_weights, full_load)` (:512-676): walks
  `self.model.named_modules()` (modules with their own parameters), and for each module not yet flagged
  `forge_patched_weights`: `patch_weight_to_device` for each of its parameters, then the flag; `m.to(device_to)`;
  a full load then moves the whole model and counts `model_size()`; finally records `model.device`,
  `model_loaded_weight_memory` and `current_weight_patches_uuid = self.patches_uuid`;
- `patch_model(device_to, lowvram_model_memory, load_weights, force_patch_weights)` (:678-691): every object patch
  set with `utils.set_attr_raw`, whose return value (the previous attribute) goes to `object_patches_backup` unless
  that key already has one; then `load()` when `load_weights`;
- `unpatch_model(device_to=None, unpatch_weights=True)` (:693-730): with `unpatch_weights`: every backed-up weight
  put back, `current_weight_patches_uuid = None`, `backup` cleared, the model moved to `device_to` when given,
  `model_loaded_weight_memory = 0`, the `forge_patched_weights` flags deleted; THEN (always) every
  `object_patches_backup` entry set back and that (shared) dict cleared in place;
- `partially_load(device_to, extra_memory, force_patch_weights)` (:810-834): unpatch weights only when the model
  holds weights of another uuid (`current_weight_patches_uuid` not None and != this patcher's); `unpatch_model(
  offload_device, unpatch_weights=<that>)`; `patch_model(load_weights=False)`; RETURNS EARLY, touching no weight,
  when the model is not in low-VRAM mode and `model_loaded_weight_memory > 0` (the model "looks loaded"); else
  `load(...)` (detach on failure);
- `detach(unpatch_all=True)` (:836-840): `model_patches_to(offload_device)`, and with `unpatch_all`
  `unpatch_model(offload_device, True)`; `__del__` (:848-851) detaches with `unpatch_all=False` (no restore);
- no `lora_patches`, `lora_loader`, `refresh_loras`, `forge_patch_model`, `forge_unpatch_model`.
Not modelled: low-VRAM partial loads and `LowVramPatch` weight functions, online LoRA (raises), weight wrappers,
pinned memory, hooks, quantised weights (`set_func`/`convert_func` are looked up as Neo does but the fake's modules
have none)."""

from __future__ import annotations

import collections
import uuid

from backend import memory_management, utils
from backend.patcher.lora import merge_lora_to_weight

Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])


def get_key_weight(model, key):  # type: ignore[no-untyped-def]
    set_func = convert_func = None
    op_keys = key.rsplit(".", 1)
    if len(op_keys) < 2:
        return utils.get_attr(model, key), None, None
    op = utils.get_attr(model, op_keys[0])
    set_func = getattr(op, f"set_{op_keys[1]}", None)
    convert_func = getattr(op, f"convert_{op_keys[1]}", None)
    weight = getattr(op, op_keys[1])
    return weight, set_func, convert_func


def key_param_name_to_key(key, param):  # type: ignore[no-untyped-def]
    return param if len(key) == 0 else f"{key}.{param}"


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, *, current_device=None,  # type: ignore[no-untyped-def]
                 weight_inplace_update=False):
        self.size = size
        self.model = model
        self.model.device = current_device
        self.patches: dict = {}
        self.backup: dict = {}
        self.backup_buffers: dict = {}
        self.object_patches: dict = {}
        self.object_patches_backup: dict = {}
        self.weight_wrapper_patches: dict = {}
        self.model_options: dict = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.force_cast_weights = False
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        self.pinned: set = set()
        for name, default in (("model_loaded_weight_memory", 0), ("lowvram_patch_counter", 0),
                              ("model_lowvram", False), ("current_weight_patches_uuid", None),
                              ("model_offload_buffer_memory", 0)):
            if not hasattr(self.model, name):
                setattr(self.model, name, default)

    def has_online_lora(self):  # type: ignore[no-untyped-def]
        return any(any(patch[-1] for patch in patches) for patches in self.patches.values())

    def use_online_lora(self, key):  # type: ignore[no-untyped-def]
        return any(patch[-1] for patch in self.patches.get(key, ()))

    def model_size(self):  # type: ignore[no-untyped-def]
        if self.size > 0:
            return self.size
        self.size = memory_management.module_size(self.model)
        return self.size

    def loaded_size(self):  # type: ignore[no-untyped-def]
        return self.model.model_loaded_weight_memory

    def lowvram_patch_counter(self):  # type: ignore[no-untyped-def]
        return self.model.lowvram_patch_counter

    def clone(self):  # type: ignore[no-untyped-def]
        n = self.__class__(self.model, self.load_device, self.offload_device, self.model_size(),
                           current_device=self.current_device, weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.weight_wrapper_patches = self.weight_wrapper_patches.copy()
        n.model_options = utils.deepcopy_(self.model_options)
        n.parent = self
        n.force_cast_weights = self.force_cast_weights
        n.backup = self.backup
        n.backup_buffers = self.backup_buffers
        n.object_patches_backup = self.object_patches_backup
        n.pinned = self.pinned
        return n

    def is_clone(self, other):  # type: ignore[no-untyped-def]
        return self.model is getattr(other, "model", None)

    def clone_has_same_weights(self, clone):  # type: ignore[no-untyped-def]
        if not self.is_clone(clone):
            return False
        if len(self.patches) == 0 and len(clone.patches) == 0:
            return True
        return self.patches_uuid == clone.patches_uuid and len(self.patches) == len(clone.patches)

    def memory_required(self, input_shape):  # type: ignore[no-untyped-def]
        return self.model.memory_required(input_shape=input_shape)

    # ---- model options ------------------------------------------------------------------------------------
    def disable_model_cfg1_optimization(self):  # type: ignore[no-untyped-def]
        self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_cfg_function(self, sampler_cfg_function, disable_cfg1_optimization=False):  # type: ignore[no-untyped-def]
        self.model_options["sampler_cfg_function"] = sampler_cfg_function
        if disable_cfg1_optimization:
            self.disable_model_cfg1_optimization()

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):  # type: ignore[no-untyped-def]
        self.model_options["sampler_post_cfg_function"] = \
            self.model_options.get("sampler_post_cfg_function", []) + [post_cfg_function]
        if disable_cfg1_optimization:
            self.disable_model_cfg1_optimization()

    def set_model_unet_function_wrapper(self, unet_wrapper_function):  # type: ignore[no-untyped-def]
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def set_model_patch(self, patch, name):  # type: ignore[no-untyped-def]
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):  # type: ignore[no-untyped-def]
        to = self.model_options["transformer_options"].copy()
        replace = {k: dict(v) for k, v in to.get("patches_replace", {}).items()}
        block = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        replace.setdefault(name, {})[block] = patch
        to["patches_replace"] = replace
        self.model_options["transformer_options"] = to

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
        to = self.model_options["transformer_options"]
        for patch_list in to.get("patches", {}).values():
            for i, patch in enumerate(patch_list):
                if hasattr(patch, "to"):
                    patch_list[i] = patch.to(device)
        for patch_dict in to.get("patches_replace", {}).values():
            for k, patch in patch_dict.items():
                if hasattr(patch, "to"):
                    patch_dict[k] = patch.to(device)
        wrapper = self.model_options.get("model_function_wrapper")
        if hasattr(wrapper, "to"):
            self.model_options["model_function_wrapper"] = wrapper.to(device)

    def model_patches_models(self):  # type: ignore[no-untyped-def]
        to = self.model_options["transformer_options"]
        found: list = []
        for patch_list in to.get("patches", {}).values():
            found += [m for p in patch_list if hasattr(p, "models") for m in p.models()]
        for patch_dict in to.get("patches_replace", {}).values():
            found += [m for p in patch_dict.values() if hasattr(p, "models") for m in p.models()]
        wrapper = self.model_options.get("model_function_wrapper")
        if hasattr(wrapper, "models"):
            found += wrapper.models()
        return found

    def model_dtype(self):  # type: ignore[no-untyped-def]
        return self.model.get_dtype() if hasattr(self.model, "get_dtype") else None

    # ---- LoRA patches -------------------------------------------------------------------------------------
    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0, *, filename=None, online_mode=None):  # type: ignore[no-untyped-def]
        kept = set()
        model_sd = self.model.state_dict()
        for k in patches:
            if isinstance(k, str):
                key, offset, function = k, None, None
            else:
                key, offset, function = k[0], k[1], (k[2] if len(k) > 2 else None)
            if key in model_sd:
                kept.add(k)
                current = self.patches.get(key, [])
                current.append((strength_patch, patches[k], strength_model, offset, function, online_mode))
                self.patches[key] = current
        self.patches_uuid = uuid.uuid4()
        return list(kept)

    def model_state_dict(self, filter_prefix=None):  # type: ignore[no-untyped-def]
        sd = self.model.state_dict()
        return sd if filter_prefix is None else {k: v for k, v in sd.items() if k.startswith(filter_prefix)}

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False,  # type: ignore[no-untyped-def]
                               force_cast=False):
        weight, set_func, convert_func = get_key_weight(self.model, key)
        if key not in self.patches and not force_cast:
            return weight
        inplace_update = self.weight_inplace_update or inplace_update
        if key not in self.backup and not return_weight:
            self.backup[key] = Backup(weight.to(device=self.offload_device, copy=inplace_update), inplace_update)
        temp_dtype = memory_management.lora_compute_dtype(device_to) if key in self.patches else None
        if device_to is not None:
            temp_weight = memory_management.cast_to_device(weight, device_to, temp_dtype, copy=True)
        else:
            temp_weight = weight.to(temp_dtype, copy=True)
        if convert_func is not None:
            temp_weight = convert_func(temp_weight, inplace=True)
        out_weight = merge_lora_to_weight(self.patches[key], temp_weight, key) if key in self.patches \
            else temp_weight
        if set_func is not None:
            return set_func(out_weight, inplace_update=inplace_update, return_weight=return_weight)
        out_weight = out_weight.to(weight.dtype)  # (Neo: stochastic rounding to the weight's dtype)
        if return_weight:
            return out_weight
        if inplace_update:
            utils.copy_to_param(self.model, key, out_weight)
        else:
            utils.set_attr(self.model, key, out_weight)
        return None

    def unpin_all_weights(self):  # type: ignore[no-untyped-def]
        self.pinned.clear()

    # ---- loading ------------------------------------------------------------------------------------------
    def _load_list(self):  # type: ignore[no-untyped-def]
        loading = []
        for n, m in self.model.named_modules():
            params = dict(m.named_parameters(recurse=False))
            default = any(name not in params for name, _ in m.named_parameters(recurse=True))
            if not default and (hasattr(m, "parameters_manual_cast") or len(params) > 0):
                size = memory_management.module_size(m)
                loading.append((size, size, n, m, params))
        return loading

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):  # type: ignore[no-untyped-def]
        if self.has_online_lora():
            raise NotImplementedError("the fake Neo has no online LoRA (LowVramPatch weight functions)")
        mem_counter = 0
        loading = sorted(self._load_list(), key=lambda x: (x[0], x[2]), reverse=True)
        load_completely = []
        for module_offload_mem, module_mem, n, m, params in loading:
            # (the CPU: never low-VRAM; every module loads completely)
            mem_counter += module_mem
            load_completely.append((module_mem, n, m, params))
        for _, n, m, params in load_completely:
            if getattr(m, "forge_patched_weights", False):
                continue
            for param in params:
                self.patch_weight_to_device(key_param_name_to_key(n, param), device_to=device_to)
            m.forge_patched_weights = True
        for _, _, m, _ in load_completely:
            m.to(device_to)
        self.model.model_lowvram = False
        if full_load:
            self.model.to(device_to)
            mem_counter = self.model_size()
        self.model.device = device_to
        self.model.model_loaded_weight_memory = mem_counter
        self.model.model_offload_buffer_memory = 0
        self.model.current_weight_patches_uuid = self.patches_uuid

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):  # type: ignore[no-untyped-def]
        for k in self.object_patches:
            old = utils.set_attr_raw(self.model, k, self.object_patches[k])
            if k not in self.object_patches_backup:
                self.object_patches_backup[k] = old
        if load_weights:
            self.load(device_to, lowvram_model_memory=lowvram_model_memory, force_patch_weights=force_patch_weights,
                      full_load=lowvram_model_memory == 0)
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):  # type: ignore[no-untyped-def]
        if unpatch_weights:
            self.unpin_all_weights()
            self.model.model_lowvram = False
            self.model.lowvram_patch_counter = 0
            for k in list(self.backup.keys()):
                bk = self.backup[k]
                if bk.inplace_update:
                    utils.copy_to_param(self.model, k, bk.weight)
                else:
                    utils.set_attr(self.model, k, bk.weight)
            self.model.current_weight_patches_uuid = None
            self.backup.clear()
            if device_to is not None:
                self.model.to(device_to)
                self.model.device = device_to
            self.model.model_loaded_weight_memory = 0
            self.model.model_offload_buffer_memory = 0
            for m in self.model.modules():
                if hasattr(m, "forge_patched_weights"):
                    del m.forge_patched_weights
        for k in list(self.object_patches_backup.keys()):
            utils.set_attr_raw(self.model, k, self.object_patches_backup[k])
        self.object_patches_backup.clear()

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):  # type: ignore[no-untyped-def]
        return 0  # (low-VRAM partial unloading is not modelled: nothing is freed, the caller detaches)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):  # type: ignore[no-untyped-def]
        unpatch_weights = self.model.current_weight_patches_uuid is not None and \
            (self.model.current_weight_patches_uuid != self.patches_uuid or force_patch_weights)
        used = self.model.model_loaded_weight_memory
        self.unpatch_model(self.offload_device, unpatch_weights=unpatch_weights)
        if unpatch_weights:
            extra_memory += used - self.model.model_loaded_weight_memory
        self.patch_model(load_weights=False)
        if not self.model.model_lowvram and self.model.model_loaded_weight_memory > 0:
            return 0
        full_load = self.model.model_loaded_weight_memory + extra_memory > self.model_size()
        current_used = self.model.model_loaded_weight_memory
        try:
            self.load(device_to, lowvram_model_memory=current_used + extra_memory,
                      force_patch_weights=force_patch_weights, full_load=full_load)
        except Exception:
            self.detach()
            raise
        return self.model.model_loaded_weight_memory - current_used

    def detach(self, unpatch_all=True):  # type: ignore[no-untyped-def]
        self.model_patches_to(self.offload_device)
        if unpatch_all:
            self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
        return self.model

    def current_loaded_device(self):  # type: ignore[no-untyped-def]
        return self.model.device

    @property
    def current_device(self):  # type: ignore[no-untyped-def]
        return self.model.device

    def __del__(self):  # type: ignore[no-untyped-def]
        try:
            self.unpin_all_weights()
            self.detach(unpatch_all=False)
        except Exception:  # noqa: BLE001, S110  (interpreter shutdown)
            pass
