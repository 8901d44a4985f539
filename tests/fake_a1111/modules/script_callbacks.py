"""Callbacks, as `modules/script_callbacks.py` (v1.9+ form: `on_X(callback, *, name=None)`).

Callbacks run in registration order (metadata.ini / `prioritized_callbacks_*` ordering is not reproduced);
`before_ui` and `script_unloaded` run in reverse. Exceptions are reported through `errors.report` and never
propagate. A callback's `script` is the file that registered it."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

from modules import errors, timer


def report_exception(c, job):  # type: ignore[no-untyped-def]
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):  # type: ignore[no-untyped-def]
        self.image, self.p, self.filename, self.pnginfo = image, p, filename, pnginfo


class ExtraNoiseParams:
    def __init__(self, noise, x, xi):  # type: ignore[no-untyped-def]
        self.noise, self.x, self.xi = noise, x, xi


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,  # type: ignore[no-untyped-def]
                 denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):  # type: ignore[no-untyped-def]
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):  # type: ignore[no-untyped-def]
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


class UiTrainTabParams:
    def __init__(self, txt2img_preview_params):  # type: ignore[no-untyped-def]
        self.txt2img_preview_params = txt2img_preview_params


class ImageGridLoopParams:
    def __init__(self, imgs, cols, rows):  # type: ignore[no-untyped-def]
        self.imgs, self.cols, self.rows = imgs, cols, rows


@dataclasses.dataclass
class BeforeTokenCounterParams:
    prompt: str
    steps: int
    styles: list
    is_positive: bool = True


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: Callable
    name: str | None = None


def add_callback(callbacks, fun, *, name=None, category="unknown", filename=None):  # type: ignore[no-untyped-def]
    if filename is None:
        filename = _caller_filename()
    extension = _extension_of(filename)
    extension_name = extension.canonical_name if extension else "base"
    callback_name = f"{extension_name}/{os.path.basename(filename)}/{category}"
    if name is not None:
        callback_name += f"/{name}"
    unique_callback_name = callback_name
    for index in range(1000):
        existing = any(x.name == unique_callback_name for x in callbacks)
        if not existing:
            break
        unique_callback_name = f"{callback_name}-{index + 1}"
    callbacks.append(ScriptCallback(filename, fun, unique_callback_name))


def _caller_filename() -> str:
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else "unknown file"


def _extension_of(filename: str):  # type: ignore[no-untyped-def]
    try:
        from modules import extensions
    except Exception:  # noqa: BLE001
        return None
    return extensions.find_extension(filename)


def sort_callbacks(category, unordered_callbacks, *, enable_user_sort=True):  # type: ignore[no-untyped-def]
    return list(unordered_callbacks)


def ordered_callbacks(category, unordered_callbacks=None, *, enable_user_sort=True):  # type: ignore[no-untyped-def]
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get("callbacks_" + category, [])
    return list(unordered_callbacks)


def enumerate_callbacks():  # type: ignore[no-untyped-def]
    for category, callbacks in callback_map.items():
        category = category.removeprefix("callbacks_")
        yield category, callbacks


callback_map: dict[str, list[ScriptCallback]] = {
    "callbacks_app_started": [],
    "callbacks_model_loaded": [],
    "callbacks_ui_tabs": [],
    "callbacks_ui_train_tabs": [],
    "callbacks_ui_settings": [],
    "callbacks_before_image_saved": [],
    "callbacks_image_saved": [],
    "callbacks_extra_noise": [],
    "callbacks_cfg_denoiser": [],
    "callbacks_cfg_denoised": [],
    "callbacks_cfg_after_cfg": [],
    "callbacks_before_component": [],
    "callbacks_after_component": [],
    "callbacks_image_grid": [],
    "callbacks_infotext_pasted": [],
    "callbacks_script_unloaded": [],
    "callbacks_before_ui": [],
    "callbacks_on_reload": [],
    "callbacks_list_optimizers": [],
    "callbacks_list_unets": [],
    "callbacks_before_token_counter": [],
}


def clear_callbacks():  # type: ignore[no-untyped-def]
    for callback_list in callback_map.values():
        callback_list.clear()


def _run(category: str, *args: Any, reverse: bool = False, collect: bool = False):  # type: ignore[no-untyped-def]
    res = []
    cbs = ordered_callbacks(category)
    for c in (reversed(cbs) if reverse else cbs):
        try:
            out = c.callback(*args)
            if collect:
                res.append(out)
            timer.startup_timer.record(os.path.basename(c.script))
        except Exception:  # noqa: BLE001
            report_exception(c, category)
    return res


def app_started_callback(demo, app):  # type: ignore[no-untyped-def]
    _run("app_started", demo, app)


def app_reload_callback():  # type: ignore[no-untyped-def]
    _run("on_reload")


def model_loaded_callback(sd_model):  # type: ignore[no-untyped-def]
    _run("model_loaded", sd_model)


def ui_tabs_callback():  # type: ignore[no-untyped-def]
    res = []
    for out in _run("ui_tabs", collect=True):
        res += out or []
    return res


def ui_train_tabs_callback(params):  # type: ignore[no-untyped-def]
    _run("ui_train_tabs", params)


def ui_settings_callback():  # type: ignore[no-untyped-def]
    _run("ui_settings")


def before_image_saved_callback(params):  # type: ignore[no-untyped-def]
    _run("before_image_saved", params)


def image_saved_callback(params):  # type: ignore[no-untyped-def]
    _run("image_saved", params)


def extra_noise_callback(params):  # type: ignore[no-untyped-def]
    _run("extra_noise", params)


def cfg_denoiser_callback(params):  # type: ignore[no-untyped-def]
    _run("cfg_denoiser", params)


def cfg_denoised_callback(params):  # type: ignore[no-untyped-def]
    _run("cfg_denoised", params)


def cfg_after_cfg_callback(params):  # type: ignore[no-untyped-def]
    _run("cfg_after_cfg", params)


def before_component_callback(component, **kwargs):  # type: ignore[no-untyped-def]
    for c in ordered_callbacks("before_component"):
        try:
            c.callback(component, **kwargs)
        except Exception:  # noqa: BLE001
            report_exception(c, "before_component")


def after_component_callback(component, **kwargs):  # type: ignore[no-untyped-def]
    for c in ordered_callbacks("after_component"):
        try:
            c.callback(component, **kwargs)
        except Exception:  # noqa: BLE001
            report_exception(c, "after_component")


def image_grid_callback(params):  # type: ignore[no-untyped-def]
    _run("image_grid", params)


def infotext_pasted_callback(infotext, params):  # type: ignore[no-untyped-def]
    _run("infotext_pasted", infotext, params)


def script_unloaded_callback():  # type: ignore[no-untyped-def]
    _run("script_unloaded", reverse=True)


def before_ui_callback():  # type: ignore[no-untyped-def]
    _run("before_ui", reverse=True)


def list_optimizers_callback():  # type: ignore[no-untyped-def]
    res: list = []
    _run("list_optimizers", res)
    return res


def list_unets_callback():  # type: ignore[no-untyped-def]
    res: list = []
    _run("list_unets", res)
    return res


def before_token_counter_callback(params):  # type: ignore[no-untyped-def]
    _run("before_token_counter", params)


def remove_current_script_callbacks():  # type: ignore[no-untyped-def]
    filename = _caller_filename()
    if filename == "unknown file":
        return
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.script == filename]:
            callback_list.remove(callback_to_remove)


def remove_callbacks_for_function(callback_func):  # type: ignore[no-untyped-def]
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(callback_to_remove)


def _registrar(category: str, map_key: str | None = None):  # type: ignore[no-untyped-def]
    key = map_key or f"callbacks_{category}"

    def on(callback, *, name=None):  # type: ignore[no-untyped-def]
        add_callback(callback_map[key], callback, name=name, category=category)

    on.__name__ = f"on_{category}"
    return on


on_app_started = _registrar("app_started")
on_before_reload = _registrar("on_reload")
on_model_loaded = _registrar("model_loaded")
on_ui_tabs = _registrar("ui_tabs")
on_ui_train_tabs = _registrar("ui_train_tabs")
on_ui_settings = _registrar("ui_settings")
on_before_image_saved = _registrar("before_image_saved")
on_image_saved = _registrar("image_saved")
on_extra_noise = _registrar("extra_noise")
on_cfg_denoiser = _registrar("cfg_denoiser")
on_cfg_denoised = _registrar("cfg_denoised")
on_cfg_after_cfg = _registrar("cfg_after_cfg")
on_before_component = _registrar("before_component")
on_after_component = _registrar("after_component")
on_image_grid = _registrar("image_grid")
on_infotext_pasted = _registrar("infotext_pasted")
on_script_unloaded = _registrar("script_unloaded")
on_before_ui = _registrar("before_ui")
on_list_optimizers = _registrar("list_optimizers")
on_list_unets = _registrar("list_unets")
on_before_token_counter = _registrar("before_token_counter")
