"""The two model-patcher dialects the Forge adapter meets, told apart by what the UNet patcher has (never by a
version string):

- `ForgePatcher`, lllyasviel's Forge (dfdcbab; docs/forge/DESIGN.md §3): the patcher has `forge_unpatch_model`,
  LoRAs sit per file in `lora_patches` and Forge's LoRA loader merges them at load time through our patch into the
  PyTorch UNet it holds, so a PyTorch fallback call already has them;
- `NeoPatcher`, Forge Neo (its ComfyUI-style ModelPatcher; docs/forge/NEO.md): `unpatch_model`/`detach` and
  `patches_uuid`, LoRAs merged across files in `patches` (the files in the model's `current_lora_hash`), weights
  patched only into the modules a load walks (the PyTorch UNet is outside our patch, so it gets none), and a load
  recorded as "weights patched" even though they were not. So on Neo the KModel's load record is dropped and its
  patches undone before an engine pass and at the end of the generation, and a fallback call merges the LoRA into
  the PyTorch UNet itself, once per pass, with Neo's own `patch_weight_to_device` (undone by the same release).

Both give the LoRA patches per UNet weight (`diffusion_model.<LDM path>`), which the adapter merges with the host's
own `merge_lora_to_weight` for the engine's refit."""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

import torch


def _after_lora(model: Any) -> Any:
    """The UNet patcher with this generation's LoRAs (Forge's `forge_objects_after_applying_lora`)."""
    objects = getattr(model, "forge_objects_after_applying_lora", None) or getattr(model, "forge_objects", None)
    return getattr(objects, "unet", None)


class ForgePatcher:
    """lllyasviel's Forge: `lora_patches` = {(file, strength_patch, strength_model, online): {key: [patch, ...]}}."""

    @staticmethod
    def fits(unet_patcher: Any) -> bool:
        return hasattr(unet_patcher, "forge_unpatch_model")

    def _by_file(self, model: Any) -> dict[Any, Any]:
        return dict(getattr(_after_lora(model), "lora_patches", None) or {})

    def network_key(self, model: Any) -> Any:
        return tuple(sorted(self._by_file(model), key=repr))

    def network_files(self, model: Any) -> list[str]:
        return [str(key[0]) for key in self._by_file(model) if isinstance(key, tuple) and key]

    def weight_patches(self, model: Any) -> dict[str, list[Any]]:
        """Every LoRA's patches of a weight, in the order Forge merges them (its LoraLoader.refresh)."""
        merged: dict[str, list[Any]] = {}
        for patches in self._by_file(model).values():
            for key, current in patches.items():
                merged[key] = merged.get(key, []) + list(current)
        return merged

    def release(self, kmodels: list[Any], patched: list[Any], ours: Callable[[Any], bool]) -> None:
        """Our object patches out of every clone that holds one (ours, and later extensions' clones of ours that
        Forge loaded); `kmodels` collects the KModels they were on."""
        from backend import memory_management

        for clone in reversed(patched):
            if clone.object_patches_backup:
                clone.forge_unpatch_model()
        for loaded in list(memory_management.current_loaded_models):
            clone = loaded.model
            if ours(getattr(clone, "object_patches", {}).get("diffusion_model")):
                kmodels.append(clone.model)
                if clone.object_patches_backup:
                    clone.forge_unpatch_model()

    def serve_problem(self) -> str | None:
        """Why this host cannot take our object patch, or None (Forge's patcher sets it as it is)."""
        return None

    def before_patch(self, kmodel: Any, patched: list[Any], ours: Callable[[Any], bool]) -> None:
        """Forge needs nothing before a pass's patch (its loader merges LoRAs through it)."""

    def fallback_merge(self, clone: Any, device: torch.device) -> None:
        """A fallback call on Forge: its loader already merged the LoRAs into the PyTorch UNet."""


class NeoPatcher:
    """Forge Neo: `patches` = {key: [(strength_patch, adapter, strength_model, offset, function, online), ...]}."""

    @staticmethod
    def fits(unet_patcher: Any) -> bool:
        return hasattr(unet_patcher, "unpatch_model") and hasattr(unet_patcher, "patches_uuid")

    def _files(self, model: Any) -> list[tuple[Any, ...]]:
        """[(file, unet multiplier, text-encoder multiplier, online), ...] of the loaded LoRAs (Neo's
        `current_lora_hash` is the `str()` of that list)."""
        text = getattr(model, "current_lora_hash", None)
        if not text:
            return []
        try:
            entries = ast.literal_eval(str(text))
        except (ValueError, SyntaxError):
            return [(str(text),)]
        return [tuple(e) if isinstance(e, (list, tuple)) else (e,) for e in entries or ()]

    def network_key(self, model: Any) -> Any:
        return tuple(sorted(self._files(model), key=repr))

    def network_files(self, model: Any) -> list[str]:
        return [str(entry[0]) for entry in self._files(model) if entry]

    def weight_patches(self, model: Any) -> dict[str, list[Any]]:
        return {key: list(v) for key, v in (getattr(_after_lora(model), "patches", None) or {}).items()}

    def _undo(self, patcher: Any) -> None:
        patcher.unpatch_model(unpatch_weights=False)  # the object patch out (its backup is shared by clones)
        patcher.detach(unpatch_all=True)  # weights a fallback merged back, the load bookkeeping reset

    def _drop_records(self, matches: Callable[[Any], bool]) -> list[Any]:
        """Neo's load records of the patchers `matches` accepts removed and undone; their KModels."""
        from backend import memory_management

        dropped = []
        for loaded in list(memory_management.current_loaded_models):
            patcher = loaded.model  # a weak reference on Neo: None once the patcher is gone
            if patcher is not None and matches(patcher):
                memory_management.current_loaded_models.remove(loaded)
                self._undo(patcher)
                dropped.append(patcher.model)
        return dropped

    def release(self, kmodels: list[Any], patched: list[Any], ours: Callable[[Any], bool]) -> None:
        """Neo's load records of our KModels (or of any patcher holding our patch) dropped and undone, then our own
        clones undone: Neo would otherwise take the KModel for loaded with its weights patched."""
        known = [clone.model for clone in patched]
        dropped = self._drop_records(lambda patcher: any(patcher.model is k for k in known) or ours(
            getattr(patcher, "object_patches", {}).get("diffusion_model")))
        for clone in reversed(patched):
            self._undo(clone)
        for kmodel in dropped + known:
            if not any(kmodel is k for k in kmodels):
                kmodels.append(kmodel)

    def serve_problem(self) -> str | None:
        """Why this Neo cannot take a module as an object patch, or None. Neo sets object patches with
        `backend.utils.set_attr_raw`, which must set the module as it is and give back what it replaced; a Neo of
        February 2026 wraps the value as a weight there, which fails inside its loader."""
        from backend import utils

        setter = getattr(utils, "set_attr_raw", None)
        holder, before, patch = torch.nn.Module(), torch.nn.Identity(), torch.nn.Identity()
        holder.slot = before
        try:
            previous = setter(holder, "slot", patch) if callable(setter) else None
            took = previous is before and holder.slot is patch
        except Exception:  # noqa: BLE001 - any failure means the patch would fail in Neo's loader
            took = False
        if took:
            return None
        return ("this Forge Neo cannot hold a module as an object patch (its set_attr_raw wraps it as a weight): the "
                "UNet runs on PyTorch; update Forge Neo to serve engines")

    def before_patch(self, kmodel: Any, patched: list[Any], ours: Callable[[Any], bool]) -> None:
        """Before a pass's patch: what an earlier load of this KModel patched into it is undone, so the PyTorch UNet
        starts clean (a fallback then merges the LoRA once, never onto merged weights)."""
        self._drop_records(lambda patcher: patcher.model is kmodel)
        for clone in reversed(patched):
            self._undo(clone)

    def fallback_merge(self, clone: Any, device: torch.device) -> None:
        """A fallback call on Neo: this pass's LoRA patches merged into the PyTorch UNet by Neo's own code (the
        weights resolve through our patch; their backups go to the clones' shared backup, undone by `release`)."""
        for key in list(getattr(clone, "patches", {}) or {}):
            clone.patch_weight_to_device(key, device_to=device)


UNKNOWN_PATCHER = "this Forge's UNet patcher is neither Forge's nor Forge Neo's"


def dialect(unet_patcher: Any) -> ForgePatcher | NeoPatcher | None:
    """The dialect of this UNet patcher, or None for a patcher neither adapter knows."""
    if ForgePatcher.fits(unet_patcher):
        return ForgePatcher()
    if NeoPatcher.fits(unet_patcher):
        return NeoPatcher()
    return None
