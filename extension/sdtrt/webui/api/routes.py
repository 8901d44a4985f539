"""The /sdtrt/v1 routes: each one calls the service and answers through the guard, and `mount` adds them, with
their OpenAPI documentation, to a FastAPI app (A1111's, from on_app_started)."""

from __future__ import annotations

import inspect
from typing import Any

import fastapi
from fastapi import Depends
from fastapi.security import HTTPBasic
from starlette.requests import Request
from starlette.responses import Response

from sdtrt.storage.key import ENGINE_ID_PATTERN
from sdtrt.webui.api.guard import (
    HTTP_KINDS,
    MAX_BODY_BYTES,
    MAX_GENERATION_BODY_BYTES,
    MUTATING,
    JSONAnswer,
    answer,
    error_answer,
    guarded_route_class,
    status_for,
)
from sdtrt.webui.api.models import (
    COVERAGE_HELP,
    BuildRequest,
    CoverageBody,
    Deleted,
    EnabledBody,
    EnabledRequest,
    EngineList,
    ErrorBody,
    JobAccepted,
    JobBody,
    JobList,
    ReadyBody,
    RescanBody,
    StatusBody,
)
from sdtrt.webui.coverage import predict
from sdtrt.webui.jobs import JOB_ID_PATTERN
from sdtrt.webui.service import EngineService

PREFIX = "/sdtrt/v1"
#: FastAPI >= 0.100 calls a parameter's regex `pattern`; older ones (A1111 pins 0.94) call it `regex`.
_PATTERN_KW = "pattern" if "pattern" in inspect.signature(fastapi.Path).parameters else "regex"


def _id_param(pattern: str, max_length: int, what: str) -> Any:
    constraint: dict[str, Any] = {_PATTERN_KW: pattern}
    return fastapi.Path(..., max_length=max_length, description=what, **constraint)


def mount(app: Any, svc: EngineService, credentials: dict[str, str] | None = None, *, exposed: bool = False,
          max_body_bytes: int = MAX_BODY_BYTES, max_generation_body_bytes: int = MAX_GENERATION_BODY_BYTES) -> None:
    """Add the routes to a FastAPI app (A1111's, from on_app_started). `credentials`: --api-auth parsed;
    `exposed`: the WebUI listens beyond localhost (see `webui_exposed`)."""
    credentials = dict(credentials or {})
    dependencies = [Depends(HTTPBasic(auto_error=False))] if credentials else []  # documents the scheme
    route_class = guarded_route_class(credentials, exposed, max_body_bytes)
    # the coverage question takes a generation's body (img2img's carries images) and changes nothing
    asking_class = guarded_route_class(credentials, exposed, max_generation_body_bytes, read_only=True)
    # a readiness probe (kubelet, a load balancer) sends no credentials: /ready answers everyone (it changes nothing
    # and tells no secret: ready or not, why, which checkpoint and engine)
    probe_class = guarded_route_class({}, exposed, max_body_bytes)

    def route(path: str, method: str, endpoint: Any, ok: int, model: Any, errors: tuple[int, ...],
              summary: str, *, asks: bool = False, same_body: tuple[int, ...] = (), probe: bool = False) -> None:
        """`same_body`: error codes answered with `model` (not ErrorBody), as /ready's 503. `probe`: open to
        callers without credentials."""
        codes = set(errors) | {500}
        if "{" in path:  # FastAPI documents its own 422 shape for routes with parameters unless we document ours
            codes.add(422)
        if credentials and not probe:
            codes.add(401)
        if method in MUTATING:
            codes.add(413)
            if exposed and not credentials and not asks:
                codes.add(403)
        responses: dict[int | str, dict[str, Any]] = {ok: {"model": model, "description": "success"}}
        for code in sorted(codes):
            body = model if code in same_body else ErrorBody
            responses[code] = {"model": body, "description": HTTP_KINDS.get(code, "error")}
        # straight onto the app's router (not include_router, which newer FastAPI keeps as one opaque entry):
        # each route is then an SdtrtRoute in app.routes, where the tests enumerate them
        app.router.add_api_route(PREFIX + path, endpoint, methods=[method],
                                 dependencies=[] if probe else dependencies, status_code=ok, response_model=None,
                                 responses=responses, summary=summary, tags=["sdtrt"], response_class=JSONAnswer,
                                 route_class_override=probe_class if probe else asking_class if asks else route_class)

    engine_id_param = _id_param(ENGINE_ID_PATTERN, 128, "engine id, e.g. sd1-tensorrt-0123456789abcdef")
    job_id_param = _id_param(JOB_ID_PATTERN, 32, "job id: 32 hexadecimal digits")

    def list_engines() -> Response:
        return answer(lambda: {"engines": [row.to_dict() for row in svc.engine_rows()]})

    def build(req: BuildRequest) -> Response:
        def go() -> dict[str, Any]:
            job = svc.submit_build(req.checkpoint, req.profiles, req.backend, req.dtype, controlnet=req.controlnet,
                                   targets=req.targets, convention=req.convention)
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
        return answer(lambda: svc.status().to_dict())

    def coverage(request: Request, body: dict[str, Any] = fastapi.Body(..., description=COVERAGE_HELP),  # noqa: B008
                 kind: str = fastapi.Query("txt2img", description="txt2img or img2img")) -> Response:
        unknown = sorted(set(request.query_params) - {"kind"})
        if unknown:  # a typo ("knd=img2img") must not silently predict a txt2img generation
            return error_answer(400, "BadRequest", f"unknown query parameter {unknown[0]!r}; this route takes kind")
        return answer(lambda: predict(svc, body, kind))

    def set_enabled(req: EnabledRequest) -> Response:
        return answer(lambda: svc.set_enabled(req.enabled))

    def rescan() -> Response:
        return answer(svc.rescan)

    def ready() -> Response:
        try:
            report = svc.readiness.check()
        except Exception as e:  # noqa: BLE001 - every error becomes a JSON answer
            return error_answer(status_for(e), type(e).__name__, str(e))
        return JSONAnswer(report.to_dict(), status_code=200 if report.ready else 503)

    route("/engines", "GET", list_engines, 200, EngineList, (), "engines in the cache")
    route("/engines", "POST", build, 202, JobAccepted, (400, 409, 422, 429, 503), "build an engine (a job)")
    route("/engines/{engine_id}", "DELETE", delete_engine, 200, Deleted, (400, 404, 409), "delete an engine")
    route("/engines/{engine_id}/rebuild", "POST", rebuild, 202, JobAccepted, (400, 404, 409, 429, 503),
          "rebuild a stale engine for this machine (a job)")
    route("/jobs", "GET", list_jobs, 200, JobList, (), "build jobs")
    route("/jobs/{job_id}", "GET", get_job, 200, JobBody, (400, 404), "one build job")
    route("/jobs/{job_id}", "DELETE", cancel_job, 200, JobBody, (400, 404), "cancel a build job")
    route("/status", "GET", status, 200, StatusBody, (), "active engine, backend, counters")
    route("/coverage", "POST", coverage, 200, CoverageBody, (400, 422),
          "will a generation with this /sdapi/v1/txt2img or /img2img body run on an engine? (changes nothing)",
          asks=True)
    route("/ready", "GET", ready, 200, ReadyBody, (503,),
          "can this replica take generations (for a readiness probe, so it needs no credentials; 503 with the reasons "
          "when not)", same_body=(503,), probe=True)
    route("/rescan", "POST", rescan, 200, RescanBody, (),
          "look for engines other processes published into (or removed from) the cache now")
    route("/enabled", "POST", set_enabled, 200, EnabledBody, (400, 422),
          "switch sd-webui-trt on or off (the sdtrt_enabled setting; from the next generation)")
