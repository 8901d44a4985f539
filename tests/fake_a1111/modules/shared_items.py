"""Dropdown item lists and refreshers, plus the `Shared` module class that makes `shared.sd_model` a lazily
loading property (reading it loads the model; setting it calls `model_data.set_sd_model`)."""

from __future__ import annotations

import sys
import types


def list_checkpoint_tiles(use_short=False):  # type: ignore[no-untyped-def]
    from modules import sd_models

    return sd_models.checkpoint_tiles(use_short)


def refresh_checkpoints():  # type: ignore[no-untyped-def]
    from modules import sd_models

    sd_models.list_models()


def sd_vae_items():  # type: ignore[no-untyped-def]
    return ["Automatic", "None"]


def refresh_vae_list():  # type: ignore[no-untyped-def]
    pass


def cross_attention_optimizations():  # type: ignore[no-untyped-def]
    from modules import sd_hijack

    return ["Automatic"] + [x.title() for x in sd_hijack.optimizers] + ["None"]


def sd_unet_items():  # type: ignore[no-untyped-def]
    from modules import sd_unet

    return ["Automatic"] + [x.label for x in sd_unet.unet_options] + ["None"]


def refresh_unet_list():  # type: ignore[no-untyped-def]
    from modules import sd_unet

    sd_unet.list_unets()


def list_samplers():  # type: ignore[no-untyped-def]
    from modules import sd_samplers

    return sd_samplers.all_samplers


def reload_hypernetworks():  # type: ignore[no-untyped-def]
    pass


class Shared(types.ModuleType):
    """Replaces the class of the `modules.shared` module object."""

    @property
    def sd_model(self):  # type: ignore[no-untyped-def]
        from modules import sd_models

        return sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):  # type: ignore[no-untyped-def]
        from modules import sd_models

        sd_models.model_data.set_sd_model(value)


sys.modules["modules.shared"].__class__ = Shared
