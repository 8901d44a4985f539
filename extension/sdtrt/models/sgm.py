"""The SGM UNet (`sgm.modules.diffusionmodules.openaimodel.UNetModel`): SDXL base (y 2816) and refiner (y 2560),
inpainting included. Takes the `y` vector, which A1111 passes as a keyword."""

from __future__ import annotations

from sdtrt.constants import (
    SDXL_BASE_CONTEXT_DIM,
    SDXL_BASE_Y_WIDTH,
    SDXL_REFINER_CONTEXT_DIM,
    SDXL_REFINER_Y_WIDTH,
)
from sdtrt.models.base import FamilyDef
from sdtrt.models.control import ControlledUNet
from sdtrt.models.unet import UNetContract


class SgmUNet(UNetContract):
    name = "sgm-unet"
    version = 1
    takes_y = True


class SgmUNetControl(ControlledUNet):
    """With ControlNet inputs: 10 residuals (9 skips and the middle block), T2I-Adapter features after input
    blocks 3, 5 and 8 (sd-webui-controlnet adds SDXL's fourth feature after the middle block, which is the last
    residual's place)."""

    name = "sgm-unet-control"
    version = 1
    takes_y = True
    adapter_after = (3, 5, 8)


SgmUNet.control_variant = SgmUNetControl

#: The families detection recognises as this architecture (by context and `y` widths), with their head layouts.
FAMILIES = (
    FamilyDef("sdxl-base", "SDXL base", SDXL_BASE_CONTEXT_DIM, SDXL_BASE_Y_WIDTH, SgmUNet, num_head_channels=64),
    FamilyDef("sdxl-refiner", "SDXL refiner", SDXL_REFINER_CONTEXT_DIM, SDXL_REFINER_Y_WIDTH, SgmUNet,
              num_head_channels=64),
)
