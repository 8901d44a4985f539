"""Boot sequences of `webui.py` (v1.10.1), without servers: `api_only()` for --nowebui and `webui()` for the UI
mode, plus the Reload UI path. Each returns (demo, app); the caller serves `app` (e.g. a fastapi TestClient)."""

from __future__ import annotations

from modules import initialize


def create_api(app):  # type: ignore[no-untyped-def]
    from modules.api.api import Api
    from modules.call_queue import queue_lock

    return Api(app, queue_lock)


def api_only():  # type: ignore[no-untyped-def]
    """--nowebui: initialize -> FastAPI app -> Api (which runs ui.create_ui: on_ui_settings/on_ui_tabs) ->
    before_ui -> app_started(None, app)."""
    from fastapi import FastAPI
    from modules import script_callbacks
    from modules.shared_cmd_options import cmd_opts

    initialize.initialize()
    app = FastAPI()
    api = create_api(app)
    script_callbacks.before_ui_callback()
    script_callbacks.app_started_callback(None, app)
    print(f"Startup time: api only, port {cmd_opts.port or 7861}")
    return None, app, api


def webui(*, reload=False):  # type: ignore[no-untyped-def]
    """UI mode (one iteration of the server loop): [initialize] -> before_ui -> create_ui -> "launch" (new app) ->
    Api if --api -> app_started(demo, app). (After a fake Reload UI of a --nowebui host the Api is rebuilt too.)"""
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
    """Reload UI: on_before_reload -> script_unloaded -> initialize_rest(reload_script_modules=True) (load_scripts
    clears callbacks and re-executes every script, then list_unets); the server loop then runs webui() again."""
    from modules import script_callbacks

    script_callbacks.app_reload_callback()
    script_callbacks.script_unloaded_callback()
    initialize.initialize_rest(reload_script_modules=True)
    return webui(reload=True)
