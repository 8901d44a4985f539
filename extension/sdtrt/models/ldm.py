"""The LDM UNet (`ldm.modules.diffusionmodules.openaimodel.UNetModel`): SD 1.x, SD 2.x (512 and 768-v) and their
inpainting variants. No `y` vector."""

from __future__ import annotations

from sdtrt.models.unet import UNetContract


class LdmUNet(UNetContract):
    name = "ldm-unet"
    version = 1
    takes_y = False
