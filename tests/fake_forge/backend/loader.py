"""Fake `backend/loader.py` `forge_loader(checkpoint file)`: splits the A1111-format checkpoint, guesses the model from
the UNet weights (sdtrt's detection stands in for huggingface_guess; no config yaml is needed - one beside the file is
read only for the prediction type, as Forge does), builds the components (the UNet loaded strictly from
`model.diffusion_model.*`; a "scaled_linear" scheduler config) and the engine object. SD1.x only."""

from __future__ import annotations

import os
from types import SimpleNamespace

from backend import utils
from backend.diffusion_engine.sd15 import StableDiffusion, TextEncoder
from backend.nn.unet import IntegratedUNet2DConditionModel

UNET_PREFIX = "model.diffusion_model."


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
    if info.spec.context_dim != 768 or info.spec.adm_in_channels is not None:
        raise NotImplementedError(f"the fake Forge loads SD1.x checkpoints only, not {info.family_id}")
    config = EstimatedConfig(huggingface_repo="runwayml/stable-diffusion-v1-5", unet_config=info.spec.to_dict())
    unet = IntegratedUNet2DConditionModel(info.spec)
    unet.load_state_dict(unet_sd, strict=True)
    unet.eval().requires_grad_(False)
    prediction_type = _yaml_prediction_type(sd) or "epsilon"
    scheduler = SimpleNamespace(config=SimpleNamespace(prediction_type=prediction_type, beta_schedule="scaled_linear",
                                                       beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000))
    return StableDiffusion(config, {"unet": unet, "text_encoder": TextEncoder(768), "scheduler": scheduler,
                                    "vae": None})
