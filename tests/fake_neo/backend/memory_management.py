"""Fake `backend/memory_management.py` with Neo's semantics (N @f95f632), on the CPU (`--cpu`: N `:128-129`
cpu_state CPU -> `:366-367` vram_state DISABLED; the fake's load device is always the CPU).

- `current_loaded_models` (:424): `LoadedModel` records, newest first.
- `LoadedModel(patcher)` (:437-510): `.model` is a PROPERTY over a weak reference to the patcher (`_set_model`,
  :445-451): it is None once nothing else holds the patcher, except that a record of a clone (a patcher with a
  `parent`) SWITCHES to the parent when the clone is garbage-collected (`_switch_parent`, a `weakref.finalize` on the
  clone, :449-456). Two records are equal when they hold the same patcher object (:501). `model_load` (:472-486):
  `model_patches_to`, then `partially_load(device, 1e32)` through `model_use_more_vram`; `real_model` a weak
  reference to the KModel with a finalizer running `cleanup_models`. `model_unload(memory_to_free, unpatch_weights)`
  (:494-505): `detach(unpatch_weights)`. `is_dead()`: the KModel alive, the patcher gone.
- `load_models_gpu(models, memory_required, force_patch_weights, minimum_memory_required, force_full_load)`
  (:616-700): `cleanup_models_gc`; the set of models plus their `model_patches_models()`; a record per model (an
  already loaded one is reused); then for EVERY record, every loaded record of a clone of it (the same KModel, itself
  included) is popped and `detach(unpatch_all=False)`ed - no restore, no move (:654-661); memory is freed on non-CPU
  devices only; each record `model_load`s (lowvram budget 0 on the CPU: a full load) and goes to the front.
- `free_memory(memory_required, device, keep_loaded)` (:567-613): unloads (detach with restore) the records on that
  device that are not kept and not dead, while the free memory is short (the fake's CPU has 1 TiB: only
  `unload_all_models`, which asks for 1e30 bytes, unloads anything).
- `unload_model(patcher)` (:1358-1370): pops the record of that patcher, nothing else. `unload_all_models()` (:1373).
- Names kept from Forge: `vram_state`, `VRAMState`, `cpu_state`, `CPUState`, `get_torch_device`, `module_size` (over
  the `state_dict()`), `soft_empty_cache`, `load_model_gpu`, `loaded_models`, `cast_to_device`, `lora_compute_dtype`
  (float32 on the CPU). Gone: `unload_model_clones`.
Not modelled: the GPU, low-VRAM partial loads, pinned memory, streams, async offload."""

from __future__ import annotations

import gc
import weakref
from enum import Enum

import torch

from backend.args import args

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


lowvram_available = True
vram_state = VRAMState.NORMAL_VRAM
set_vram_to = VRAMState.NORMAL_VRAM
cpu_state = CPUState.CPU  # (`--cpu`, or no GPU: the fake has none)
if cpu_state is not CPUState.GPU:
    vram_state = VRAMState.DISABLED
DISABLE_SMART_MEMORY = args.disable_smart_memory
NUM_STREAMS = 0
signal_empty_cache = False
LORA_COMPUTE_DTYPES: dict = {}
OOM_EXCEPTION = torch.cuda.OutOfMemoryError if hasattr(torch.cuda, "OutOfMemoryError") else RuntimeError


def get_torch_device():  # type: ignore[no-untyped-def]
    return cpu


def is_device_cpu(device):  # type: ignore[no-untyped-def]
    return device is not None and torch.device(device).type == "cpu"


def is_device_cuda(device):  # type: ignore[no-untyped-def]
    return device is not None and torch.device(device).type == "cuda"


def is_device_xpu(device):  # type: ignore[no-untyped-def]
    return False


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


def module_size(module):  # type: ignore[no-untyped-def]
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def get_free_memory(dev=None, torch_free_too=False):  # type: ignore[no-untyped-def]
    free = 1 << 40  # the fake's CPU never runs short
    return (free, free) if torch_free_too else free


def soft_empty_cache(force=False):  # type: ignore[no-untyped-def]
    global signal_empty_cache
    signal_empty_cache = False


def minimum_inference_memory():  # type: ignore[no-untyped-def]
    return 1024 * 1024 * 1024 * 0.8 + 400 * 1024 * 1024


def cast_to_device(tensor, device, dtype, copy=False):  # type: ignore[no-untyped-def]
    return tensor.to(device=device, dtype=dtype, copy=copy)


def lora_compute_dtype(device):  # type: ignore[no-untyped-def]
    return LORA_COMPUTE_DTYPES.setdefault(device, torch.float32)  # (float16 only where a GPU prefers it)


def pin_memory(tensor):  # type: ignore[no-untyped-def]
    return False


def unpin_memory(tensor):  # type: ignore[no-untyped-def]
    return False


current_loaded_models: list = []


class LoadedModel:
    def __init__(self, model):  # type: ignore[no-untyped-def]
        self._patcher_finalizer = None
        self._set_model(model)
        self.device = model.load_device
        self.real_model = None
        self.currently_used = True
        self.model_finalizer = None

    def _set_model(self, model):  # type: ignore[no-untyped-def]
        self._model = weakref.ref(model)
        if model.parent is not None:
            self._parent_model = weakref.ref(model.parent)
            self._patcher_finalizer = weakref.finalize(model, self._switch_parent)
            self._patcher_finalizer.atexit = False

    def _switch_parent(self):  # type: ignore[no-untyped-def]
        model = self._parent_model()
        if model is not None:
            self._set_model(model)

    @property
    def model(self):  # type: ignore[no-untyped-def]
        return self._model()

    def model_memory(self):  # type: ignore[no-untyped-def]
        return self.model.model_size()

    def model_loaded_memory(self):  # type: ignore[no-untyped-def]
        return self.model.loaded_size()

    def model_offloaded_memory(self):  # type: ignore[no-untyped-def]
        return self.model.model_size() - self.model.loaded_size()

    def model_memory_required(self, device):  # type: ignore[no-untyped-def]
        if device == self.model.current_loaded_device():
            return self.model_offloaded_memory()
        return self.model_memory()

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):  # type: ignore[no-untyped-def]
        self.model.model_patches_to(self.device)
        self.model.model_patches_to(self.model.model_dtype())
        self.model_use_more_vram(lowvram_model_memory or 1e32, force_patch_weights=force_patch_weights)
        real_model = self.model.model
        self.real_model = weakref.ref(real_model)
        self.model_finalizer = weakref.finalize(real_model, cleanup_models)
        self.model_finalizer.atexit = False
        return real_model

    def model_unload(self, memory_to_free=None, unpatch_weights=True):  # type: ignore[no-untyped-def]
        if memory_to_free is not None and memory_to_free < self.model.loaded_size() and \
                self.model.partially_unload(self.model.offload_device, memory_to_free) >= memory_to_free:
            return False
        self.model.detach(unpatch_weights)
        self.model_finalizer.detach()
        self.model_finalizer = None
        self.real_model = None
        return True

    def model_use_more_vram(self, extra_memory, force_patch_weights=False):  # type: ignore[no-untyped-def]
        return self.model.partially_load(self.device, extra_memory, force_patch_weights=force_patch_weights)

    def __eq__(self, other):  # type: ignore[no-untyped-def]
        return self.model is other.model

    __hash__ = None  # type: ignore[assignment]

    def __del__(self):  # type: ignore[no-untyped-def]
        if self._patcher_finalizer is not None:
            self._patcher_finalizer.detach()

    def is_dead(self):  # type: ignore[no-untyped-def]
        return self.real_model() is not None and self.model is None


def free_memory(memory_required, device, keep_loaded=()):  # type: ignore[no-untyped-def]
    cleanup_models_gc()
    unloaded, can_unload = [], []
    for i in range(len(current_loaded_models) - 1, -1, -1):
        shift_model = current_loaded_models[i]
        if shift_model.device == device and shift_model not in keep_loaded and not shift_model.is_dead():
            can_unload.append((-shift_model.model_offloaded_memory(), shift_model.model_memory(), i))
            shift_model.currently_used = False
    for x in sorted(can_unload):
        i = x[-1]
        memory_to_free = None
        if not DISABLE_SMART_MEMORY:
            free = get_free_memory(device)
            if free > memory_required:
                break
            memory_to_free = memory_required - free
        if current_loaded_models[i].model_unload(memory_to_free):
            unloaded.append(i)
    removed = [current_loaded_models.pop(i) for i in sorted(unloaded, reverse=True)]
    soft_empty_cache()
    return removed


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,  # type: ignore[no-untyped-def]
                    force_full_load=False):
    cleanup_models_gc(target=models)
    wanted = []
    for m in models:
        for mm in [m] + list(m.model_patches_models()):
            if all(mm is not w for w in wanted):
                wanted.append(mm)
    records = []
    for x in wanted:
        record = LoadedModel(x)
        try:
            index = current_loaded_models.index(record)
        except ValueError:
            index = None
        if index is not None:
            loaded = current_loaded_models[index]
            loaded.currently_used = True
            records.append(loaded)
        else:
            records.append(record)
    for record in records:
        to_unload = [i for i in range(len(current_loaded_models))
                     if record.model.is_clone(current_loaded_models[i].model)]
        for i in reversed(to_unload):
            popped = current_loaded_models.pop(i)
            popped.model.detach(unpatch_all=False)
            popped.model_finalizer.detach()
    # (free_memory runs for non-CPU devices only)
    for record in records:
        lowvram_model_memory = 0  # the CPU: VRAMState.DISABLED, a full load
        record.model_load(lowvram_model_memory, force_patch_weights=force_patch_weights)
        current_loaded_models.insert(0, record)


def load_model_gpu(model):  # type: ignore[no-untyped-def]
    return load_models_gpu([model])


def loaded_models(only_currently_used=False):  # type: ignore[no-untyped-def]
    return [m.model for m in current_loaded_models if not only_currently_used or m.currently_used]


def cleanup_models_gc(*, target=()):  # type: ignore[no-untyped-def]
    dead = [i for i, cur in enumerate(current_loaded_models) if cur.is_dead()]
    if not dead:
        return
    for i in reversed(dead):
        if any(m.model is current_loaded_models[i].real_model() for m in target):
            current_loaded_models.pop(i)
    gc.collect()
    soft_empty_cache()


def cleanup_models():  # type: ignore[no-untyped-def]
    for i in reversed([i for i, m in enumerate(current_loaded_models) if m.real_model() is None]):
        current_loaded_models.pop(i)


def unload_model(model):  # type: ignore[no-untyped-def]
    for i, p in enumerate(current_loaded_models):
        if p.model == model:
            current_loaded_models.pop(i)
            return True
    return False


def unload_all_models():  # type: ignore[no-untyped-def]
    free_memory(1e30, get_torch_device())
