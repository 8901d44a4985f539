"""What stands between a request and a route, and how every answer leaves: the checks that run, in this order,
before FastAPI reads the body or resolves anything, and the mapping of errors to status codes and JSON bodies.

- With the WebUI's --api-auth set, every route takes those credentials (HTTP Basic), else 401. The routes are
  added by the extension, so A1111's own --api-auth check does not cover them; this one does.
- When the WebUI is reachable from other machines (--listen, --share, --ngrok, a non-loopback --server-name) and
  --api-auth is not set, the routes that change something (POST, DELETE) answer 403; reading still works.
- A request body larger than MAX_BODY_BYTES is refused with 413 before it is read further.

Errors are always JSON {"error": <kind>, "detail": <message>}: 400 (bad input), 401, 403, 404 (unknown id),
409 (in use, or builds off in this replica), 413, 422 (malformed body), 429, 503 (cache folder not writable) or, for a bug, 500.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import secrets
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException  # FastAPI's own is a subclass; it raises both
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from sdtrt.errors import CacheNotWritable, EngineNotFound, InvalidEngineId, SdtrtError
from sdtrt.webui.builds import EngineInUse
from sdtrt.webui.fleet import BuildsOff
from sdtrt.webui.jobs import JobNotFound, QueueFull

#: Largest request body the routes accept. A build request is a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024
#: Largest body of the route that takes a generation's request (an img2img body carries its images, base64).
MAX_GENERATION_BODY_BYTES = 64 * 1024 * 1024
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
EXPOSED_HINT = (
    "this WebUI is reachable from other machines (--listen, --share, --ngrok or --server-name) and --api-auth "
    "is not set, so routes that change the engine cache are refused; start the WebUI with "
    "--api-auth user:password to use them"
)
#: The kind named in the JSON body of each status code the routes answer with.
HTTP_KINDS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
              413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "ValidationError", 429: "TooManyRequests",
              503: "CacheNotWritable"}


# ---- who may call: credentials and exposure ------------------------------------------------------------------
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


# ---- how answers and errors leave -----------------------------------------------------------------------------
class JSONAnswer(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate in echoed input cannot make rendering fail."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_answer(status: int, kind: str, detail: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONAnswer({"error": kind, "detail": detail}, status_code=status, headers=dict(headers or {}))


def status_for(e: Exception) -> int:
    """The status code of an error a route raised (500: a bug)."""
    if isinstance(e, InvalidEngineId):
        return 400
    if isinstance(e, (EngineNotFound, JobNotFound)):
        return 404
    if isinstance(e, (EngineInUse, BuildsOff)):
        return 409
    if isinstance(e, QueueFull):
        return 429
    if isinstance(e, CacheNotWritable):  # a BuildError: checked before the generic SdtrtError
        return 503
    if isinstance(e, SdtrtError):
        return 400
    return 500


def answer(fn: Callable[[], Any], status: int = 200) -> Response:
    """`fn()` as JSON with `status`, or what it raised as an error answer."""
    try:
        return JSONAnswer(fn(), status_code=status)
    except Exception as e:  # noqa: BLE001 - every error becomes a JSON answer
        return error_answer(status_for(e), type(e).__name__, str(e))


def _describe_validation(errors: Any) -> str:
    """pydantic's errors as one line, without echoing the (possibly huge) input."""
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(list(errors)) - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# ---- the guard itself ------------------------------------------------------------------------------------------
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


def guarded_route_class(credentials: Mapping[str, str], exposed: bool, max_body: int, *,
                        read_only: bool = False) -> type[APIRoute]:
    """The route class of every /sdtrt/v1 route: the guards above, for these routes only (A1111's app keeps its
    handlers). `read_only`: a POST that changes nothing (a question with a body), allowed where reading is."""

    class SdtrtRoute(APIRoute):
        """Runs the guards before FastAPI reads the body or resolves anything, and turns FastAPI's own errors
        (validation, unreadable body) into our JSON shape."""

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()
            has_body = self.body_field is not None

            async def guarded(request: Request) -> Response:
                if credentials and not _credentials_ok(request.headers.get("authorization"), credentials):
                    return error_answer(401, "Unauthorized", "this route needs the WebUI's --api-auth credentials "
                                        "(HTTP Basic)", {"WWW-Authenticate": "Basic"})
                if exposed and not credentials and request.method in MUTATING and not read_only:
                    return error_answer(403, "Forbidden", EXPOSED_HINT)
                declared = request.headers.get("content-length")
                too_big = error_answer(413, "PayloadTooLarge", f"the request body exceeds {max_body} bytes")
                if declared is not None:
                    try:
                        if int(declared) > max_body:
                            return too_big
                    except ValueError:
                        return error_answer(400, "BadRequest", "invalid Content-Length header")
                try:
                    if has_body and not await _read_capped(request, max_body):
                        return too_big
                except ClientDisconnect:  # gone mid-body: nothing ran, and no one reads this answer
                    return error_answer(400, "ClientDisconnect",
                                        "the client disconnected before sending the whole body")
                try:
                    return await handler(request)
                except RequestValidationError as e:
                    errors = list(e.errors())
                    in_path = any(tuple(err.get("loc", ()))[:1] == ("path",) for err in errors)
                    if in_path:
                        return error_answer(400, "InvalidId", _describe_validation(errors))
                    return error_answer(422, "ValidationError", _describe_validation(errors))
                except HTTPException as e:
                    return error_answer(e.status_code, HTTP_KINDS.get(e.status_code, "HTTPError"), str(e.detail),
                                        getattr(e, "headers", None))

            return guarded

    return SdtrtRoute
