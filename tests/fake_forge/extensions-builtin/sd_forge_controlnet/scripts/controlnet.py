"""Stand-in of Forge's built-in ControlNet (`extensions-builtin/sd_forge_controlnet/scripts/controlnet.py`, title
"ControlNet", sorting_priority 10; its units come from `alwayson_scripts: {"ControlNet": {"args": [unit, ...]}}`).
In `process_before_every_sampling` every enabled unit puts its model on a clone of the pass's UNet patcher
(`apply_controlnet_advanced` with the unit's weight and guidance range) and sets the clone back, as Forge's
ControlNetPatcher does; a `reference_only` unit instead patches the UNet's inside (a block modifier, as Forge's
reference preprocessor does).

Fake models by name: "tiny-controlnet" (a ControlNet), "tiny-t2i-adapter" (an SD1 T2I-Adapter); the hint is a fixed
image (the unit's `image` is not decoded)."""

from __future__ import annotations

import torch
from backend.patcher.controlnet import ControlNet, FakeControlModel, T2IAdapter, apply_controlnet_advanced
from modules import scripts

UNITS = 3
HINT = torch.full((1, 3, 64, 64), 0.8)


def model_unit(name):  # type: ignore[no-untyped-def]
    if name == "tiny-controlnet":
        return ControlNet(FakeControlModel(seed=1))
    if name == "tiny-t2i-adapter":
        return T2IAdapter(seed=2)
    raise ValueError(f"fake Forge ControlNet: no model {name!r}")


def reference_modifier(h, flag, transformer_options):  # type: ignore[no-untyped-def]
    return h * 1.1 if flag == "after" and transformer_options.get("block") == ("middle", 0) else h


class ControlNetForForgeOfficial(scripts.Script):
    sorting_priority = 10

    def title(self):  # type: ignore[no-untyped-def]
        return "ControlNet"

    def show(self, is_img2img):  # type: ignore[no-untyped-def]
        return scripts.AlwaysVisible

    def ui(self, is_img2img):  # type: ignore[no-untyped-def]
        return [None] * UNITS

    def process_before_every_sampling(self, p, *units, **kwargs):  # type: ignore[no-untyped-def]
        for unit in units:
            if not isinstance(unit, dict) or not unit.get("enabled", True):
                continue
            unet = p.sd_model.forge_objects.unet
            if str(unit.get("module", "None")).startswith("reference"):
                unet = unet.clone()
                unet.add_block_modifier(reference_modifier)
            else:
                unet = apply_controlnet_advanced(unet=unet, controlnet=model_unit(unit.get("model")),
                                                 image_bchw=HINT, strength=float(unit.get("weight", 1.0)),
                                                 start_percent=float(unit.get("guidance_start", 0.0)),
                                                 end_percent=float(unit.get("guidance_end", 1.0)))
            p.sd_model.forge_objects.unet = unet

    def postprocess(self, p, processed, *args):  # type: ignore[no-untyped-def]
        pass
