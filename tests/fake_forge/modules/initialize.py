"""Forge's startup order (`modules/initialize.py`): `initialize()` (imports, opts from config.json, devices, onchange
handlers) then `initialize_rest()`: samplers, extensions, `list_models`, `load_scripts`, `list_unets`, extra
networks. Unlike A1111, no attention optimizers are listed and NO model is loaded at startup: Forge loads it at the
first generation (`processing.manage_model_and_prompt_cache` -> `sd_models.forge_model_reload`)."""

from __future__ import annotations

from modules.timer import startup_timer


def imports():  # type: ignore[no-untyped-def]
    import torch  # noqa: F401

    from modules import paths, sd_hijack, sd_models, shared, shared_init, timer  # noqa: F401

    shared_init.initialize()


def initialize():  # type: ignore[no-untyped-def]
    imports()
    from modules import initialize_util, sd_models

    initialize_util.configure_opts_onchange()
    sd_models.setup_model()
    initialize_rest(reload_script_modules=False)


def initialize_rest(*, reload_script_modules=False):  # type: ignore[no-untyped-def]
    from modules import extensions, extra_networks, scripts, sd_models, sd_samplers, sd_unet

    sd_samplers.set_samplers()
    extensions.list_extensions()
    sd_models.list_models()
    with startup_timer.subcategory("load scripts"):
        scripts.load_scripts()
    sd_unet.list_unets()
    extra_networks.initialize()
    extra_networks.register_default_extra_networks()
