"""The extension's REST API under /sdtrt/v1, for operators who build engines headlessly behind a load balancer.

    GET    /sdtrt/v1/engines              engines in the cache, ok or stale with the reason
    POST   /sdtrt/v1/engines              {checkpoint, profiles, backend?, dtype?} -> 202 {job_id}
    DELETE /sdtrt/v1/engines/{id}         remove an engine (409 while it serves the active SD Unet)
    POST   /sdtrt/v1/engines/{id}/rebuild rebuild a stale engine for this machine -> 202 {job_id}
    GET    /sdtrt/v1/jobs                 all known build jobs
    GET    /sdtrt/v1/jobs/{id}            one job: state queued|running|done|failed|cancelled, progress, result
    DELETE /sdtrt/v1/jobs/{id}            cancel a queued or running build
    GET    /sdtrt/v1/status               active engine, backend, counters (engine calls, fallbacks and why, refits)

Every route takes the WebUI's --api-auth credentials (HTTP Basic) when they are set. Errors are JSON
{"error": <kind>, "detail": <message>} with 400 (bad input), 401, 404 (unknown id), 409 (in use) or 500.
"""

from __future__ import annotations

import secrets
from typing import Any

from sdtrt.errors import EngineNotFound, SdtrtError
from sdtrt.registry import InvalidEngineId
from sdtrt.webui.jobs import JobNotFound
from sdtrt.webui.service import EngineInUse, EngineService

PREFIX = "/sdtrt/v1"


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


def _status_for(e: Exception) -> int:
    if isinstance(e, InvalidEngineId):
        return 400
    if isinstance(e, (EngineNotFound, JobNotFound)):
        return 404
    if isinstance(e, EngineInUse):
        return 409
    if isinstance(e, SdtrtError):
        return 400
    return 500


def mount(app: Any, svc: EngineService, credentials: dict[str, str] | None = None) -> None:
    """Add the routes to a FastAPI app (A1111's, from on_app_started)."""
    from fastapi import Depends, HTTPException
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPBasic, HTTPBasicCredentials
    from pydantic import BaseModel

    class BuildRequest(BaseModel):
        checkpoint: str
        profiles: list[str]
        backend: str = "auto"
        dtype: str | None = None

    dependencies = []
    if credentials:
        basic = HTTPBasic()

        def check(cred: HTTPBasicCredentials = Depends(basic)) -> bool:  # noqa: B008 - FastAPI idiom
            ok = False
            for user, password in credentials.items():
                ok |= secrets.compare_digest(cred.username.encode(), user.encode()) and \
                    secrets.compare_digest(cred.password.encode(), password.encode())
            if not ok:
                raise HTTPException(status_code=401, detail="Incorrect username or password",
                                    headers={"WWW-Authenticate": "Basic"})
            return True

        check.__annotations__["cred"] = HTTPBasicCredentials  # resolved here: annotations are strings in this module
        dependencies = [Depends(check)]

    def answer(fn: Any, status: int = 200) -> Any:
        try:
            return JSONResponse(fn(), status_code=status)
        except Exception as e:  # noqa: BLE001 - every error becomes a JSON answer
            code = _status_for(e)
            return JSONResponse({"error": type(e).__name__, "detail": str(e)}, status_code=code)

    def route(path: str, method: str, endpoint: Any) -> None:
        app.add_api_route(PREFIX + path, endpoint, methods=[method], dependencies=dependencies)

    def list_engines() -> Any:
        return answer(lambda: {"engines": svc.engine_rows()})

    def build(req: BuildRequest) -> Any:
        def go() -> dict[str, Any]:
            job = svc.submit_build(req.checkpoint, req.profiles, req.backend, req.dtype)
            return {"job_id": job.id, "job": job.to_dict()}
        return answer(go, 202)

    build.__annotations__["req"] = BuildRequest

    def delete_engine(engine_id: str) -> Any:
        def go() -> dict[str, Any]:
            svc.delete(engine_id)
            return {"deleted": engine_id}
        return answer(go)

    def rebuild(engine_id: str) -> Any:
        def go() -> dict[str, Any]:
            job = svc.rebuild(engine_id)
            return {"job_id": job.id, "job": job.to_dict()}
        return answer(go, 202)

    def list_jobs() -> Any:
        return answer(lambda: {"jobs": [j.to_dict() for j in svc.jobs.list()]})

    def get_job(job_id: str) -> Any:
        return answer(lambda: svc.jobs.get(job_id).to_dict())

    def cancel_job(job_id: str) -> Any:
        return answer(lambda: svc.jobs.cancel(job_id).to_dict())

    def status() -> Any:
        return answer(svc.status)

    route("/engines", "GET", list_engines)
    route("/engines", "POST", build)
    route("/engines/{engine_id}", "DELETE", delete_engine)
    route("/engines/{engine_id}/rebuild", "POST", rebuild)
    route("/jobs", "GET", list_jobs)
    route("/jobs/{job_id}", "GET", get_job)
    route("/jobs/{job_id}", "DELETE", cancel_job)
    route("/status", "GET", status)
