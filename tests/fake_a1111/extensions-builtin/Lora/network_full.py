"""Full-weight module type (v1.10.1 network_full.py): `diff` (the whole weight delta) and optional `diff_b` (a bias
delta, returned as ex_bias)."""

from __future__ import annotations

import network


class ModuleTypeFull(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):  # type: ignore[no-untyped-def]
        if all(x in weights.w for x in ["diff"]):
            return NetworkModuleFull(net, weights)
        return None


class NetworkModuleFull(network.NetworkModule):
    def __init__(self, net: network.Network, weights: network.NetworkWeights):  # type: ignore[no-untyped-def]
        super().__init__(net, weights)
        self.weight = weights.w.get("diff")
        self.ex_bias = weights.w.get("diff_b")

    def calc_updown(self, orig_weight):  # type: ignore[no-untyped-def]
        output_shape = self.weight.shape
        updown = self.weight.to(orig_weight.device)
        if self.ex_bias is not None:
            ex_bias = self.ex_bias.to(orig_weight.device)
        else:
            ex_bias = None
        return self.finalize_updown(updown, orig_weight, output_shape, ex_bias)
