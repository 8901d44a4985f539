"""Fake `backend/diffusion_engine/base.py`: `ForgeObjects` (unet, clip, vae, clipvision patchers; `shallow_copy()` is a
new container holding the same patcher objects) and `ForgeDiffusionEngine`, the loaded model object
(`shared.sd_model`): `forge_objects` (what this pass samples with), `forge_objects_original` (as loaded),
`forge_objects_after_applying_lora` (set by the LoRA extension), `current_lora_hash`, and the WebUI-legacy fields
(`is_sd1`..., `cond_stage_model = None`, no `.model`)."""

from __future__ import annotations


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision):  # type: ignore[no-untyped-def]
        self.unet = unet
        self.clip = clip
        self.vae = vae
        self.clipvision = clipvision

    def shallow_copy(self):  # type: ignore[no-untyped-def]
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeDiffusionEngine:
    matched_guesses: tuple = ()

    def __init__(self, estimated_config, huggingface_components):  # type: ignore[no-untyped-def]
        self.model_config = estimated_config
        self.is_inpaint = estimated_config.inpaint_model()
        self.forge_objects = None
        self.forge_objects_original = None
        self.forge_objects_after_applying_lora = None
        self.current_lora_hash = str([])
        self.fix_for_webui_backward_compatibility()

    def fix_for_webui_backward_compatibility(self):  # type: ignore[no-untyped-def]
        self.tiling_enabled = False
        self.first_stage_model = None
        self.cond_stage_model = None
        self.use_distilled_cfg_scale = False
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = False

    def set_clip_skip(self, clip_skip):  # type: ignore[no-untyped-def]
        pass

    def get_first_stage_encoding(self, x):  # type: ignore[no-untyped-def]
        return x

    def get_prompt_lengths_on_ui(self, prompt):  # type: ignore[no-untyped-def]
        return 0, 75

    def is_webui_legacy_model(self):  # type: ignore[no-untyped-def]
        return self.is_sd1 or self.is_sd2 or self.is_sdxl or self.is_sd3
