"""Patches `forward` and `_load_from_state_dict` of torch Linear/Conv2d/GroupNorm/LayerNorm/MultiheadAttention at
class level through `modules.patches` so LoRA weights merge lazily on the first forward of each layer."""

from __future__ import annotations

import networks
import torch
from modules import patches


class LoraPatches:
    def __init__(self):  # type: ignore[no-untyped-def]
        p = patches.patch
        self.Linear_forward = p(__name__, torch.nn.Linear, "forward", networks.network_Linear_forward)
        self.Linear_load_state_dict = p(__name__, torch.nn.Linear, "_load_from_state_dict",
                                        networks.network_Linear_load_state_dict)
        self.Conv2d_forward = p(__name__, torch.nn.Conv2d, "forward", networks.network_Conv2d_forward)
        self.Conv2d_load_state_dict = p(__name__, torch.nn.Conv2d, "_load_from_state_dict",
                                        networks.network_Conv2d_load_state_dict)
        self.GroupNorm_forward = p(__name__, torch.nn.GroupNorm, "forward", networks.network_GroupNorm_forward)
        self.GroupNorm_load_state_dict = p(__name__, torch.nn.GroupNorm, "_load_from_state_dict",
                                           networks.network_GroupNorm_load_state_dict)
        self.LayerNorm_forward = p(__name__, torch.nn.LayerNorm, "forward", networks.network_LayerNorm_forward)
        self.LayerNorm_load_state_dict = p(__name__, torch.nn.LayerNorm, "_load_from_state_dict",
                                           networks.network_LayerNorm_load_state_dict)
        self.MultiheadAttention_forward = p(__name__, torch.nn.MultiheadAttention, "forward",
                                            networks.network_MultiheadAttention_forward)
        self.MultiheadAttention_load_state_dict = p(__name__, torch.nn.MultiheadAttention, "_load_from_state_dict",
                                                    networks.network_MultiheadAttention_load_state_dict)

    def undo(self):  # type: ignore[no-untyped-def]
        for cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm,
                    torch.nn.MultiheadAttention):
            for field in ("forward", "_load_from_state_dict"):
                if patches.original(__name__, cls, field) is not None:
                    patches.undo(__name__, cls, field)
