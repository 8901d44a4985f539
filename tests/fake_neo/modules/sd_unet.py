"""Neo's `modules/sd_unet.py` (N @f95f632 `webui/modules/sd_unet.py:1-61`): the SD Unet list and selection only:
`list_unets` (:8), `get_unet_option` (:13, "Automatic" = the option whose `model_name` is the checkpoint's),
`apply_unet` (:29, options compared by identity; `create_unet()` and `activate()`/`deactivate()` on what it
returned), `SdUnetOption` (:52). There is NO `SdUnet` class, no `create_unet_forward`, no `original_forward`: an
extension brings its own base class, and nothing calls the unet's forward."""

from __future__ import annotations

from modules import script_callbacks, shared

unet_options: list = []
current_unet_option = None
current_unet = None


def list_unets():  # type: ignore[no-untyped-def]
    unet_options.clear()
    unet_options.extend(script_callbacks.list_unets_callback())


def get_unet_option(option=None):  # type: ignore[no-untyped-def]
    option = option or shared.opts.sd_unet
    if option == "None":
        return None
    if option == "Automatic":
        name = shared.sd_model.sd_checkpoint_info.model_name
        matching = [x for x in unet_options if x.model_name == name]
        option = matching[0].label if matching else "None"
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
