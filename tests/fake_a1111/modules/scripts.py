"""Scripts: the `Script` base with every hook of §2.2, `ScriptRunner` (hooks get `p.script_args[args_from:args_to]`;
exceptions are reported, never raised), and `load_scripts()` which clears callbacks, imports every enabled
extension's `scripts/*.py` (module name = file basename, not in sys.modules) with the extension root prepended to
sys.path for the import only, and rebuilds the txt2img/img2img runners."""

from __future__ import annotations

import os
import sys
from collections import namedtuple
from dataclasses import dataclass

from modules import errors, extensions, paths, script_callbacks, script_loading, timer

AlwaysVisible = object()


class MaskBlendArgs:
    def __init__(self, current_latent, nmask, init_latent, mask, blended_latent, denoiser=None, sigma=None):  # type: ignore[no-untyped-def]
        self.current_latent, self.nmask, self.init_latent = current_latent, nmask, init_latent
        self.mask, self.blended_latent, self.denoiser, self.sigma = mask, blended_latent, denoiser, sigma
        self.is_final_blend = denoiser is None


class PostSampleArgs:
    def __init__(self, samples):  # type: ignore[no-untyped-def]
        self.samples = samples


class PostprocessImageArgs:
    def __init__(self, image):  # type: ignore[no-untyped-def]
        self.image = image


class PostprocessBatchListArgs:
    def __init__(self, images):  # type: ignore[no-untyped-def]
        self.images = images


@dataclass
class OnComponent:
    component: object


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    on_before_component_elem_id = None
    on_after_component_elem_id = None
    setup_for_ui_only = False
    controls = None
    sorting_priority = 0

    def title(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError()

    def ui(self, is_img2img):  # type: ignore[no-untyped-def]
        pass

    def show(self, is_img2img):  # type: ignore[no-untyped-def]
        return True

    def run(self, p, *args):  # type: ignore[no-untyped-def]
        pass

    def setup(self, p, *args):  # type: ignore[no-untyped-def]
        pass

    def before_process(self, p, *args):  # type: ignore[no-untyped-def]
        pass

    def process(self, p, *args):  # type: ignore[no-untyped-def]
        pass

    def before_process_batch(self, p, *args, **kwargs):  # type: ignore[no-untyped-def]
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):  # type: ignore[no-untyped-def]
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):  # type: ignore[no-untyped-def]
        pass

    def process_batch(self, p, *args, **kwargs):  # type: ignore[no-untyped-def]
        pass

    def postprocess_batch(self, p, *args, **kwargs):  # type: ignore[no-untyped-def]
        pass

    def postprocess_batch_list(self, p, pp, *args, **kwargs):  # type: ignore[no-untyped-def]
        pass

    def on_mask_blend(self, p, mba, *args):  # type: ignore[no-untyped-def]
        pass

    def post_sample(self, p, ps, *args):  # type: ignore[no-untyped-def]
        pass

    def postprocess_image(self, p, pp, *args):  # type: ignore[no-untyped-def]
        pass

    def postprocess_maskoverlay(self, p, ppmo, *args):  # type: ignore[no-untyped-def]
        pass

    def postprocess_image_after_composite(self, p, pp, *args):  # type: ignore[no-untyped-def]
        pass

    def before_component(self, component, **kwargs):  # type: ignore[no-untyped-def]
        pass

    def after_component(self, component, **kwargs):  # type: ignore[no-untyped-def]
        pass

    def on_before_component(self, callback, *, elem_id):  # type: ignore[no-untyped-def]
        pass

    def on_after_component(self, callback, *, elem_id):  # type: ignore[no-untyped-def]
        pass

    def describe(self):  # type: ignore[no-untyped-def]
        return ""

    def elem_id(self, item_id):  # type: ignore[no-untyped-def]
        import re

        need_tabname = self.show(True) == self.show(False)
        tabkind = "img2img" if self.is_img2img else "txt2img"
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"

    def before_hr(self, p, *args):  # type: ignore[no-untyped-def]
        pass


class ScriptBuiltinUI(Script):
    setup_for_ui_only = True


current_basedir = paths.script_path


def basedir():  # type: ignore[no-untyped-def]
    """The extension root of the script being imported (the install dir otherwise)."""
    return current_basedir


ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])

scripts_data: list[ScriptClassData] = []
postprocessing_scripts_data: list = []


def list_scripts(scriptdirname, extension, *, include_extensions=True):  # type: ignore[no-untyped-def]
    scripts_list = []
    basedir_ = os.path.join(paths.script_path, scriptdirname)
    if os.path.exists(basedir_):
        scripts_list += [ScriptFile(paths.script_path, f, os.path.join(basedir_, f))
                         for f in sorted(os.listdir(basedir_))]
    if include_extensions:
        for ext in extensions.active():
            scripts_list += ext.list_files(scriptdirname, extension)
    return [x for x in scripts_list if os.path.splitext(x.path)[1].lower() == extension and os.path.isfile(x.path)]


def load_scripts():  # type: ignore[no-untyped-def]
    global current_basedir, scripts_txt2img, scripts_img2img, scripts_postproc
    scripts_data.clear()
    postprocessing_scripts_data.clear()
    script_callbacks.clear_callbacks()

    scripts_list = list_scripts("scripts", ".py")
    syspath = sys.path

    def register_scripts_from_module(module, scriptfile):  # type: ignore[no-untyped-def]
        for script_class in module.__dict__.values():
            if not isinstance(script_class, type):
                continue
            if issubclass(script_class, Script) and script_class is not Script and script_class is not ScriptBuiltinUI:
                scripts_data.append(ScriptClassData(script_class, scriptfile.path, scriptfile.basedir, module))

    for scriptfile in scripts_list:
        try:
            if scriptfile.basedir != paths.script_path:
                sys.path = [scriptfile.basedir] + sys.path
            current_basedir = scriptfile.basedir
            script_module = script_loading.load_module(scriptfile.path)
            register_scripts_from_module(script_module, scriptfile)
        except Exception:  # noqa: BLE001
            errors.report(f"Error loading script: {scriptfile.filename}", exc_info=True)
        finally:
            sys.path = syspath
            current_basedir = paths.script_path
            timer.startup_timer.record(scriptfile.filename)

    scripts_txt2img = ScriptRunner()
    scripts_img2img = ScriptRunner()
    scripts_postproc = None


def wrap_call(func, filename, funcname, *args, default=None, **kwargs):  # type: ignore[no-untyped-def]
    try:
        return func(*args, **kwargs)
    except Exception:  # noqa: BLE001
        errors.report(f"Error calling: {filename}/{funcname}", exc_info=True)
    return default


class ScriptRunner:
    def __init__(self):  # type: ignore[no-untyped-def]
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []
        self.titles = []
        self.title_map = {}
        self.infotext_fields = []
        self.paste_field_names = []
        self.inputs = [None]
        self.callback_map = {}
        self.callback_names = []
        self.on_before_component_elem_id = {}
        self.on_after_component_elem_id = {}
        self.is_img2img = False

    def initialize_scripts(self, is_img2img):  # type: ignore[no-untyped-def]
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()
        self.is_img2img = is_img2img
        for script_data in scripts_data:
            script = script_data.script_class()
            script.filename = script_data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)
        self.callback_map.clear()
        self.alwayson_scripts.sort(key=lambda x: (x.sorting_priority, x.title() if x.title else ""))

    def create_script_ui(self, script):  # type: ignore[no-untyped-def]
        script.args_from = len(self.inputs)
        script.args_to = len(self.inputs)
        controls = wrap_call(script.ui, script.filename, "ui", script.is_img2img)
        script.controls = controls
        if controls is None:
            return
        script.name = wrap_call(script.title, script.filename, "title", default=script.filename).lower()
        self.inputs += list(controls)
        script.args_to = len(self.inputs)

    def setup_ui_for_section(self, section, scriptlist=None):  # type: ignore[no-untyped-def]
        for script in scriptlist if scriptlist is not None else self.alwayson_scripts:
            self.create_script_ui(script)

    def prepare_ui(self):  # type: ignore[no-untyped-def]
        self.inputs = [None]

    def setup_ui(self):  # type: ignore[no-untyped-def]
        self.titles = [wrap_call(s.title, s.filename, "title") or s.filename for s in self.selectable_scripts]
        self.inputs = [None]
        for script in self.alwayson_scripts:
            self.create_script_ui(script)
        for script in self.selectable_scripts:
            self.create_script_ui(script)
        self.title_map = {title.lower(): script for title, script in zip(self.titles, self.selectable_scripts)}
        return self.inputs

    def run(self, p, *args):  # type: ignore[no-untyped-def]
        script_index = args[0]
        if script_index == 0 or script_index is None:
            return None
        script = self.selectable_scripts[script_index - 1]
        if script is None:
            return None
        script_args = args[script.args_from:script.args_to]
        return script.run(p, *script_args)

    def _each(self, hook: str, p, *extra, **kwargs):  # type: ignore[no-untyped-def]
        for script in self.alwayson_scripts:
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, hook)(p, *extra, *script_args, **kwargs)
            except Exception:  # noqa: BLE001
                errors.report(f"Error running {hook}: {script.filename}", exc_info=True)

    def before_process(self, p):  # type: ignore[no-untyped-def]
        self._each("before_process", p)

    def process(self, p):  # type: ignore[no-untyped-def]
        self._each("process", p)

    def process_before_every_sampling(self, p, **kwargs):  # type: ignore[no-untyped-def]
        self._each("process_before_every_sampling", p, **kwargs)

    def before_process_batch(self, p, **kwargs):  # type: ignore[no-untyped-def]
        self._each("before_process_batch", p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):  # type: ignore[no-untyped-def]
        self._each("after_extra_networks_activate", p, **kwargs)

    def process_batch(self, p, **kwargs):  # type: ignore[no-untyped-def]
        self._each("process_batch", p, **kwargs)

    def postprocess(self, p, processed):  # type: ignore[no-untyped-def]
        self._each("postprocess", p, processed)

    def postprocess_batch(self, p, images, **kwargs):  # type: ignore[no-untyped-def]
        self._each("postprocess_batch", p, images=images, **kwargs)

    def postprocess_batch_list(self, p, pp, **kwargs):  # type: ignore[no-untyped-def]
        self._each("postprocess_batch_list", p, pp, **kwargs)

    def post_sample(self, p, ps):  # type: ignore[no-untyped-def]
        self._each("post_sample", p, ps)

    def on_mask_blend(self, p, mba):  # type: ignore[no-untyped-def]
        self._each("on_mask_blend", p, mba)

    def postprocess_image(self, p, pp):  # type: ignore[no-untyped-def]
        self._each("postprocess_image", p, pp)

    def before_hr(self, p):  # type: ignore[no-untyped-def]
        self._each("before_hr", p)

    def setup_scrips(self, p, *, is_ui=True):  # type: ignore[no-untyped-def]
        for script in self.alwayson_scripts:
            if not is_ui and script.setup_for_ui_only:
                continue
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                script.setup(p, *script_args)
            except Exception:  # noqa: BLE001
                errors.report(f"Error running setup: {script.filename}", exc_info=True)


scripts_txt2img: ScriptRunner = None  # type: ignore[assignment]
scripts_img2img: ScriptRunner = None  # type: ignore[assignment]
scripts_postproc = None
scripts_current = None
