"""Request/response models generated from the processing classes, like modules/api/models.py.

`OptionsModel` is built ONCE, at first import, from the `opts.data_labels` known then: in --nowebui this happens
before `ui.create_ui()` runs `on_ui_settings`, so settings added there are dropped from GET /sdapi/v1/options
(extra keys are ignored by the response model); in UI mode the import happens after register_settings."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import pydantic
from pydantic import BaseModel, Field, create_model

from modules.processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img
from modules.shared import opts

if hasattr(BaseModel, "model_validate"):  # pydantic 2 (late 1.10.x have a ConfigDict too)
    IGNORE_EXTRA: Any = pydantic.ConfigDict(extra="ignore", protected_namespaces=())
else:  # pydantic 1.10, what A1111 1.10.1 pins (its real models use this style)
    class IGNORE_EXTRA:  # type: ignore[no-redef]
        extra = "ignore"


def copy_model(model: BaseModel, update: dict[str, Any]) -> BaseModel:
    """`model_copy` in pydantic 2, `copy` in pydantic 1."""
    return (model.model_copy if hasattr(model, "model_copy") else model.copy)(update=update)


API_NOT_ALLOWED = [
    "self", "kwargs", "sd_model", "outpath_samples", "outpath_grids", "sampler_index", "extra_generation_params",
    "overlay_images", "do_not_reload_embeddings", "seed_enable_extras", "prompt_for_display",
    "sampler_noise_scheduler_override", "ddim_discretize",
]

_SIMPLE = {int, float, str, bool, dict, list}


def _fields_of(cls) -> dict[str, tuple[Any, Any]]:  # type: ignore[no-untyped-def]
    out: dict[str, tuple[Any, Any]] = {}
    hints = {}
    for klass in reversed(cls.__mro__):
        hints.update(getattr(klass, "__annotations__", {}))
    for f in dataclasses.fields(cls):
        if not f.init or f.name in API_NOT_ALLOWED:
            continue
        ann = hints.get(f.name, "Any")
        typ = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "list": list}.get(str(ann), Any)
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, property):
            default = None
        out[f.name] = (Optional[typ] if typ in _SIMPLE else Any, default)  # noqa: UP045
    return out


def _generate(name: str, cls, extra: dict[str, tuple[Any, Any]]):  # type: ignore[no-untyped-def]
    fields = _fields_of(cls)
    fields.update(extra)
    return create_model(name, __config__=IGNORE_EXTRA, **fields)


StableDiffusionTxt2ImgProcessingAPI = _generate("StableDiffusionProcessingTxt2Img", StableDiffusionProcessingTxt2Img, {
    "sampler_index": (str, "Euler"),
    "script_name": (Optional[str], None),  # noqa: UP045
    "script_args": (list, []),
    "send_images": (bool, True),
    "save_images": (bool, False),
    "alwayson_scripts": (dict, {}),
    "infotext": (Optional[str], None),  # noqa: UP045
})

StableDiffusionImg2ImgProcessingAPI = _generate("StableDiffusionProcessingImg2Img", StableDiffusionProcessingImg2Img, {
    "sampler_index": (str, "Euler"),
    "init_images": (Optional[list], None),  # noqa: UP045
    "denoising_strength": (float, 0.75),
    "mask": (Optional[str], None),  # noqa: UP045
    "include_init_images": (bool, False),
    "script_name": (Optional[str], None),  # noqa: UP045
    "script_args": (list, []),
    "send_images": (bool, True),
    "save_images": (bool, False),
    "alwayson_scripts": (dict, {}),
    "infotext": (Optional[str], None),  # noqa: UP045
})


class TextToImageResponse(BaseModel):
    images: list[str] | None = Field(default=None, title="Image")
    parameters: dict
    info: str


class ImageToImageResponse(BaseModel):
    images: list[str] | None = Field(default=None, title="Image")
    parameters: dict
    info: str


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: str | None = None
    textinfo: str | None = None


class SDModelItem(BaseModel):
    if hasattr(BaseModel, "model_validate"):
        model_config = pydantic.ConfigDict(protected_namespaces=())
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


def _option_type(default):  # type: ignore[no-untyped-def]
    if default is None or isinstance(default, (list, dict)):
        return Any
    return Optional[type(default)]  # noqa: UP045


_options = {k: (_option_type(v.default), v.default) for k, v in opts.data_labels.items()}
OptionsModel = create_model("Options", __config__=IGNORE_EXTRA, **_options)

_flags = {}
for action in __import__("modules.shared", fromlist=["parser"]).parser._actions:
    if action.dest == "help":
        continue
    _flags[action.dest] = (Any, action.default)
FlagsModel = create_model("Flags", __config__=IGNORE_EXTRA, **_flags)
