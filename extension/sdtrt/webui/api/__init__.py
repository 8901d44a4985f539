"""The extension's REST API under /sdtrt/v1, for operators who build engines headlessly behind a load balancer.

    GET    /sdtrt/v1/engines              engines in the cache, ok or stale with the reason
    POST   /sdtrt/v1/engines              {checkpoint, profiles, backend?, dtype?, controlnet?, targets?, convention?}
                                          -> 202 {job_id}
    DELETE /sdtrt/v1/engines/{id}         remove an engine (409 while it serves the active SD Unet)
    POST   /sdtrt/v1/engines/{id}/rebuild rebuild a stale engine for this machine -> 202 {job_id}
    GET    /sdtrt/v1/jobs                 all known build jobs
    GET    /sdtrt/v1/jobs/{id}            one job: state queued|running|done|failed|cancelled, progress, result
    DELETE /sdtrt/v1/jobs/{id}            cancel a queued or running build
    GET    /sdtrt/v1/status               active engine, backend, counters (engine calls, fallbacks and why, refits)

models.py: the request and answer bodies (the OpenAPI schema). guard.py: credentials (--api-auth), exposure (403
for changes when the WebUI listens beyond localhost without --api-auth), the body cap (413) and errors as JSON
{"error", "detail"} with their status codes. routes.py: the routes and `mount`.

Ids are never paths: engine and job ids must match their patterns (400 otherwise) and the registry resolves them
under the cache folder only. Identical build requests while one is queued or running share its job (the service's
queue is idempotent); past the queue's cap a build answers 429 (see jobs.JobQueue).
"""

from sdtrt.storage.key import ENGINE_ID_PATTERN
from sdtrt.webui.api.guard import EXPOSED_HINT, MAX_BODY_BYTES, parse_api_auth, webui_exposed
from sdtrt.webui.api.models import BUILD_EXAMPLE
from sdtrt.webui.api.routes import PREFIX, mount
from sdtrt.webui.jobs import JOB_ID_PATTERN

__all__ = ["BUILD_EXAMPLE", "ENGINE_ID_PATTERN", "EXPOSED_HINT", "JOB_ID_PATTERN", "MAX_BODY_BYTES", "PREFIX",
           "mount", "parse_api_auth", "webui_exposed"]
