"""Stand-in of Neo's sd_forge_lora `extra_networks_lora.py`: `<lora:name:te[:unet]>` -> names and multipliers ->
`networks.load_networks(names, te_multipliers, unet_multipliers)` (Neo's signature: no dyn_dims), also with no LoRA
(that resets the patchers to the original ones)."""

from __future__ import annotations

import networks
from modules import extra_networks


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):  # type: ignore[no-untyped-def]
        super().__init__("lora")
        self.errors: dict = {}

    def activate(self, p, params_list):  # type: ignore[no-untyped-def]
        self.errors.clear()
        names, te_multipliers, unet_multipliers = [], [], []
        for params in params_list:
            assert params.items
            names.append(params.positional[0])
            te = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            te = float(params.named.get("te", te))
            unet = float(params.positional[2]) if len(params.positional) > 2 else te
            unet = float(params.named.get("unet", unet))
            te_multipliers.append(te)
            unet_multipliers.append(unet)
        networks.load_networks(names, te_multipliers, unet_multipliers)

    def deactivate(self, p):  # type: ignore[no-untyped-def]
        if self.errors:
            p.comment("Networks with errors: " + ", ".join(f"{k} ({v})" for k, v in self.errors.items()))
            self.errors.clear()
