"""Startup, in A1111's order: `initialize()` (imports, opts from config.json, devices, onchange handlers) then
`initialize_rest()`: samplers, extensions, `list_models`, `load_scripts` (extension scripts import here, after
the UNet forward patch), `list_unets` (after all scripts), then the model. The real host loads the model in a
thread; the fake loads it synchronously at the same point unless --skip-load-model-at-start."""

from __future__ import annotations

import os
import threading

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
    from modules import extensions, scripts, sd_hijack, sd_models, sd_samplers, sd_unet, shared

    sd_samplers.set_samplers()
    extensions.list_extensions()
    sd_models.list_models()
    with startup_timer.subcategory("load scripts"):
        scripts.load_scripts()
    sd_hijack.list_optimizers()
    sd_unet.list_unets()

    def load_model():  # type: ignore[no-untyped-def]
        shared.sd_model  # noqa: B018
        if sd_hijack.current_optimizer is None:
            sd_hijack.apply_optimizations()

    if not shared.cmd_opts.skip_load_model_at_start:
        if os.environ.get("FAKE_A1111_THREADED_LOAD"):  # as the real host: the API comes up while the model loads
            threading.Thread(target=load_model, name="fake-model-load", daemon=True).start()
        else:
            load_model()

    from modules import extra_networks

    extra_networks.initialize()
    extra_networks.register_default_extra_networks()
