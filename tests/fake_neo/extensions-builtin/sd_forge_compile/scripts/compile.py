"""Stand-in of Neo's built-in `extensions-builtin/sd_forge_compile/scripts/compile.py` (N @f95f632; a port of
ComfyUI's nodes_torch_compile): an always-visible script (sorting_priority 99999) whose one argument is the preset
("Automatic", "Disable", "guard_filter_fn", "dynamic", "max-autotune", ...; exo101 localised the labels, :86-87).
In `process_batch` (after the extra networks, before any sampling) on `p.sd_model.forge_objects.unet.model` (the
KModel): "Disable" (or "Automatic" when it is not compiled) removes the wrapper; a preset equal to the KModel's
`_torch_compile_config` does nothing; another one stores `_torch_compile_config`, keeps `kmodel.apply_model` as
`kmodel._orig_apply_model` and sets `kmodel.apply_model` to a wrapper that, per call, compiles WHATEVER
`diffusion_model` is at that moment (`get_attr`), sets the compiled module in with `set_attr_raw`, runs the original
`apply_model` and puts the module back (:132-146). Fake-only: "compiling" is the identity wrapper
`CompiledForTest(module)` (a torch.compile'd module forwards to the original as well; no inductor on the CPU here),
and `compiled` records each compiled module's class name. The title is upstream's English one."""

from __future__ import annotations

from functools import wraps

import torch
from backend.utils import get_attr, set_attr_raw
from modules import scripts

_COMPILE_CONFIG_KEY = "_torch_compile_config"
_ORIG_APPLY_KEY = "_orig_apply_model"
compiled: list = []


class CompiledForTest(torch.nn.Module):
    def __init__(self, module):  # type: ignore[no-untyped-def]
        super().__init__()
        self.__dict__["_orig_mod"] = module

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.__dict__["_orig_mod"](*args, **kwargs)


def fake_compile(module, **config):  # type: ignore[no-untyped-def]
    compiled.append(type(module).__name__)
    return CompiledForTest(module)


class TorchCompileForForge(scripts.Script):
    sorting_priority = 99999

    def title(self):  # type: ignore[no-untyped-def]
        return "Torch Compile"

    def show(self, is_img2img):  # type: ignore[no-untyped-def]
        return scripts.AlwaysVisible

    def ui(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return [None]

    def process_batch(self, p, preset=None, **kwargs):  # type: ignore[no-untyped-def]
        preset = preset or "Automatic"
        kmodel = p.sd_model.forge_objects.unet.model
        prev_config = getattr(kmodel, _COMPILE_CONFIG_KEY, None)
        enable = (prev_config is not None) if preset == "Automatic" else (preset != "Disable")
        if not enable:
            self._remove_compile_wrapper(kmodel)
            return
        config = (preset,)
        if config == prev_config:
            return
        setattr(kmodel, _COMPILE_CONFIG_KEY, config)
        if prev_config is not None:
            self._remove_compile_wrapper(kmodel)
        self._wrap_apply_model(kmodel, {"dynamic": preset == "dynamic"})

    def postprocess(self, p, processed, *args):  # type: ignore[no-untyped-def]
        pass

    @staticmethod
    def _wrap_apply_model(kmodel, compile_config):  # type: ignore[no-untyped-def]
        setattr(kmodel, _ORIG_APPLY_KEY, kmodel.apply_model)

        @wraps(kmodel._orig_apply_model)
        def apply_model_with_compile(*args, **kwargs):  # type: ignore[no-untyped-def]
            orig_model = get_attr(kmodel, "diffusion_model")
            set_attr_raw(kmodel, "diffusion_model", fake_compile(orig_model, **compile_config))
            try:
                return kmodel._orig_apply_model(*args, **kwargs)
            finally:
                set_attr_raw(kmodel, "diffusion_model", orig_model)

        kmodel.apply_model = apply_model_with_compile

    @staticmethod
    def _remove_compile_wrapper(kmodel):  # type: ignore[no-untyped-def]
        orig = getattr(kmodel, _ORIG_APPLY_KEY, None)
        if orig is not None:
            kmodel.apply_model = orig
            delattr(kmodel, _ORIG_APPLY_KEY)
            delattr(kmodel, _COMPILE_CONFIG_KEY)
