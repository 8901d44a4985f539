"""Fake `backend/diffusion_engine/base.py` with Neo's fields (N @f95f632 :18-125): `ForgeObjects` (unet, clip, vae,
clipvision; `shallow_copy()` a new container of the same patchers) and `ForgeDiffusionEngine`: `forge_objects`,
`forge_objects_original`, `forge_objects_after_applying_lora`, `current_lora_hash` (`str([])` at load; the LoRA
extension keeps there the string of the LoRA set last applied), `get_prompt_lengths_on_ui` -> (0, 75) unless an
engine counts tokens (:73-74), `is_webui_legacy_model()` = is_sd1 or is_sdxl (:76), the backward-compatibility
flags is_sd1 / is_sdxl / is_wan only (no is_sd2/is_sd3: Neo dropped SD2 and SD3, :79-85), `use_shift` and
`set_shift(shift)` (a no-op unless the engine uses shift, :106-110), `cond_stage_model`/`first_stage_model` as
properties over the patchers."""

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
        self.ini_latent = None
        self.ref_latents: list = []

    def set_clip_skip(self, clip_skip):  # type: ignore[no-untyped-def]
        pass

    def get_first_stage_encoding(self, x):  # type: ignore[no-untyped-def]
        return x

    def get_prompt_lengths_on_ui(self, prompt):  # type: ignore[no-untyped-def]
        return 0, 75

    def is_webui_legacy_model(self):  # type: ignore[no-untyped-def]
        return self.is_sd1 or self.is_sdxl

    def fix_for_webui_backward_compatibility(self):  # type: ignore[no-untyped-def]
        self.tiling_enabled = False
        self.use_distilled_cfg_scale = False
        self.use_shift = False
        self.is_sd1 = False
        self.is_sdxl = False
        self.is_wan = False

    @property
    def first_stage_model(self):  # type: ignore[no-untyped-def]
        try:
            return self.forge_objects.vae.first_stage_model
        except Exception:  # noqa: BLE001
            return None

    @property
    def cond_stage_model(self):  # type: ignore[no-untyped-def]
        try:
            return self.forge_objects.clip.cond_stage_model
        except Exception:  # noqa: BLE001
            return None

    def set_shift(self, shift):  # type: ignore[no-untyped-def]
        if not self.use_shift:
            return
        self.forge_objects.unet.model.predictor.set_parameters(shift=shift)
