"""Fake `backend/sampling/condition.py`: conditions as Forge batches them. `ConditionCrossAttn` concatenates with
another of the same token length only (Forge also repeats chunks to a common multiple; the fake's tests keep
prompts of one chunk); `compile_conditions(cond)` turns a (B, T, C) tensor (SD1) or an SDXL condition dict
{"crossattn", "vector"} into Forge's list of condition dicts: model_conds `c_crossattn` (+ `y` = the vector, which
KModel.apply_model passes on to the UNet as `y=`)."""

from __future__ import annotations

import torch


class Condition:
    def __init__(self, cond):  # type: ignore[no-untyped-def]
        self.cond = cond

    def _copy_with(self, cond):  # type: ignore[no-untyped-def]
        return self.__class__(cond)

    def process_cond(self, batch_size, device, **kwargs):  # type: ignore[no-untyped-def]
        cond = self.cond
        if cond.shape[0] != batch_size:
            cond = cond.repeat([batch_size // cond.shape[0]] + [1] * (cond.ndim - 1))
        return self._copy_with(cond.to(device))

    def can_concat(self, other):  # type: ignore[no-untyped-def]
        return self.cond.shape == other.cond.shape

    def concat(self, others):  # type: ignore[no-untyped-def]
        return torch.cat([self.cond] + [o.cond for o in others])


class ConditionCrossAttn(Condition):
    pass


def compile_conditions(cond):  # type: ignore[no-untyped-def]
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return [{"model_conds": {"c_crossattn": ConditionCrossAttn(cond)}, "cross_attn": cond}]
    cross_attn, pooled_output = cond["crossattn"], cond["vector"]
    return [{"cross_attn": cross_attn, "pooled_output": pooled_output,
             "model_conds": {"c_crossattn": ConditionCrossAttn(cross_attn), "y": Condition(pooled_output)}}]


def compile_weighted_conditions(cond, weights):  # type: ignore[no-untyped-def]
    """`weights`: [[(index, weight)]] per image; the fake has one condition per image, weight 1."""
    return compile_conditions(cond)
