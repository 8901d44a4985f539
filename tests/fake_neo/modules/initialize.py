"""Neo's startup order: the fake Forge's (`initialize()` then `initialize_rest()`: samplers, extensions, list_models,
load_scripts, list_unets (N `modules/initialize.py:139`), extra networks; no model at startup), but `imports()` does
not import `sd_hijack` (Neo has none)."""

import fake_neo_overlay as _overlay

_overlay.extend(globals(), "modules/initialize.py")


def imports():  # type: ignore[no-untyped-def]
    import torch  # noqa: F401

    from modules import paths, sd_models, shared, shared_init, timer  # noqa: F401

    shared_init.initialize()
