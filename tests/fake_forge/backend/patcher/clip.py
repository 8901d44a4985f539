"""Fake `backend/patcher/clip.py` CLIP: the text encoder (`cond_stage_model`) under a ModelPatcher (`patcher`), cloned
for LoRA. The fake encoder has no LoRA-able layers (model_lora_keys_clip is empty)."""

from __future__ import annotations

from backend import memory_management
from backend.patcher.base import ModelPatcher


class CLIP:
    def __init__(self, cond_stage_model=None, no_init=False):  # type: ignore[no-untyped-def]
        if no_init:
            return
        self.cond_stage_model = cond_stage_model
        self.patcher = ModelPatcher(cond_stage_model, load_device=memory_management.text_encoder_device(),
                                    offload_device=memory_management.cpu)

    def clone(self):  # type: ignore[no-untyped-def]
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.patcher.add_patches(*args, **kwargs)
