"""Fake `backend/sampling/sampling_function.py`, Forge's CFG step and the sampling pass's model loading:

- `sampling_prepare(unet, x)`: `memory_management.load_models_gpu([unet] + extra patchers (+ ControlNets))` - where
  Forge loads (and patches) the UNet patcher it samples with; `sampling_cleanup(unet)` after the pass;
- `sampling_function(cfg_denoiser, denoiser_params, cond_scale, cond_composition)`: reads the UNet patcher from
  `cfg_denoiser.inner_model.inner_model.forge_objects.unet` at every step (so a patcher set before the pass is
  used), builds cond/uncond condition lists, runs `conditioning_modifiers`, then `sampling_function_inner`: no
  uncond at cond_scale 1; cond and uncond batched into ONE model call when their conditions concatenate, uncond
  rows first (`cond_or_uncond == [1, 0]`); `transformer_options` = a copy of model_options'
  with "cond_or_uncond", "sigmas", "cond_mark", "cond_indices", "uncond_indices"; the call is
  `model_options["model_function_wrapper"](model.apply_model, {input, timestep, c, cond_or_uncond})` when set,
  else `model.apply_model(input_x, timestep, **c)`, with `c["control"]` (the ControlNet units' residual lists, from
  the linked list's `get_control`) and `c["control_model"]` when the patcher has ControlNets; then
  uncond + (cond - uncond) * cond_scale and the post-CFG functions. Area/mask conditions and memory-driven batch splitting are not modelled."""

from __future__ import annotations

import math

import torch

from backend import memory_management
from backend.sampling.condition import compile_conditions, compile_weighted_conditions

COND, UNCOND = 0, 1


def compute_cond_mark(cond_or_uncond, sigmas):  # type: ignore[no-untyped-def]
    n = int(sigmas.shape[0])
    return torch.Tensor([cx for cx in cond_or_uncond for _ in range(n)]).to(sigmas)


def compute_cond_indices(cond_or_uncond, sigmas):  # type: ignore[no-untyped-def]
    n = int(sigmas.shape[0])
    cond_indices, uncond_indices = [], []
    for i, cx in enumerate(cond_or_uncond):
        (cond_indices if cx == COND else uncond_indices).extend(range(i * n, (i + 1) * n))
    return cond_indices, uncond_indices


def _run(model, batch, x_in, timestep, model_options):  # type: ignore[no-untyped-def]
    """One model call for `batch`: [(condition dict, COND/UNCOND)]."""
    cond_or_uncond = [kind for _, kind in batch]
    input_x = torch.cat([x_in] * len(batch))
    timestep_ = torch.cat([timestep] * len(batch))
    conds = [{k: v.process_cond(batch_size=x_in.shape[0], device=x_in.device) for k, v in c["model_conds"].items()}
             for c, _ in batch]
    c = {k: conds[0][k].concat([other[k] for other in conds[1:]]) for k in conds[0]}
    options = dict(model_options.get("transformer_options", {}))
    options["cond_or_uncond"] = cond_or_uncond[:]
    options["sigmas"] = timestep
    options["cond_mark"] = compute_cond_mark(cond_or_uncond, timestep)
    options["cond_indices"], options["uncond_indices"] = compute_cond_indices(cond_or_uncond, timestep)
    c["transformer_options"] = options
    control = batch[0][0].get("control")
    if control is not None:  # every unit sees this call's options; the UNet gets the merged residual lists
        unit = control
        while unit is not None:
            unit.transformer_options = options
            unit = unit.previous_controlnet
        c["control"] = control.get_control(input_x, timestep_, c.copy(), len(cond_or_uncond))
        c["control_model"] = control
    if "model_function_wrapper" in model_options:
        out = model_options["model_function_wrapper"](model.apply_model, {"input": input_x, "timestep": timestep_,
                                                                          "c": c, "cond_or_uncond": cond_or_uncond})
    else:
        out = model.apply_model(input_x, timestep_, **c)
    return dict(zip(cond_or_uncond, out.chunk(len(batch))))


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):  # type: ignore[no-untyped-def]
    to_run = [(c, COND) for c in cond] + [(c, UNCOND) for c in (uncond or [])]
    out: dict = {}
    while to_run:
        first = to_run[0][0]["model_conds"]
        together = [i for i, (c, _) in enumerate(to_run)
                    if c["model_conds"].keys() == first.keys()
                    and all(c["model_conds"][k].can_concat(first[k]) for k in first)]
        batch = [to_run[i] for i in reversed(together)]  # Forge takes them from the end: uncond first
        for i in reversed(together):
            to_run.pop(i)
        out.update(_run(model, batch, x_in, timestep, model_options))
    return out[COND], out.get(UNCOND, torch.zeros_like(x_in))


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None,  # type: ignore[no-untyped-def]  # noqa: B006
                            return_full=False):
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep,
                "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": model_options}
        cfg_result = x - model_options["sampler_cfg_function"](args)
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        cfg_result = fn({"denoised": cfg_result, "cond": cond, "uncond": uncond, "model": model,
                         "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                         "model_options": model_options, "input": x})
    return (cfg_result, cond_pred, uncond_pred) if return_full else cfg_result


def sampling_function(self, denoiser_params, cond_scale, cond_composition):  # type: ignore[no-untyped-def]
    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    model = unet_patcher.model
    x = denoiser_params.x
    timestep = denoiser_params.sigma
    uncond = compile_conditions(denoiser_params.text_uncond)
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    model_options = unet_patcher.model_options
    seed = self.p.seeds[0]
    if unet_patcher.controlnet_linked_list is not None:
        for h in cond + (uncond or []):
            h["control"] = unet_patcher.controlnet_linked_list
    for modifier in model_options.get("conditioning_modifiers", []):
        model, x, timestep, uncond, cond, cond_scale, model_options, seed = \
            modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed)
    return sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options, seed,
                                   return_full=True)


def sampling_prepare(unet, x):  # type: ignore[no-untyped-def]
    B, C, H, W = x.shape
    estimate = unet.model_options.get("memory_peak_estimation_modifier", unet.memory_required)
    patchers = list(unet.extra_model_patchers_during_sampling)
    if unet.controlnet_linked_list is not None:
        patchers += unet.controlnet_linked_list.get_models()
    memory_management.load_models_gpu(models=[unet] + patchers, memory_required=estimate([B * 2, C, H, W]),
                                      hard_memory_preservation=unet.extra_preserved_memory_during_sampling)
    for cnet in unet.list_controlnets():
        cnet.pre_run(unet.model, lambda p: unet.model.predictor.percent_to_sigma(p))


def sampling_cleanup(unet):  # type: ignore[no-untyped-def]
    for cnet in unet.list_controlnets():
        cnet.cleanup()
