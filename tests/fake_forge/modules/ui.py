"""`ui.create_ui()`: the fake A1111's (on_ui_settings, script UIs, on_ui_tabs when gradio is importable), then, as
Forge's ui.py does at the end of building the UI, `modules_forge.main_entry.forge_main_entry()` (which sets the
model-loading parameters)."""

from __future__ import annotations

from modules import a1111

_base = a1111("ui")
gradio = _base.gradio
ui_tabs = _base.ui_tabs


def __getattr__(name):  # type: ignore[no-untyped-def]
    return getattr(_base, name)  # ui_tabs_skipped and the rest, as the A1111 fake sets them


def create_ui():  # type: ignore[no-untyped-def]
    from modules_forge import main_entry

    demo = _base.create_ui()
    main_entry.forge_main_entry()
    return demo
