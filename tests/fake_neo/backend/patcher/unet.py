"""Fake `backend/patcher/unet.py` UnetPatcher with Neo's semantics (N :12-125): a ModelPatcher over a KModel
(`from_model`, the load/offload/current device of the UNet), whose `clone()` is `super().clone()` plus the ControlNet
linked list, the extra memory/patchers to keep during sampling and the extra concat condition; `add_patched_controlnet`,
`list_controlnets`, `append_model_option`/`append_transformer_option`/`set_transformer_option`,
`add_block_modifier`, `add_block_inner_modifier` (-> transformer_options "block_inner_modifiers"),
`add_conditioning_modifier`, `set_group_norm_wrapper`."""

from __future__ import annotations

from backend.modules.k_model import KModel
from backend.patcher.base import ModelPatcher


class UnetPatcher(ModelPatcher):
    @classmethod
    def from_model(cls, model, diffusers_scheduler, config, *, k_predictor=None):  # type: ignore[no-untyped-def]
        kmodel = KModel(model=model, diffusers_scheduler=diffusers_scheduler, k_predictor=k_predictor, config=config)
        return UnetPatcher(kmodel, load_device=model.load_device, offload_device=model.offload_device,
                           current_device=model.initial_device)

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling: list = []
        self.extra_concat_condition = None

    def clone(self):  # type: ignore[no-untyped-def]
        n = super().clone()
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.extra_concat_condition = self.extra_concat_condition
        return n

    def add_patched_controlnet(self, cnet):  # type: ignore[no-untyped-def]
        cnet.set_previous_controlnet(self.controlnet_linked_list)
        self.controlnet_linked_list = cnet

    def list_controlnets(self):  # type: ignore[no-untyped-def]
        found, pointer = [], self.controlnet_linked_list
        while pointer is not None:
            found.append(pointer)
            pointer = pointer.previous_controlnet
        return found

    def append_model_option(self, k, v, ensure_uniqueness=False):  # type: ignore[no-untyped-def]
        values = self.model_options.setdefault(k, [])
        if not (ensure_uniqueness and v in values):
            values.append(v)

    def append_transformer_option(self, k, v, ensure_uniqueness=False):  # type: ignore[no-untyped-def]
        values = self.model_options.setdefault("transformer_options", {}).setdefault(k, [])
        if not (ensure_uniqueness and v in values):
            values.append(v)

    def set_transformer_option(self, k, v):  # type: ignore[no-untyped-def]
        self.model_options.setdefault("transformer_options", {})[k] = v

    def add_block_modifier(self, modifier, ensure_uniqueness=False):  # type: ignore[no-untyped-def]
        self.append_transformer_option("block_modifiers", modifier, ensure_uniqueness)

    def add_block_inner_modifier(self, modifier, ensure_uniqueness=False):  # type: ignore[no-untyped-def]
        self.append_transformer_option("block_inner_modifiers", modifier, ensure_uniqueness)

    def add_conditioning_modifier(self, modifier, ensure_uniqueness=False):  # type: ignore[no-untyped-def]
        self.append_model_option("conditioning_modifiers", modifier, ensure_uniqueness)

    def set_group_norm_wrapper(self, wrapper):  # type: ignore[no-untyped-def]
        self.set_transformer_option("group_norm_wrapper", wrapper)
