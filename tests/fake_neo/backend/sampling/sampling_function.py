"""Neo's `backend/sampling/sampling_function.py` (N @f95f632 :218-400): the CFG step, the batched cond/uncond call,
`transformer_options` and the `control` dict are Forge's (the fake Forge's file, run here through
fake_neo_overlay.extend); `sampling_prepare(unet, x)` (:365-389) differs: the memory estimate for a doubled batch,
the ControlNets' models and memory, the online-LoRA memory, then
`memory_management.load_models_gpu(models=[unet] + extra patchers, memory_required=...,
minimum_memory_required=...)` (no `hard_memory_preservation`), then each ControlNet's `pre_run`;
`sampling_cleanup` also empties the cache."""

import fake_neo_overlay as _overlay

_overlay.extend(globals(), "backend/sampling/sampling_function.py")


def sampling_prepare(unet, x):  # type: ignore[no-untyped-def]
    shape = list(x.shape)
    mem_shape = [2 * shape[0]] + shape[1:]
    unet_inference_memory = unet.memory_required(mem_shape)
    additional_inference_memory = unet.extra_preserved_memory_during_sampling
    additional_model_patchers = list(unet.extra_model_patchers_during_sampling)
    if unet.controlnet_linked_list is not None:
        additional_model_patchers += unet.controlnet_linked_list.get_models()
    memory_management.load_models_gpu(  # noqa: F821
        models=[unet] + additional_model_patchers,
        memory_required=unet_inference_memory + additional_inference_memory,
        minimum_memory_required=unet_inference_memory // 2 + additional_inference_memory)
    real_model = unet.model
    for cnet in unet.list_controlnets():
        cnet.pre_run(real_model, lambda p: real_model.predictor.percent_to_sigma(p))


def sampling_cleanup(unet):  # type: ignore[no-untyped-def]
    for cnet in unet.list_controlnets():
        cnet.cleanup()
    memory_management.soft_empty_cache()  # noqa: F821
