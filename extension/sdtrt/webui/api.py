"""The extension's REST API under /sdtrt/v1, for operators who build engines headlessly behind a load balancer.

    GET    /sdtrt/v1/engines              engines in the cache, ok or stale with the reason
    POST   /sdtrt/v1/engines              {checkpoint, profiles, backend?, dtype?} -> 202 {job_id}
    DELETE /sdtrt/v1/engines/{id}         remove an engine (409 while it serves the active SD Unet)
    POST   /sdtrt/v1/engines/{id}/rebuild rebuild a stale engine for this machine -> 202 {job_id}
    GET    /sdtrt/v1/jobs                 all known build jobs
    GET    /sdtrt/v1/jobs/{id}            one job: state queued|running|done|failed|cancelled, progress, result
    DELETE /sdtrt/v1/jobs/{id}            cancel a queued or running build
    GET    /sdtrt/v1/status               active engine, backend, counters (engine calls, fallbacks and why, refits)

Guards, in this order, before a route runs:

- With the WebUI's --api-auth set, every route takes those credentials (HTTP Basic), else 401. The routes are
  added by the extension, so A1111's own --api-auth check does not cover them; this one does.
- When the WebUI is reachable from other machines (--listen, --share, --ngrok, a non-loopback --server-name) and
  --api-auth is not set, the routes that change something (POST, DELETE) answer 403; reading still works.
- A request body larger than MAX_BODY_BYTES is refused with 413 before it is read further.

Ids are never paths: engine and job ids must match their patterns (400 otherwise) and the registry resolves them
under the cache folder only. Identical build requests while one is queued or running share its job; past the
queue's cap a build answers 429 (see jobs.JobQueue). Errors are always JSON {"error": <kind>, "detail": <message>}:
400 (bad input), 401, 403, 404 (unknown id), 409 (in use), 413, 422 (malformed body), 429, 503 (cache folder not writable) or, for a bug, 500.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import ipaddress
import json
import secrets
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, ClassVar

import fastapi
import pydantic
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException  # FastAPI's own is a subclass; it raises both
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from sdtrt.errors import CacheNotWritable, EngineNotFound, SdtrtError
from sdtrt.registry import InvalidEngineId
from sdtrt.webui.jobs import JobNotFound, QueueFull
from sdtrt.webui.service import EngineInUse, EngineService

PREFIX = "/sdtrt/v1"
#: Largest request body the routes accept. A build request is a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024
#: The registry's engine id alphabet (it also refuses '..'); job ids are uuid4 hex.
ENGINE_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,127}$"
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
MAX_PROFILES = 32
MAX_PROFILE_CHARS = 200
MAX_CHECKPOINT_CHARS = 1024
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
EXPOSED_HINT = (
    "this WebUI is reachable from other machines (--listen, --share, --ngrok or --server-name) and --api-auth "
    "is not set, so routes that change the engine cache are refused; start the WebUI with "
    "--api-auth user:password to use them"
)

#: pydantic 2 configures models with ConfigDict (and bounds lists with max_length); pydantic 1 (A1111 pins 1.10) with
#: an inner Config class (and max_items). Detected by a v2-only method (1.10.x has a ConfigDict too), not the version.
_PYDANTIC_V2 = hasattr(pydantic.BaseModel, "model_validate")
#: FastAPI >= 0.100 calls a parameter's regex `pattern`; older ones (A1111 pins 0.94) call it `regex`.
_PATTERN_KW = "pattern" if "pattern" in inspect.signature(fastapi.Path).parameters else "regex"


# ---- request and response bodies (as the OpenAPI schema describes them) -----------------------------------------
class ErrorBody(BaseModel):
    error: str = Field(..., description="kind of error, e.g. ProfileError, Unauthorized, QueueFull")
    detail: str = Field(..., description="what was wrong and what to do")


_ProfileText = pydantic.constr(max_length=MAX_PROFILE_CHARS)


def _bounded_list(description: str, max_items: int) -> Any:
    """A required list field of at most `max_items` (pydantic 2 says max_length, pydantic 1 max_items)."""
    bound: dict[str, Any] = {"max_length" if _PYDANTIC_V2 else "max_items": max_items}
    return Field(..., description=description, **bound)


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

    if _PYDANTIC_V2:
        model_config = pydantic.ConfigDict(extra="forbid", json_schema_extra={"examples": [BUILD_EXAMPLE]})
    else:  # pragma: no cover - pydantic 1 (A1111's pin)
        class Config:
            extra = "forbid"
            schema_extra: ClassVar[dict[str, Any]] = {"examples": [BUILD_EXAMPLE]}


class EngineRow(BaseModel):
    id: str
    ok: bool
    reason: str | None
    family: str | None
    profiles: list[str]
    backend: str | None
    backend_version: str | None
    device: str | None
    dtype: str | None
    size_bytes: int | None
    checkpoint: str | None
    created: str | None
    active: bool


class EngineList(BaseModel):
    engines: list[EngineRow]


class JobBody(BaseModel):
    id: str
    state: str = Field(..., description="queued, running, done, failed or cancelled")
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


class JobCounts(BaseModel):
    queued: int
    running: int


class StatusBody(BaseModel):
    enabled: bool
    backend: str
    fallback: str
    cuda_graphs: bool = Field(True, description="the CUDA graphs setting engines load with")
    cache_dir: str
    active: dict[str, Any] | None = Field(..., description="label, engines, loaded, ready (loaded and not broken), "
                                          "backends, unusable, runtime (per engine: CUDA graph counters), networks")
    counters: dict[str, Any]
    jobs: JobCounts
    building: list[dict[str, Any]] = Field(default_factory=list, description="queued and running builds (not ready)")


# ---- helpers ---------------------------------------------------------------------------------------------------
def parse_api_auth(text: str | None) -> dict[str, str]:
    """A1111's --api-auth format: 'user:password[,user2:password2]'."""
    creds: dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep:
            raise SdtrtError("--api-auth entries must be user:password")
        creds[user] = password
    return creds


def _is_loopback(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def webui_exposed(cmd_opts: object) -> bool:
    """Whether the WebUI listens beyond this machine: A1111's --listen, --share, --ngrok, or a --server-name that
    is not a loopback address (A1111 counts any --server-name; 127.0.0.1 is still local)."""
    if any(getattr(cmd_opts, flag, None) for flag in ("listen", "share", "ngrok")):
        return True
    name = getattr(cmd_opts, "server_name", None)
    return bool(name) and not _is_loopback(str(name))


def _status_for(e: Exception) -> int:
    if isinstance(e, InvalidEngineId):
        return 400
    if isinstance(e, (EngineNotFound, JobNotFound)):
        return 404
    if isinstance(e, EngineInUse):
        return 409
    if isinstance(e, QueueFull):
        return 429
    if isinstance(e, CacheNotWritable):  # a BuildError: checked before the generic SdtrtError
        return 503
    if isinstance(e, SdtrtError):
        return 400
    return 500


class _JSON(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate in echoed input cannot make rendering fail."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error(status: int, kind: str, detail: str, headers: Mapping[str, str] | None = None) -> Response:
    return _JSON({"error": kind, "detail": detail}, status_code=status, headers=dict(headers or {}))


_HTTP_KINDS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
               413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "ValidationError", 429: "TooManyRequests",
               503: "CacheNotWritable"}


def _describe_validation(errors: Any) -> str:
    """pydantic's errors as one line, without echoing the (possibly huge) input."""
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(list(errors)) - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _credentials_ok(header: str | None, credentials: Mapping[str, str]) -> bool:
    scheme, _, param = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, password = base64.b64decode(param.strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return False
    if not sep:
        return False
    ok = False
    for want_user, want_password in credentials.items():  # compare with every entry: no early exit
        ok |= secrets.compare_digest(user.encode(), want_user.encode()) & \
            secrets.compare_digest(password.encode(), want_password.encode())
    return ok


async def _read_capped(request: Request, limit: int) -> bool:
    """Read the body into the request (where FastAPI reads it from) unless it exceeds `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return False
        chunks.append(chunk)
    request._body = b"".join(chunks)  # Starlette's cache of the body: request.body() returns it
    return True


def _route_class(credentials: Mapping[str, str], exposed: bool, max_body: int) -> type[APIRoute]:
    class SdtrtRoute(APIRoute):
        """Runs the guards before FastAPI reads the body or resolves anything, and turns FastAPI's own errors
        (validation, unreadable body) into our JSON shape, for these routes only: A1111's app keeps its
        handlers."""

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()
            has_body = self.body_field is not None

            async def guarded(request: Request) -> Response:
                if credentials and not _credentials_ok(request.headers.get("authorization"), credentials):
                    return _error(401, "Unauthorized", "this route needs the WebUI's --api-auth credentials "
                                  "(HTTP Basic)", {"WWW-Authenticate": "Basic"})
                if exposed and not credentials and request.method in MUTATING:
                    return _error(403, "Forbidden", EXPOSED_HINT)
                declared = request.headers.get("content-length")
                too_big = _error(413, "PayloadTooLarge", f"the request body exceeds {max_body} bytes")
                if declared is not None:
                    try:
                        if int(declared) > max_body:
                            return too_big
                    except ValueError:
                        return _error(400, "BadRequest", "invalid Content-Length header")
                try:
                    if has_body and not await _read_capped(request, max_body):
                        return too_big
                except ClientDisconnect:  # gone mid-body: nothing ran, and no one reads this answer
                    return _error(400, "ClientDisconnect", "the client disconnected before sending the whole body")
                try:
                    return await handler(request)
                except RequestValidationError as e:
                    errors = list(e.errors())
                    in_path = any(tuple(err.get("loc", ()))[:1] == ("path",) for err in errors)
                    if in_path:
                        return _error(400, "InvalidId", _describe_validation(errors))
                    return _error(422, "ValidationError", _describe_validation(errors))
                except HTTPException as e:
                    return _error(e.status_code, _HTTP_KINDS.get(e.status_code, "HTTPError"), str(e.detail),
                                  getattr(e, "headers", None))

            return guarded

    return SdtrtRoute


def _id_param(pattern: str, max_length: int, what: str) -> Any:
    constraint: dict[str, Any] = {_PATTERN_KW: pattern}
    return fastapi.Path(..., max_length=max_length, description=what, **constraint)


def mount(app: Any, svc: EngineService, credentials: dict[str, str] | None = None, *, exposed: bool = False,
          max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Add the routes to a FastAPI app (A1111's, from on_app_started). `credentials`: --api-auth parsed;
    `exposed`: the WebUI listens beyond localhost (see `webui_exposed`)."""
    credentials = dict(credentials or {})
    # API clients retry: an identical build request while one is queued or running gets that job back.
    # (Belongs where the service creates its queue, JobQueue(idempotent=True); set here until it does.)
    svc.jobs.idempotent = True
    dependencies = [Depends(HTTPBasic(auto_error=False))] if credentials else []  # documents the scheme
    route_class = _route_class(credentials, exposed, max_body_bytes)

    def answer(fn: Callable[[], Any], status: int = 200) -> Response:
        try:
            return _JSON(fn(), status_code=status)
        except Exception as e:  # noqa: BLE001 - every error becomes a JSON answer
            return _error(_status_for(e), type(e).__name__, str(e))

    def route(path: str, method: str, endpoint: Any, ok: int, model: Any, errors: tuple[int, ...],
              summary: str) -> None:
        codes = set(errors) | {500}
        if "{" in path:  # FastAPI documents its own 422 shape for routes with parameters unless we document ours
            codes.add(422)
        if credentials:
            codes.add(401)
        if method in MUTATING:
            codes.add(413)
            if exposed and not credentials:
                codes.add(403)
        responses: dict[int | str, dict[str, Any]] = {ok: {"model": model, "description": "success"}}
        for code in sorted(codes):
            responses[code] = {"model": ErrorBody, "description": _HTTP_KINDS.get(code, "error")}
        # straight onto the app's router (not include_router, which newer FastAPI keeps as one opaque entry):
        # each route is then an SdtrtRoute in app.routes, where the tests enumerate them
        app.router.add_api_route(PREFIX + path, endpoint, methods=[method], dependencies=dependencies,
                                 status_code=ok, response_model=None, responses=responses, summary=summary,
                                 tags=["sdtrt"], response_class=_JSON, route_class_override=route_class)

    engine_id_param = _id_param(ENGINE_ID_PATTERN, 128, "engine id, e.g. sd1-tensorrt-0123456789abcdef")
    job_id_param = _id_param(JOB_ID_PATTERN, 32, "job id: 32 hexadecimal digits")

    def list_engines() -> Response:
        return answer(lambda: {"engines": svc.engine_rows()})

    def build(req: BuildRequest) -> Response:
        def go() -> dict[str, Any]:
            job = svc.submit_build(req.checkpoint, req.profiles, req.backend, req.dtype)
            return {"job_id": job.id, "job": job.to_dict()}
        return answer(go, 202)

    def delete_engine(engine_id: str = engine_id_param) -> Response:
        def go() -> dict[str, Any]:
            svc.delete(engine_id)
            return {"deleted": engine_id}
        return answer(go)

    def rebuild(engine_id: str = engine_id_param) -> Response:
        def go() -> dict[str, Any]:
            job = svc.rebuild(engine_id)
            return {"job_id": job.id, "job": job.to_dict()}
        return answer(go, 202)

    def list_jobs() -> Response:
        return answer(lambda: {"jobs": [j.to_dict() for j in svc.jobs.list()]})

    def get_job(job_id: str = job_id_param) -> Response:
        return answer(lambda: svc.jobs.get(job_id).to_dict())

    def cancel_job(job_id: str = job_id_param) -> Response:
        return answer(lambda: svc.jobs.cancel(job_id).to_dict())

    def status() -> Response:
        return answer(svc.status)

    route("/engines", "GET", list_engines, 200, EngineList, (), "engines in the cache")
    route("/engines", "POST", build, 202, JobAccepted, (400, 422, 429, 503), "build an engine (a job)")
    route("/engines/{engine_id}", "DELETE", delete_engine, 200, Deleted, (400, 404, 409), "delete an engine")
    route("/engines/{engine_id}/rebuild", "POST", rebuild, 202, JobAccepted, (400, 404, 429, 503),
          "rebuild a stale engine for this machine (a job)")
    route("/jobs", "GET", list_jobs, 200, JobList, (), "build jobs")
    route("/jobs/{job_id}", "GET", get_job, 200, JobBody, (400, 404), "one build job")
    route("/jobs/{job_id}", "DELETE", cancel_job, 200, JobBody, (400, 404), "cancel a build job")
    route("/status", "GET", status, 200, StatusBody, (), "active engine, backend, counters")
