"""--medvram / --lowvram. Both set `sd_model.lowvram = True` (as `setup_for_low_vram` does). medvram registers a
forward pre-hook on `sd_model.model` that moves it (with the UNet) to `devices.device` at every call, evicting
the previous module; lowvram does the same per UNet block."""

from __future__ import annotations

from modules import devices, shared

module_in_gpu = None
cpu = devices.cpu


def send_everything_to_cpu():  # type: ignore[no-untyped-def]
    global module_in_gpu
    if module_in_gpu is not None:
        module_in_gpu.to(cpu)
    module_in_gpu = None


def is_needed(sd_model):  # type: ignore[no-untyped-def]
    return shared.cmd_opts.lowvram or shared.cmd_opts.medvram or (
        shared.cmd_opts.medvram_sdxl and hasattr(sd_model, "conditioner"))


def apply(sd_model):  # type: ignore[no-untyped-def]
    enable = is_needed(sd_model)
    shared.parallel_processing_allowed = not enable
    if enable:
        setup_for_low_vram(sd_model, not shared.cmd_opts.lowvram)
    else:
        sd_model.lowvram = False


def setup_for_low_vram(sd_model, use_medvram):  # type: ignore[no-untyped-def]
    if getattr(sd_model, "lowvram", False):
        return
    sd_model.lowvram = True

    def send_me_to_gpu(module, _):  # type: ignore[no-untyped-def]
        global module_in_gpu
        if module_in_gpu == module:
            return
        if module_in_gpu is not None:
            module_in_gpu.to(cpu)
        module.to(devices.device)
        module_in_gpu = module

    sd_model.to(devices.device)  # the real host keeps big parts on CPU; the fake has only the UNet
    if use_medvram:
        sd_model.model.register_forward_pre_hook(send_me_to_gpu)
    else:
        diff_model = sd_model.model.diffusion_model
        diff_model.to(cpu)
        for block in [*diff_model.input_blocks, diff_model.middle_block, *diff_model.output_blocks]:
            block.register_forward_pre_hook(send_me_to_gpu)
