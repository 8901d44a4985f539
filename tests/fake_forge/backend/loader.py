"""Fake `backend/loader.py` `forge_loader(checkpoint file)`: splits the A1111-format checkpoint, guesses the model from
the UNet weights (sdtrt's detection stands in for huggingface_guess; no config yaml is needed - one beside the file is
read only for the prediction type, as Forge does), builds the components (the UNet loaded strictly from
`model.diffusion_model.*`; a "scaled_linear" scheduler config) and the engine object of the first of
`possible_models` whose guess matches, as Forge's loader does: by the UNet's context and `y` widths (Forge's
huggingface_guess: SD15 context 768 without `y`; SDXL context 2048 with `y` 2816; SDXLRefiner context 1280 with
`y` 2560). The architecture's attention heads are the family's (SD1's 8 heads; SDXL's 64 channels per head), as
the guess's configs give them. SD2, SD3, Flux... are not modelled."""

from __future__ import annotations

import os
from types import SimpleNamespace

from backend import utils
from backend.diffusion_engine.sd15 import StableDiffusion, TextEncoder
from backend.diffusion_engine.sdxl import StableDiffusionXL, StableDiffusionXLRefiner, TextEncoders
from backend.nn.unet import IntegratedUNet2DConditionModel

UNET_PREFIX = "model.diffusion_model."

#: (the guess's name, its huggingface repo, UNet context width, `y` width, engine class, text encoders (name: width))
#: in Forge's order of `possible_models` (the refiner before the base)
GUESSES = (
    ("SD15", "runwayml/stable-diffusion-v1-5", 768, None, StableDiffusion, None),
    ("SDXLRefiner", "stabilityai/stable-diffusion-xl-refiner-1.0", 1280, 2560, StableDiffusionXLRefiner,
     {"clip_g": 1280}),
    ("SDXL", "stabilityai/stable-diffusion-xl-base-1.0", 2048, 2816, StableDiffusionXL,
     {"clip_l": 768, "clip_g": 1280}),
)


class EstimatedConfig(SimpleNamespace):
    def inpaint_model(self) -> bool:
        return self.unet_config["in_channels"] > 4


def _yaml_prediction_type(path: str) -> str | None:
    yaml_file = os.path.splitext(path)[0] + ".yaml"
    if not os.path.isfile(yaml_file):
        return None
    import yaml

    with open(yaml_file, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    param = config.get("model", {}).get("params", {}).get("parameterization", "")
    return "v_prediction" if param == "v" else "epsilon" if param == "eps" else None


def forge_loader(sd, additional_state_dicts=None):  # type: ignore[no-untyped-def]
    from sdtrt.pipeline.families import ConfigHints, detect

    state_dict = utils.load_torch_file(sd)
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    try:
        info = detect(unet_sd, ConfigHints())
    except Exception as e:
        raise ValueError("Failed to recognize model type!") from e
    guess = next((g for g in GUESSES if (g[2], g[3]) == (info.spec.context_dim, info.spec.adm_in_channels)), None)
    if guess is None:
        raise NotImplementedError(f"the fake Forge loads SD1.x and SDXL (base, refiner) checkpoints, not "
                                  f"{info.family_id}")
    name, repo, _, _, engine, encoders = guess
    config = EstimatedConfig(huggingface_repo=repo, unet_config=info.spec.to_dict(), guess_name=name)
    unet = IntegratedUNet2DConditionModel(info.spec)
    unet.load_state_dict(unet_sd, strict=True)
    unet.eval().requires_grad_(False)
    prediction_type = _yaml_prediction_type(sd) or "epsilon"
    scheduler = SimpleNamespace(config=SimpleNamespace(prediction_type=prediction_type, beta_schedule="scaled_linear",
                                                       beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000))
    text_encoder = TextEncoder(768) if encoders is None else TextEncoders(encoders)
    return engine(config, {"unet": unet, "text_encoder": text_encoder, "scheduler": scheduler, "vae": None})
