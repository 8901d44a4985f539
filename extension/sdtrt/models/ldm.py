"""The LDM UNet (`ldm.modules.diffusionmodules.openaimodel.UNetModel`): SD 1.x, SD 2.x (512 and 768-v) and their
inpainting variants. No `y` vector."""

from __future__ import annotations

from sdtrt.constants import SD1_CONTEXT_DIM, SD2_CONTEXT_DIM
from sdtrt.models.base import FamilyDef
from sdtrt.models.control import ControlledUNet
from sdtrt.models.unet import UNetContract


class LdmUNet(UNetContract):
    name = "ldm-unet"
    version = 1
    takes_y = False


class LdmUNetControl(ControlledUNet):
    """With ControlNet inputs: 13 residuals (12 skips and the middle block), T2I-Adapter features after input
    blocks 2, 5, 8 and 11 (the last block of each level)."""

    name = "ldm-unet-control"
    version = 1
    takes_y = False
    adapter_after = (2, 5, 8, 11)


LdmUNet.control_variant = LdmUNetControl

#: The families detection recognises as this architecture (by context width; no `y`), with their head layouts.
FAMILIES = (
    FamilyDef("sd1", "SD 1.x", SD1_CONTEXT_DIM, None, LdmUNet, num_heads=8),
    FamilyDef("sd2", "SD 2.x", SD2_CONTEXT_DIM, None, LdmUNet, num_head_channels=64),
)
