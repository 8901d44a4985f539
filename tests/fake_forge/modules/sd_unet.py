"""Forge's `modules/sd_unet.py` (dfdcbab): A1111's SD Unet list and selection, kept as the selection + activation
lifecycle (`list_unets`, `get_unet_option` with "Automatic" = an option whose `model_name` is the checkpoint's,
`apply_unet` comparing options by identity, `SdUnetOption`, `SdUnet`), but `apply_unet` moves no module (A1111 moves
the UNet to the CPU on activation and back on "None") and nothing routes the UNet's forward to `current_unet`
(Forge's sd_hijack does not patch it): an extension has to put its UNet in the patcher itself."""

from __future__ import annotations

import torch.nn

from modules import script_callbacks, shared

unet_options: list = []
current_unet_option = None
current_unet = None
original_forward = None  # not used, only left for compatibility


def list_unets():  # type: ignore[no-untyped-def]
    new_unets = script_callbacks.list_unets_callback()
    unet_options.clear()
    unet_options.extend(new_unets)


def get_unet_option(option=None):  # type: ignore[no-untyped-def]
    option = option or shared.opts.sd_unet
    if option == "None":
        return None
    if option == "Automatic":
        name = shared.sd_model.sd_checkpoint_info.model_name
        options = [x for x in unet_options if x.model_name == name]
        option = options[0].label if options else "None"
    return next(iter([x for x in unet_options if x.label == option]), None)


def apply_unet(option=None):  # type: ignore[no-untyped-def]
    global current_unet_option
    global current_unet

    new_option = get_unet_option(option)
    if new_option == current_unet_option:
        return
    if current_unet is not None:
        print(f"Dectivating unet: {current_unet.option.label}")
        current_unet.deactivate()
    current_unet_option = new_option
    if current_unet_option is None:
        current_unet = None
        return
    current_unet = current_unet_option.create_unet()
    current_unet.option = current_unet_option
    print(f"Activating unet: {current_unet.option.label}")
    current_unet.activate()


class SdUnetOption:
    model_name = None
    label = None

    def create_unet(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError()


class SdUnet(torch.nn.Module):
    def forward(self, x, timesteps, context, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def activate(self):  # type: ignore[no-untyped-def]
        pass

    def deactivate(self):  # type: ignore[no-untyped-def]
        pass


def create_unet_forward(original_forward):  # type: ignore[no-untyped-def]
    def UNetModel_forward(self, x, timesteps=None, context=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        if current_unet is not None:
            return current_unet.forward(x, timesteps, context, *args, **kwargs)
        return original_forward(self, x, timesteps, context, *args, **kwargs)

    return UNetModel_forward
