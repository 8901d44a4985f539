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
Not on the engine in Forge (each runs on PyTorch with the notice): other extensions' UNet patches (reference-only,
IP-Adapter, FreeU, ... patch the UNet's inside), and latent sizes that are not multiples of 8 (Forge's upsampling
follows the skip connection's size where A1111's engines resize inside the concatenation)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from sdtrt.constants import LATENT_FACTOR, TOKENS_PER_CHUNK
from sdtrt.errors import SdtrtError
from sdtrt.hosts.a1111 import A1111Host, loaded_model
from sdtrt.hosts.forge_control import CONTROL_MODEL, feeds_for
from sdtrt.models import NotServable
from sdtrt.models.unet import unet_host_call
from sdtrt.serving.slot import NetworksFailed
from sdtrt.webui import host as H

#: transformer_options entries through which other extensions change the UNet's inside (FreeU, SAG, PAG, ...)
UNET_PATCH_KEYS = ("patches", "patches_replace", "block_modifiers", "group_norm_wrapper")
#: latent sizes the engines (A1111's resize-in-concatenation) compute as Forge's UNet does
LATENT_MULTIPLE = 8

#: the prefix of UNet weights in Forge's patcher (KModel.diffusion_model), not in the engine's names
UNET_PREFIX = "diffusion_model."
UNET_PATCHED = "another extension patches the UNet's inside ({keys}): these calls run on PyTorch"
UNCOVERED_SIZE = ("Forge upsamples to the skip connection's size where the engine resizes inside the "
                  "concatenation: sizes that are not multiples of 64 px run on PyTorch")


def forge_objects(model: Any = None) -> Any:
    """The loaded model's patchers (None before Forge loaded a model: its placeholder has none)."""
    return getattr(loaded_model() if model is None else model, "forge_objects", None)


def _ref(info: Any) -> H.CheckpointRef:
    # Forge detects the architecture from the weights; it looks for no config yaml beside the checkpoint
    return H.CheckpointRef(title=info.title, model_name=info.model_name, filename=info.filename,
                           sha256=getattr(info, "sha256", None), config=None)


class EngineModule(torch.nn.Module):
    """What `diffusion_model` is while an engine serves: calls go to the active SD Unet's server (the engine, or
    PyTorch with the reason), everything else to the PyTorch UNet it holds outside its module tree."""

    def __init__(self, torch_unet: torch.nn.Module, sd_unet: Any) -> None:
        super().__init__()
        self.__dict__["sdtrt_torch_unet"] = torch_unet  # not a child: Forge's .to() never reaches it
        self.__dict__["sdtrt_sd_unet"] = sd_unet

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
            return unet(*args, control=control, transformer_options=options, **kw, **kwargs)

        if sd_unet.server is None:
            sd_unet.activate()
        server = sd_unet.server
        call, kw = unet_host_call(x, timesteps, context, y)
        reason = unservable_call(x, options, {k: v for k, v in kwargs.items() if k != CONTROL_MODEL})
        feeds = None
        if reason is None and control is not None:
            try:
                feeds = feeds_for(server.slots, control)
            except NotServable as e:
                reason = str(e)
        if reason is not None and server.gate() is None:  # (switched off: serving says so, or nothing)
            return server.to_pytorch(reason, call, kw, fallback=pytorch)
        return server.serve(call, kw, pytorch, control=feeds)


def unservable_call(x: torch.Tensor, options: dict[str, Any], extra: dict[str, Any]) -> str | None:
    """Why this Forge UNet call must run on PyTorch whatever its ControlNet residuals, or None."""
    patched = sorted(k for k in UNET_PATCH_KEYS if options.get(k))
    if patched or extra:
        return UNET_PATCHED.format(keys=", ".join(patched + sorted(extra)))
    if x.shape[-2] % LATENT_MULTIPLE or x.shape[-1] % LATENT_MULTIPLE:
        return UNCOVERED_SIZE
    return None


def _to_device_of(unet: torch.nn.Module, x: torch.Tensor) -> None:
    """A fallback call runs where its input is; Forge does not move a UNet it does not see (the patch hides it)."""
    param = next(unet.parameters(), None)
    if param is not None and param.device != x.device:
        unet.to(x.device)


class ForgeHost(A1111Host):
    def __init__(self) -> None:
        self._patched: list[Any] = []  # the UNet patcher clones this generation installed an engine on

    def torch_unet(self) -> Any:
        objects = forge_objects()
        if objects is None:
            return None
        unet = objects.unet.model.diffusion_model
        return unet.__dict__.get("sdtrt_torch_unet", unet)  # ours while patched: the PyTorch UNet it holds

    def size_refusal(self, width: int, height: int) -> str | None:
        factor = LATENT_MULTIPLE * LATENT_FACTOR
        return UNCOVERED_SIZE if width % factor or height % factor else None

    def torch_forward(self, unet: Any) -> Any:
        return unet.forward  # Forge leaves its UNet's forward alone (no hijack)

    def lowvram(self) -> bool:
        from backend import memory_management

        state = memory_management.vram_state
        return state in (memory_management.VRAMState.LOW_VRAM, memory_management.VRAMState.NO_VRAM)

    def loaded_checkpoint(self) -> H.CheckpointRef | None:
        model = loaded_model()
        info = getattr(model, "sd_checkpoint_info", None)
        return None if info is None or forge_objects(model) is None else _ref(info)

    def checkpoints(self) -> list[H.CheckpointRef]:
        from modules import sd_models

        return [_ref(info) for info in list(sd_models.checkpoints_list.values())]

    def resolve_checkpoint(self, name: str) -> H.CheckpointRef:
        from modules import sd_models

        info = sd_models.checkpoint_aliases.get(name)
        if info is None:
            info = next((i for i in sd_models.checkpoints_list.values() if name in (i.model_name, i.name_for_extra)),
                        None)
        if info is None:
            known = ", ".join(sorted(i.title for i in sd_models.checkpoints_list.values())) or "none"
            raise SdtrtError(f"unknown checkpoint {name!r}; the WebUI lists: {known}")
        return _ref(info)

    def closest_checkpoint(self, name: str) -> H.CheckpointRef | None:
        from modules import sd_models

        info = sd_models.get_closet_checkpoint_match(name)
        return None if info is None else _ref(info)

    def prompt_chunks(self, text: str, negative: bool, steps: int = 20) -> int:
        """77-row chunks as Forge's token counter counts them (the loaded model's own text processing; extra
        networks removed, AND parts and schedules each counted). Raises before Forge loaded a model (the caller
        then counts words)."""
        from modules import extra_networks, prompt_parser

        count = getattr(loaded_model(), "get_prompt_lengths_on_ui", None)
        if count is None:
            raise SdtrtError("Forge has not loaded a model to count tokens with yet")
        text, _ = extra_networks.parse_prompt(text)
        flat = [text]
        if not negative and hasattr(prompt_parser, "get_multicond_prompt_list"):
            _, flat, _ = prompt_parser.get_multicond_prompt_list([text])
        prompts = list(flat)
        if hasattr(prompt_parser, "get_learned_conditioning_prompt_schedules"):
            schedules = prompt_parser.get_learned_conditioning_prompt_schedules(prompts, steps)
            prompts = [t for schedule in schedules for _, t in schedule]
        return max(int(count(t)[1]) for t in prompts) // TOKENS_PER_CHUNK

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
    def _lora_patches(self) -> dict[Any, Any]:
        model = loaded_model()
        objects = getattr(model, "forge_objects_after_applying_lora", None) or forge_objects(model)
        return dict(getattr(getattr(objects, "unet", None), "lora_patches", None) or {})

    def network_key(self) -> Any:
        return tuple(sorted(self._lora_patches(), key=repr))

    def network_weights(self, base: Any) -> dict[str, Any]:
        """The UNet weights Forge's LoRA loader would make, by Forge's own `merge_lora_to_weight`, from the
        checkpoint's weights `base(names)`: every LoRA's patches of a weight merged in the order Forge merges
        them (its LoraLoader.refresh), online-mode ones included (the engine holds them merged)."""
        from backend.patcher.lora import merge_lora_to_weight

        merged: dict[str, list[Any]] = {}
        for patches in self._lora_patches().values():
            for key, current in patches.items():
                merged[key] = merged.get(key, []) + list(current)
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
            new = merge_lora_to_weight(merged[key], weight.clone(), key, computation_dtype=torch.float32)
            out[name] = new.to(device=weight.device, dtype=weight.dtype)
        return out

    def network_files(self) -> list[str]:
        return [str(key[0]) for key in self._lora_patches() if isinstance(key, tuple) and key]

    # ---- serving: the object patch ------------------------------------------------------------------------
    def serve_with(self, p: Any, sd_unet: Any) -> None:
        """Before a sampling pass: route this pass's UNet calls to `sd_unet` (the active SD Unet) by patching
        `diffusion_model` on a clone of the pass's UNet patcher."""
        objects = forge_objects(getattr(p, "sd_model", None))
        unet = self.torch_unet()
        if objects is None or unet is None:
            return
        clone = objects.unet.clone()
        clone.add_object_patch("diffusion_model", EngineModule(unet, sd_unet))
        objects.unet = clone
        self._patched.append(clone)

    def stop_serving(self) -> None:
        """At the end of the generation: the PyTorch UNet back in place (a patch left in the model would outlive
        the generation and make Forge drop the next LoRA it merges). Also where an extension whose hook ran after
        ours cloned our patched clone: Forge then loaded that clone, which holds the PyTorch UNet as its backup."""
        patched, self._patched = self._patched, []
        kmodels = {id(clone.model): clone.model for clone in patched}
        for clone in reversed(patched):
            if clone.object_patches_backup:
                clone.forge_unpatch_model()
        from backend import memory_management

        for loaded in list(memory_management.current_loaded_models):
            clone = loaded.model
            if isinstance(getattr(clone, "object_patches", {}).get("diffusion_model"), EngineModule):
                kmodels[id(clone.model)] = clone.model
                if clone.object_patches_backup:
                    clone.forge_unpatch_model()
        for kmodel in kmodels.values():
            current = getattr(kmodel, "diffusion_model", None)
            if isinstance(current, EngineModule):  # whatever held it: the UNet it wraps goes back
                kmodel._modules["diffusion_model"] = current.__dict__["sdtrt_torch_unet"]
