"""The bodies of the REST API's requests and answers, as the OpenAPI schema describes them (pydantic 2, or pydantic
1.10 as A1111 1.10 pins it). Only BuildRequest validates anything; the answer models document what the routes
return, and those of the engine rows and /status are derived from the service's report dataclasses."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, ClassVar

import pydantic
from pydantic import BaseModel, Field

from sdtrt.webui.jobs import JobState
from sdtrt.webui.prediction import CallRoute, Coverage, PassRoute
from sdtrt.webui.readiness import ReadyReport
from sdtrt.webui.reports import EngineListing, StatusReport

MAX_PROFILES = 32
MAX_PROFILE_CHARS = 200
MAX_CHECKPOINT_CHARS = 1024

#: pydantic 2 configures models with ConfigDict (and bounds lists with max_length); pydantic 1 (A1111 pins 1.10) with
#: an inner Config class (and max_items). Detected by a v2-only method (1.10.x has a ConfigDict too), not the version.
_PYDANTIC_V2 = hasattr(pydantic.BaseModel, "model_validate")


class ErrorBody(BaseModel):
    error: str = Field(..., description="kind of error, e.g. ProfileError, Unauthorized, QueueFull")
    detail: str = Field(..., description="what was wrong and what to do")


_ProfileText = pydantic.constr(max_length=MAX_PROFILE_CHARS)


def _bounded_list(description: str, max_items: int, *, required: bool = True) -> Any:
    """A list field of at most `max_items` (pydantic 2 says max_length, pydantic 1 max_items); optional ones
    default to an empty list."""
    bound: dict[str, Any] = {"max_length" if _PYDANTIC_V2 else "max_items": max_items}
    if required:
        return Field(..., description=description, **bound)
    return Field(default_factory=list, description=description, **bound)


BUILD_EXAMPLE: dict[str, Any] = {
    "checkpoint": "v1-5-pruned-emaonly", "backend": "auto",
    "profiles": ["1x512x512x75", "1x512x512x75:2x768x768x150:4x1024x1024x225"],
}


class BuildRequest(BaseModel):
    checkpoint: str = Field(..., max_length=MAX_CHECKPOINT_CHARS,
                            description="checkpoint title or name as the WebUI lists it")
    profiles: list[_ProfileText] = _bounded_list(  # type: ignore[valid-type]
        "profiles BxHxWxT or min:opt:max of those, e.g. 1x512x512x75", MAX_PROFILES)
    backend: str = Field("auto", max_length=32, description="auto, tensorrt, tensorrt-rtx or onnxruntime")
    dtype: str | None = Field(None, max_length=16, description="float16 or float32 (default: the backend's)")
    controlnet: bool = Field(False, description="engine with ControlNet inputs (serves sd-webui-controlnet's "
                                                "ControlNet and T2I-Adapter units, and plain generations)")
    targets: list[str] = _bounded_list(
        "GPU compute capabilities to build for ahead of time (TensorRT-RTX; no GPU needed), e.g. ['sm86', "
        "'sm89']; empty: the GPU of this machine", 16, required=False)
    convention: str | None = Field(None, max_length=16, description=(
        "whose UNet numerics the engine follows at sizes that are not multiples of 64 px: a1111 (upsample x2, "
        "resize in the skip concatenation) or forge (upsample to the skip's size); default: the running WebUI's"))

    if _PYDANTIC_V2:
        model_config = pydantic.ConfigDict(extra="forbid", json_schema_extra={"examples": [BUILD_EXAMPLE]})
    else:  # pragma: no cover - pydantic 1 (A1111's pin)
        class Config:
            extra = "forbid"
            schema_extra: ClassVar[dict[str, Any]] = {"examples": [BUILD_EXAMPLE]}


def model_of(report: type, name: str) -> type[BaseModel]:
    """The answer model of a report dataclass (sdtrt.webui.reports): one field per dataclass field, with its type
    (nested reports as their own models), default and description. Works with pydantic 1 and 2."""
    if report in _DERIVED:
        return _DERIVED[report]
    hints = typing.get_type_hints(report)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(report):
        if f.default is not dataclasses.MISSING:
            default = Field(f.default, description=f.metadata.get("description"))
        elif f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory, description=f.metadata.get("description"))
        else:
            default = Field(..., description=f.metadata.get("description"))
        fields[f.name] = (_model_type(hints[f.name]), default)
    model = pydantic.create_model(name, **fields)  # type: ignore[call-overload]
    model.__doc__ = report.__doc__
    _DERIVED[report] = model
    return model  # type: ignore[no-any-return]


_DERIVED: dict[type, type[BaseModel]] = {}
#: answer model names the OpenAPI schema has always used
_NAMES = {CallRoute: "CoverageCall", PassRoute: "CoveragePass"}


def _model_type(hint: Any) -> Any:
    """`hint` with every report dataclass in it replaced by its answer model."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return model_of(hint, _NAMES.get(hint, hint.__name__ + "Body"))
    if isinstance(hint, type) and issubclass(hint, str) and issubclass(hint, enum.Enum):
        return str  # text, its values named in the description: the schema clients already know
    args = typing.get_args(hint)
    if not args:
        return hint
    mapped = tuple(_model_type(a) for a in args)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[mapped]  # noqa: UP007 - rebuilt from its parts
    return origin[mapped] if len(mapped) > 1 else origin[mapped[0]]


EngineRow = model_of(EngineListing, "EngineRow")


class EngineList(BaseModel):
    engines: list[EngineRow]


def _one_of(values: list[str]) -> str:
    return ", ".join(values[:-1]) + " or " + values[-1]


class JobBody(BaseModel):
    id: str
    # typed as text with the JobState values named, not as the enum: the schema stays what clients already know
    state: str = Field(..., description=_one_of([s.value for s in JobState]))
    phase: str
    progress: float
    request: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    engine_id: str | None
    created: float
    started: float | None
    finished: float | None


class JobAccepted(BaseModel):
    job_id: str
    job: JobBody


class JobList(BaseModel):
    jobs: list[JobBody]


class Deleted(BaseModel):
    deleted: str


StatusBody = model_of(StatusReport, "StatusBody")
ReadyBody = model_of(ReadyReport, "ReadyBody")


COVERAGE_HELP = ("the body of a /sdapi/v1/txt2img (or, with kind=img2img, /sdapi/v1/img2img) request, "
                 "override_settings included, e.g. {\"prompt\": \"a cat\", \"width\": 768, \"height\": 512, "
                 "\"batch_size\": 2, \"enable_hr\": true, \"hr_scale\": 2}")


CoverageBody = model_of(Coverage, "CoverageBody")


class EnabledRequest(BaseModel):
    enabled: bool

    if _PYDANTIC_V2:
        model_config = pydantic.ConfigDict(extra="forbid")
    else:  # pragma: no cover - pydantic 1 (A1111's pin)
        class Config:
            extra = "forbid"


class EnabledBody(BaseModel):
    enabled: bool


class RescanBody(BaseModel):
    changed: bool = Field(..., description="engines were published into or removed from the cache since the SD Unet "
                                           "list was built; the next generation uses the new list")
    engines: list[str] = Field(..., description="the engines that can serve here now")
