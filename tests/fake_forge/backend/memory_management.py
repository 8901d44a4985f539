"""Fake `backend/memory_management.py`: the loaded-model list and `load_models_gpu` with Forge's semantics, on the
CPU (as Forge with `--always-cpu`: `vram_state` DISABLED, every patcher's load device the CPU).

- `LoadedModel(patcher)` equals another when it holds the same patcher object (not a clone of it);
- `load_models_gpu(models)`: models already loaded move to the front and are NOT loaded again; for each new one,
  first `unload_model_clones` (every loaded clone of the same model is unloaded without moving it:
  `forge_unpatch_model()`, which puts its object patches' originals back), then `model_load`;
- `LoadedModel.model_load`: `model_patches_to`, then `forge_patch_model(load_device)` (object patches set FIRST,
  then `.to(device)` of the patched model), then `refresh_loras()` (merging the patcher's LoRA patches into the
  weights, resolved through the patched model) - outside the try that unpatches on failure, as in Forge;
- `model_unload(avoid_model_moving)`: `forge_unpatch_model()` (or to the offload device);
- `unload_all_models()`: every loaded model unloaded (processing calls it when the loading parameters changed).
Memory estimates, async/swap loading and low-VRAM module profiles are not modelled (the CPU never runs short)."""

from __future__ import annotations

from enum import Enum

import torch

cpu = torch.device("cpu")


class VRAMState(Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


class CPUState(Enum):
    GPU = 0
    CPU = 1
    MPS = 2


cpu_state = CPUState.CPU
vram_state = VRAMState.DISABLED  # "Set vram state to: DISABLED" (--always-cpu)
set_vram_to = VRAMState.NORMAL_VRAM
signal_empty_cache = False
current_inference_memory = 1024 * 1024 * 1024


def get_torch_device():  # type: ignore[no-untyped-def]
    return cpu


def is_device_cpu(device):  # type: ignore[no-untyped-def]
    return torch.device(device).type == "cpu"


def unet_offload_device():  # type: ignore[no-untyped-def]
    return cpu


def unet_inital_load_device(parameters=0, dtype=torch.float32):  # type: ignore[no-untyped-def]
    return cpu


def text_encoder_device():  # type: ignore[no-untyped-def]
    return cpu


def vae_device():  # type: ignore[no-untyped-def]
    return cpu


def dtype_size(dtype):  # type: ignore[no-untyped-def]
    return torch.empty((), dtype=dtype).element_size()


def module_size(module, exclude_device=None, include_device=None):  # type: ignore[no-untyped-def]
    size = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if exclude_device is not None and t.device == exclude_device:
            continue
        if include_device is not None and t.device != include_device:
            continue
        size += t.nelement() * t.element_size()
    return size


def get_free_memory(dev=None, torch_free_too=False):  # type: ignore[no-untyped-def]
    free = 1 << 40  # the fake's CPU never runs short
    return (free, free) if torch_free_too else free


def soft_empty_cache(force=False):  # type: ignore[no-untyped-def]
    global signal_empty_cache
    signal_empty_cache = False


def minimum_inference_memory():  # type: ignore[no-untyped-def]
    return current_inference_memory


class LoadedModel:
    def __init__(self, model):  # type: ignore[no-untyped-def]
        self.model = model
        self.model_accelerated = False
        self.device = model.load_device
        self.real_model = None

    def model_load(self, model_gpu_memory_when_using_cpu_swap=-1):  # type: ignore[no-untyped-def]
        patch_model_to = self.device if model_gpu_memory_when_using_cpu_swap < 0 else None
        self.model.model_patches_to(self.device)
        self.model.model_patches_to(self.model.model_dtype())
        try:
            self.real_model = self.model.forge_patch_model(patch_model_to)
            self.model.current_device = self.model.load_device
        except Exception:
            self.model.forge_unpatch_model(self.model.offload_device)
            self.model_unload()
            raise
        self.model.refresh_loras()
        return self.real_model

    def model_unload(self, avoid_model_moving=False):  # type: ignore[no-untyped-def]
        if avoid_model_moving:
            self.model.forge_unpatch_model()
        else:
            self.model.forge_unpatch_model(self.model.offload_device)
            self.model.model_patches_to(self.model.offload_device)

    def __eq__(self, other):  # type: ignore[no-untyped-def]
        return self.model is other.model

    __hash__ = None  # type: ignore[assignment]


current_loaded_models: list[LoadedModel] = []


def unload_model_clones(model):  # type: ignore[no-untyped-def]
    clones = [i for i, loaded in enumerate(current_loaded_models) if model.is_clone(loaded.model)]
    for i in reversed(clones):
        current_loaded_models.pop(i).model_unload(avoid_model_moving=True)


def free_memory(memory_required, device, keep_loaded=(), free_all=False):  # type: ignore[no-untyped-def]
    """Only `free_all` does anything in the fake (the CPU never runs short)."""
    if not free_all:
        return
    for i in range(len(current_loaded_models) - 1, -1, -1):
        loaded = current_loaded_models[i]
        if loaded.device == device and loaded not in keep_loaded:
            current_loaded_models.pop(i).model_unload()
    soft_empty_cache()


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):  # type: ignore[no-untyped-def]
    to_load = []
    for model in models:
        loaded = LoadedModel(model)
        if loaded in current_loaded_models:
            current_loaded_models.insert(0, current_loaded_models.pop(current_loaded_models.index(loaded)))
        else:
            to_load.append(loaded)
    if not to_load:
        return  # (Forge frees memory for them on non-CPU devices only)
    for loaded in to_load:
        unload_model_clones(loaded.model)
    for loaded in to_load:
        state = VRAMState.DISABLED if is_device_cpu(loaded.model.load_device) else vram_state
        swap = 0 if state == VRAMState.NO_VRAM else -1
        loaded.model_load(swap)
        current_loaded_models.insert(0, loaded)


def load_model_gpu(model):  # type: ignore[no-untyped-def]
    return load_models_gpu([model])


def unload_all_models():  # type: ignore[no-untyped-def]
    free_memory(1e30, get_torch_device(), free_all=True)


def cleanup_models():  # type: ignore[no-untyped-def]
    pass
