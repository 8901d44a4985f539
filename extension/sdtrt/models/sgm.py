"""The SGM UNet (`sgm.modules.diffusionmodules.openaimodel.UNetModel`): SDXL base (y 2816) and refiner (y 2560),
inpainting included. Takes the `y` vector, which A1111 passes as a keyword."""

from __future__ import annotations

from sdtrt.models.unet import UNetContract


class SgmUNet(UNetContract):
    name = "sgm-unet"
    version = 1
    takes_y = True
