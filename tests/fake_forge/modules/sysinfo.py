"""Forge's `modules/sysinfo.set_config(req, is_api, run_callbacks, save_config)`, which processing uses to apply (and
restore) override_settings: unchanged values are skipped; `sd_model_checkpoint` goes through
`main_entry.checkpoint_change(..., save=False, refresh=False)` and `forge_additional_modules` through
`modules_change`, either one refreshing the model-loading parameters afterwards; every other key is `opts.set`."""

from __future__ import annotations

from typing import Any


def set_config(req: dict[str, Any], is_api=False, run_callbacks=True, save_config=True):  # type: ignore[no-untyped-def]
    from modules_forge import main_entry

    from modules import sd_models, shared

    refresh = False
    for k, v in req.items():
        if v == shared.opts.data.get(k):
            continue
        if k == "sd_model_checkpoint":
            if v is not None and v not in sd_models.checkpoint_aliases:
                raise RuntimeError(f"model {v!r} not found")
            refresh = main_entry.checkpoint_change(v, save=False, refresh=False) or refresh
        elif k == "forge_additional_modules":
            refresh = main_entry.modules_change(v, save=False, refresh=False) or refresh
        else:
            shared.opts.set(k, v, is_api=is_api, run_callbacks=run_callbacks)
    if refresh:
        main_entry.refresh_model_loading_parameters()
    if save_config:
        shared.opts.save(shared.config_filename)
