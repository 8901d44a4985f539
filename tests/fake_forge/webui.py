"""Boot sequences without servers (`api_only()` for --nowebui, `webui()` for the UI order, `reload_ui()`), in the
order the fake A1111's webui.py has (Forge keeps A1111's startup callbacks: before_ui, app_started); Forge's own
differences are in `modules.initialize` (no model at startup) and `modules.ui` (forge_main_entry)."""

from __future__ import annotations

from modules import initialize


def create_api(app):  # type: ignore[no-untyped-def]
    from modules.api.api import Api
    from modules.call_queue import queue_lock

    return Api(app, queue_lock)


def api_only():  # type: ignore[no-untyped-def]
    from fastapi import FastAPI
    from modules import script_callbacks

    initialize.initialize()
    app = FastAPI()
    api = create_api(app)
    script_callbacks.before_ui_callback()
    script_callbacks.app_started_callback(None, app)
    return None, app, api


def webui(*, reload=False):  # type: ignore[no-untyped-def]
    from fastapi import FastAPI
    from modules import script_callbacks, shared, ui

    if not reload:
        initialize.initialize()
    script_callbacks.before_ui_callback()
    shared.demo = ui.create_ui()
    app = FastAPI()
    api = create_api(app) if shared.cmd_opts.api or shared.cmd_opts.nowebui else None
    script_callbacks.app_started_callback(shared.demo, app)
    return shared.demo, app, api


def reload_ui():  # type: ignore[no-untyped-def]
    from modules import script_callbacks

    script_callbacks.app_reload_callback()
    script_callbacks.script_unloaded_callback()
    initialize.initialize_rest(reload_script_modules=True)
    return webui(reload=True)
