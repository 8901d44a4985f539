"""`ui.create_ui()` reduced to what extensions observe: `on_ui_settings` first (UiSettings.register_settings), then
both script runners are initialized and their script UIs built (`Script.ui()` fixes args_from/args_to; inside a
`gr.Blocks()` when gradio is importable), then `on_ui_tabs` (only when gradio is importable; the fake records the
skip in `ui_tabs_skipped`), then the settings UI (`opts.reorder()`, which rebinds `opts.data_labels`)."""

from __future__ import annotations

import contextlib

from modules import script_callbacks, scripts, shared

#: fake-only: the tabs returned by on_ui_tabs at the last create_ui(), and whether they were skipped (no gradio)
ui_tabs: list = []
ui_tabs_skipped = False


def gradio():  # type: ignore[no-untyped-def]
    try:
        import gradio as gr

        return gr
    except Exception:  # noqa: BLE001
        return None


def create_ui():  # type: ignore[no-untyped-def]
    global ui_tabs_skipped
    gr = gradio()
    script_callbacks.ui_settings_callback()  # UiSettings().register_settings()

    blocks = gr.Blocks(analytics_enabled=False) if gr is not None else contextlib.nullcontext()
    with blocks as demo:
        for runner, is_img2img in ((scripts.scripts_txt2img, False), (scripts.scripts_img2img, True)):
            runner.initialize_scripts(is_img2img=is_img2img)
            runner.setup_ui()
        # the real host imports modules.api.models here (create_script_ui_inner), after register_settings
        import modules.api.models  # noqa: F401

        ui_tabs.clear()
        if gr is not None:
            ui_tabs.extend(script_callbacks.ui_tabs_callback())
            ui_tabs_skipped = False
        else:
            ui_tabs_skipped = True

    shared.opts.reorder()
    return demo if gr is not None else None
