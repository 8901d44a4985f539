"""The Host adapter of lllyasviel's Stable Diffusion WebUI Forge (main dfdcbab): the extension's one view of Forge's
`modules.*` and `backend.*`. Importable inside Forge only; the glue in scripts/sdtrt_webui.py attaches it when
`sdtrt.hosts.running_host()` says Forge.

Forge keeps A1111's settings, checkpoint list, queue lock, styles and SD Unet list, so most of the A1111 adapter
holds. What differs (source-cited design: docs/forge/DESIGN.md):
- the model is a set of patchers (`sd_model.forge_objects`): the PyTorch UNet is
  `forge_objects.unet.model.diffusion_model` (LDM's module tree and weight names), and Forge never calls an SdUnet;
- an engine serves by an object patch of `diffusion_model` on a clone of the UNet patcher, set before every sampling
  pass and taken out at the end of the generation. The patch holds the PyTorch UNet outside its module tree, so
  Forge's memory manager never moves it to the GPU, and passes attribute lookups through to it (Forge resolves LoRA
  weight names through the patched module);
- there is no config yaml beside checkpoints (the architecture comes from the weights) and no model-load lock.
- LoRA: Forge's patcher merges LoRAs into the PyTorch UNet (still right for calls that fall back); the engine gets
  the same weights by refit, computed by Forge's own merge from the checkpoint's weights.
- ControlNet: Forge's built-in ControlNet and T2I-Adapter residuals go to an engine's ControlNet inputs
  (hosts/forge_control.py).
- Forge's UNet upsamples to the skip connection's size (`unet_convention` FORGE): builds here default to engines of
  that convention; an A1111-convention engine serves only sizes that are multiples of 64 px here (serving refuses
  the others with the notice, `sdtrt.models.convention`).
Not on the engine in Forge (each runs on PyTorch with the notice): other extensions' UNet patches (reference-only,
IP-Adapter, FreeU, ... patch the UNet's inside)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from sdtrt.errors import SdtrtError
from sdtrt.hosts.a1111 import A1111Host, loaded_model
from sdtrt.hosts.forge_control import CONTROL_MODEL, feeds_for
from sdtrt.hosts.forge_patcher import UNKNOWN_PATCHER, ForgePatcher, NeoPatcher, dialect
from sdtrt.models import NotServable
from sdtrt.models.convention import FORGE
from sdtrt.models.unet import unet_host_call
from sdtrt.serving.slot import NetworksFailed
from sdtrt.webui import host as H

#: transformer_options entries through which other extensions change the UNet's inside (FreeU, SAG, PAG, ...)
UNET_PATCH_KEYS = ("patches", "patches_replace", "block_modifiers", "block_inner_modifiers", "group_norm_wrapper")

#: the prefix of UNet weights in Forge's patcher (KModel.diffusion_model), not in the engine's names
UNET_PREFIX = "diffusion_model."
UNET_PATCHED = "another extension patches the UNet's inside ({keys}): these calls run on PyTorch"


def forge_objects(model: Any = None) -> Any:
    """The loaded model's patchers (None before Forge loaded a model: its placeholder has none)."""
    return getattr(loaded_model() if model is None else model, "forge_objects", None)


class EngineModule(torch.nn.Module):
    """What `diffusion_model` is while an engine serves: calls go to the active SD Unet's server (the engine, or
    PyTorch with the reason), everything else to the PyTorch UNet it holds outside its module tree."""

    def __init__(self, torch_unet: torch.nn.Module, sd_unet: Any,
                 merge_for_fallback: Callable[[torch.device], None] | None = None) -> None:
        super().__init__()
        self.__dict__["sdtrt_torch_unet"] = torch_unet  # not a child: Forge's .to() never reaches it
        self.__dict__["sdtrt_sd_unet"] = sd_unet
        #: before the first fallback call of the pass: whatever the host's loader did not patch into the PyTorch
        #: UNet (Neo: the LoRA weights)
        self.__dict__["sdtrt_merge"] = merge_for_fallback

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["sdtrt_torch_unet"], name)

    def forward(self, x: torch.Tensor, timesteps: Any = None, context: Any = None, y: Any = None,
                control: Any = None, transformer_options: Any = None, **kwargs: Any) -> torch.Tensor:
        unet = self.__dict__["sdtrt_torch_unet"]
        sd_unet = self.__dict__["sdtrt_sd_unet"]
        options = transformer_options if transformer_options is not None else {}

        def pytorch(*args: Any, **kw: Any) -> torch.Tensor:
            _to_device_of(unet, x)
            merge, self.__dict__["sdtrt_merge"] = self.__dict__["sdtrt_merge"], None
            if merge is not None:
                merge(x.device)
            return unet(*args, control=control, transformer_options=options, **kw, **kwargs)

        if sd_unet.server is None:
            sd_unet.activate()
        server = sd_unet.server
        call, kw = unet_host_call(x, timesteps, context, y)
        reason = unservable_call(options, {k: v for k, v in kwargs.items() if k != CONTROL_MODEL})
        feeds = None
        if reason is None and control is not None:
            try:
                feeds = feeds_for(server.slots, control)
            except NotServable as e:
                reason = str(e)
        if reason is not None and server.gate() is None:  # (switched off: serving says so, or nothing)
            return server.to_pytorch(reason, call, kw, fallback=pytorch)
        return server.serve(call, kw, pytorch, control=feeds)


def unservable_call(options: dict[str, Any], extra: dict[str, Any]) -> str | None:
    """Why this Forge UNet call must run on PyTorch whatever its ControlNet residuals, or None."""
    patched = sorted(k for k in UNET_PATCH_KEYS if options.get(k))
    if patched or extra:
        return UNET_PATCHED.format(keys=", ".join(patched + sorted(extra)))
    return None


def _to_device_of(unet: torch.nn.Module, x: torch.Tensor) -> None:
    """A fallback call runs where its input is; Forge does not move a UNet it does not see (the patch hides it)."""
    param = next(unet.parameters(), None)
    if param is not None and param.device != x.device:
        unet.to(x.device)


class ForgeHost(A1111Host):
    def __init__(self) -> None:
        self._patched: list[Any] = []  # the UNet patcher clones this generation installed an engine on
        self._seen: list[Any] = []  # the KModels this generation served or found it could not

    def torch_unet(self) -> Any:
        objects = forge_objects()
        if objects is None:
            return None
        unet = objects.unet.model.diffusion_model
        return unet.__dict__.get("sdtrt_torch_unet", unet)  # ours while patched: the PyTorch UNet it holds

    def unet_convention(self) -> str:
        return FORGE  # Upsample(x, output_shape): straight to the skip connection's size

    def torch_forward(self, unet: Any) -> Any:
        return unet.forward  # Forge leaves its UNet's forward alone (no hijack)

    def lowvram(self) -> bool:
        from backend import memory_management

        state = memory_management.vram_state
        return state in (memory_management.VRAMState.LOW_VRAM, memory_management.VRAMState.NO_VRAM)

    def loaded_checkpoint(self) -> H.CheckpointRef | None:
        model = loaded_model()
        info = getattr(model, "sd_checkpoint_info", None)
        return None if info is None or forge_objects(model) is None else self.checkpoint_ref(info)

    def checkpoint_ref(self, info: Any) -> H.CheckpointRef:
        # Forge detects the architecture from the weights; it looks for no config yaml beside the checkpoint
        return H.CheckpointRef(title=info.title, model_name=info.model_name, filename=info.filename,
                               sha256=getattr(info, "sha256", None), config=None)

    def token_counter(self) -> Any:
        """Forge's token counter: the loaded model's own text processing. Raises before Forge loaded a model (the
        caller then counts words)."""
        count = getattr(loaded_model(), "get_prompt_lengths_on_ui", None)
        if count is None:
            raise SdtrtError("Forge has not loaded a model to count tokens with yet")
        return count

    @contextlib.contextmanager
    def quiet_torch(self, waiting: Any) -> Any:
        """Forge's queue lock (generations; Forge loads models inside them and has no separate load lock)."""
        from modules import call_queue

        queue = call_queue.queue_lock
        if not queue.acquire(blocking=False):
            waiting("waiting for the generation in progress to finish")
            queue.acquire()
        try:
            yield
        finally:
            queue.release()

    # ---- LoRA: Forge's patcher (not A1111's networks) -----------------------------------------------------
    def _dialect(self) -> ForgePatcher | NeoPatcher:
        objects = forge_objects()
        found = dialect(getattr(objects, "unet", None))
        if found is None:
            raise NetworksFailed(f"{UNKNOWN_PATCHER}: LoRAs run on PyTorch")
        return found

    def network_key(self) -> Any:
        return self._dialect().network_key(loaded_model()) if forge_objects() is not None else ()

    def network_weights(self, base: Any) -> dict[str, Any]:
        """The UNet weights the host's LoRA loader would make, by its own `merge_lora_to_weight`, from the
        checkpoint's weights `base(names)`: every LoRA's patches of a weight merged in the order the host merges
        them, online-mode ones included (the engine holds them merged)."""
        from backend.patcher.lora import merge_lora_to_weight

        merged = self._dialect().weight_patches(loaded_model())
        names = {key: key[len(UNET_PREFIX):] for key in merged if key.startswith(UNET_PREFIX)}
        if len(names) != len(merged):
            stray = sorted(set(merged) - set(names))
            raise NetworksFailed(f"a LoRA patches {stray[0]}, which is not a UNet weight of the engine")
        bases = base(list(names.values()))
        out: dict[str, Any] = {}
        for key, name in names.items():
            weight = bases.get(name)
            if weight is None:
                raise NetworksFailed(f"a LoRA patches {name}, which the engine does not have")
            # (merged in float32 on a copy: Neo's merge adds into the weight it is given)
            new = merge_lora_to_weight(merged[key], weight.to(torch.float32, copy=True), key,
                                       computation_dtype=torch.float32)
            out[name] = new.to(device=weight.device, dtype=weight.dtype)
        return out

    def network_files(self) -> list[str]:
        return self._dialect().network_files(loaded_model()) if forge_objects() is not None else []

    # ---- serving: the object patch ------------------------------------------------------------------------
    def model_changed_mid_pass(self) -> bool:
        """Whether the loaded model's UNet is one this generation has not seen though it served an earlier one: Forge
        switched to the refiner in the middle of sampling (its apply_refiner), which samples on the refiner's own,
        unpatched patcher with no sampling hook. True once per such UNet."""
        objects = forge_objects()
        if objects is None or not self._patched:
            return False
        kmodel = objects.unet.model
        if any(kmodel is seen for seen in self._seen):
            return False
        self._seen.append(kmodel)
        return True

    def serve_with(self, p: Any, sd_unet: Any, reload_for: torch.Tensor | None = None) -> str | None:
        """Before a sampling pass: route this pass's UNet calls to `sd_unet` (the active SD Unet) by patching
        `diffusion_model` on a clone of the pass's UNet patcher. `reload_for`: the latent of a pass Forge is
        already sampling (after a refiner switch), whose patcher it then loads again so the patch takes effect.
        Returns why this pass stays on PyTorch unpatched (the caller tells the user), else None."""
        model = getattr(p, "sd_model", None)
        objects = forge_objects(model)
        unet = self.torch_unet()
        if objects is None or unet is None:
            return None
        self._seen.append(objects.unet.model)
        found = dialect(objects.unet)
        refusal = unservable_model(model, objects.unet) or (
            f"{UNKNOWN_PATCHER}; the UNet runs on PyTorch" if found is None else found.serve_problem())
        if refusal is not None or found is None:
            return refusal
        found.before_patch(objects.unet.model, self._patched, _is_ours)
        clone = objects.unet.clone()
        clone.add_object_patch("diffusion_model", EngineModule(unet, sd_unet,
                                                               lambda device: found.fallback_merge(clone, device)))
        objects.unet = clone
        self._patched.append(clone)
        if reload_for is not None:
            from backend.sampling.sampling_function import sampling_prepare

            sampling_prepare(clone, x=reload_for)
        return None

    def stop_serving(self) -> None:
        """At the end of the generation: the PyTorch UNet back in place (a patch left in the model would outlive
        the generation and make the host drop the next LoRA it merges). Also where an extension whose hook ran
        after ours cloned our patched clone: the host then loaded that clone, which holds the PyTorch UNet as its
        backup. On Neo the load records of the KModel go too (forge_patcher.NeoPatcher)."""
        patched, self._patched, self._seen = self._patched, [], []
        kmodels = [clone.model for clone in patched]
        objects = forge_objects()
        found = dialect(getattr(objects, "unet", None)) or (dialect(patched[0]) if patched else None)
        if found is not None:
            found.release(kmodels, patched, _is_ours)
        for kmodel in kmodels:
            current = getattr(kmodel, "diffusion_model", None)
            if isinstance(current, EngineModule):  # whatever held it: the UNet it wraps goes back
                kmodel._modules["diffusion_model"] = current.__dict__["sdtrt_torch_unet"]


def _is_ours(value: Any) -> bool:
    return isinstance(value, EngineModule)


def unservable_model(model: Any, unet_patcher: Any) -> str | None:
    """Why a pass of this model is left to PyTorch without our patch, or None."""
    legacy = getattr(model, "is_webui_legacy_model", None)
    if callable(legacy) and not legacy():
        return "this model is not an SD1/SDXL UNet; sd-webui-trt leaves it to PyTorch"
    if hasattr(getattr(unet_patcher, "model", None), "_orig_apply_model"):
        return "the UNet call is compiled (sd_forge_compile): it runs on PyTorch, not on the engine"
    return None
