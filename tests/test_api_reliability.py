"""The REST API under hostile and careless clients.

- schemathesis against our own OpenAPI schema, in process, positive and negative cases per operation:
  0 server errors, every response matches the schema (status code, content type, body).
- with --api-auth every route (enumerated from app.routes, so a new one cannot slip through) answers 401
  without or with wrong credentials, before it reads the body; only GET /ready, for probes, answers anyone.
- reachable beyond localhost without --api-auth: POST/DELETE answer 403 saying to set --api-auth.
- ids with '..', %2e%2e, absolute paths, NUL, unicode, very long, and a symlink in the cache
  pointing outside: 400/404, nothing outside the cache read, written or deleted (audit hook + canary snapshot),
  over thousands of hypothesis-generated ids.
- huge, streamed, deeply nested or absurd bodies: 413/422/400 and no job.
- 100 concurrent builds, some duplicates: 429 past the queue cap, duplicates share one job.
- a client that disconnects does not cancel its job; no thread leaks.
- /status and the other answers hold no flags, environment values or credentials.

Counts: SDTRT_LONG=1 (CI) runs the full figures (1,000 schemathesis cases per operation, 10,000 ids), else small
ones. Figures are printed (pytest -rA or -s shows them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

fastapi = pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error, positive_data_acceptance
from schemathesis.generation import GenerationMode

import sdtrt
from sdtrt.pipeline.build import build_engine
from sdtrt.profiles import Profile
from sdtrt.webui import api as api_module
from sdtrt.webui.api import ENGINE_ID_PATTERN, EXPOSED_HINT, PREFIX, mount, webui_exposed
from sdtrt.webui.host import CheckpointRef, Settings
from sdtrt.webui.jobs import CANCELLED, QUEUED, RUNNING
from sdtrt.webui.service import EngineService
from webui_support import DictHost, close_webuis

LONG = os.environ.get("SDTRT_LONG") == "1"
#: schemathesis cases per operation: positive + negative (the negative strategy may run out early on small ops)
SCHEMA_POSITIVE, SCHEMA_NEGATIVE = (700, 300) if LONG else (30, 15)
SCHEMA_MIN_CASES = 1000 if LONG else 30
N_IDS = int(os.environ.get("SDTRT_API_IDS") or (10_000 if LONG else 300))

USER, PASSWORD = "ops", "pl4nted-Pa55word-7f3c"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
#: The example checkpoint of the OpenAPI schema: listed by the host, its file absent, so the builds that fuzzing
#: submits fail at once with the service's real error (no export runs).
EXAMPLE_CKPT = api_module.BUILD_EXAMPLE["checkpoint"]
SYMLINK_ID = "sd1-onnxruntime-00000000000000aa"
DAMAGED_ID = "sd1-onnxruntime-00000000000000bb"
OPS = [("GET", "/engines"), ("POST", "/engines"), ("DELETE", "/engines/{engine_id}"),
       ("POST", "/engines/{engine_id}/rebuild"), ("GET", "/jobs"), ("GET", "/jobs/{job_id}"),
       ("DELETE", "/jobs/{job_id}"), ("GET", "/status"), ("POST", "/coverage"), ("POST", "/enabled"),
       ("POST", "/rescan"), ("GET", "/ready")]
#: routes a probe calls without credentials (kubelet and load balancers send none); everything else needs them
OPEN = {("GET", PREFIX + "/ready")}


# ---- environment: a cache with a real engine, a damaged one and a symlink out; canaries outside ------------------
class Env:
    def __init__(self, root: Path, engine_src: Path, ckpt: Path | None) -> None:
        self.root = root
        self.cache = root / "cache"
        self.outside = root / "outside"
        self.cache.mkdir(parents=True)
        shutil.copytree(engine_src, self.cache / engine_src.name, symlinks=True)
        self.engine_id = engine_src.name
        (self.cache / DAMAGED_ID).mkdir()
        (self.cache / DAMAGED_ID / "manifest.json").write_text("{not json", encoding="utf-8")
        # outside the cache: a plausible engine the symlink points to, and plain canary files
        victim = self.outside / "victim"
        shutil.copytree(engine_src, victim)
        (self.outside / "canary.txt").write_text("do not touch\n", encoding="utf-8")
        (root / "canary-beside-cache.txt").write_text("do not touch either\n", encoding="utf-8")
        self.make_symlink()
        host = DictHost(root / "models")
        host.settings_ = Settings(cache_dir=str(self.cache))
        host.refs.append(CheckpointRef(title=EXAMPLE_CKPT, model_name=EXAMPLE_CKPT,
                                       filename=str(root / "absent" / f"{EXAMPLE_CKPT}.safetensors"), config=None))
        if ckpt is not None:
            host.add_checkpoint(ckpt)
        self.host = host
        self.svc = EngineService()
        self.svc.attach(host)
        self.before = self.snapshot()

    def make_symlink(self) -> None:
        link = self.cache / SYMLINK_ID
        if not os.path.lexists(link):
            link.symlink_to(self.outside / "victim", target_is_directory=True)

    def snapshot(self) -> dict[str, Any]:
        """Every entry outside the cache (the canaries): type, size, mtime, inode, content hash."""
        out: dict[str, Any] = {}
        for p in sorted([self.root / "canary-beside-cache.txt", *self.outside.rglob("*")]):
            st_ = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
            out[str(p)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns, st_.st_ino, digest)
        return out

    def assert_canaries_untouched(self) -> None:
        assert self.snapshot() == self.before
        assert os.path.islink(self.cache / SYMLINK_ID) or not os.path.lexists(self.cache / SYMLINK_ID)

    def app(self, credentials: dict[str, str] | None = None, exposed: bool = False) -> FastAPI:
        app = FastAPI()
        mount(app, self.svc, credentials, exposed=exposed)
        return app

    def close(self) -> None:
        self.svc.close_sessions()
        for job in self.svc.jobs.list():
            with contextlib.suppress(Exception):
                self.svc.jobs.cancel(job.id)


@pytest.fixture(scope="module")
def engine_src(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Any) -> Path:
    """One real onnxruntime engine (tiny sd1), copied into each test's cache."""
    cache = tmp_path_factory.mktemp("api-engine")
    out = build_engine(tiny_checkpoint("sd1", 0), [Profile.parse("1x64x64x75")], cache, backend="onnxruntime")
    return cache / out.manifest.id


@pytest.fixture
def env(tmp_path: Path, engine_src: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.delenv("SDTRT_CACHE", raising=False)
    e = Env(tmp_path / "api", engine_src, None)
    yield e
    e.close()


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory, engine_src: Path) -> Iterator[Env]:
    """One environment for every schemathesis operation (module scope: the app and schema are built once)."""
    e = Env(tmp_path_factory.mktemp("api-fuzz"), engine_src, None)
    yield e
    e.close()


_CLIENTS = contextlib.ExitStack()


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    _CLIENTS.close()


def client(app: FastAPI, auth: bool = True) -> TestClient:
    """A started TestClient (one event loop for all its requests, ~5x faster than one per request), closed
    after the test."""
    return _CLIENTS.enter_context(TestClient(app, headers=AUTH if auth else None))


def assert_error_body(r: Any, *codes: int) -> dict[str, Any]:
    assert r.status_code in codes, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error", "detail"} and isinstance(body["detail"], str), body
    assert "Traceback" not in r.text and 'File "' not in r.text
    return body


def our_routes(app: FastAPI) -> list[tuple[str, str, APIRoute]]:
    out = []
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path.startswith(PREFIX):
            out += [(method, route.path, route) for method in sorted(route.methods or ())]
        elif getattr(route, "path", "").startswith(PREFIX):
            raise AssertionError(f"{route!r} under {PREFIX} is not an API route with the guards")
    return out


def concrete(path: str, value: str = "x") -> str:
    return re.sub(r"\{[^}]+\}", value, path)


# ---- schemathesis ------------------------------------------------------------------------------------------------
#: Valid-by-schema requests may still be refused for what a schema cannot say (an unknown checkpoint name, a
#: height not a multiple of 8): 400 joins the statuses positive data may get. 422 stays out: a schema-valid body
#: that FastAPI rejects would mean the schema lies.
SCHEMA_CONFIG = {"checks": {"positive_data_acceptance": {
    "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "429"]}}}


@pytest.fixture(scope="module")
def schema(fuzz_env: Env) -> Any:
    app = fuzz_env.app({USER: PASSWORD})
    config = schemathesis.config.SchemathesisConfig.from_dict(SCHEMA_CONFIG)
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config)


def test_openapi_documents_every_route_with_its_answers(fuzz_env: Env) -> None:
    app = fuzz_env.app({USER: PASSWORD})
    doc = app.openapi()
    routes = our_routes(app)
    assert sorted((m, p) for m, p, _ in routes) == sorted((m, PREFIX + p) for m, p in OPS)
    error_ref = "#/components/schemas/ErrorBody"
    for method, path, _ in routes:
        op = doc["paths"][path][method.lower()]
        codes = set(op["responses"])
        if (method, path) in OPEN:
            assert "security" not in op and "401" not in codes, (method, path)
        else:
            assert op["security"] == [{"HTTPBasic": []}], path
            assert {"401", "500"} <= codes, (method, path, codes)
        for code, resp in op["responses"].items():
            ref = resp["content"]["application/json"]["schema"].get("$ref")
            if (method, path, code) == ("GET", PREFIX + "/ready", "503"):  # not ready: the same report, not an error
                assert ref == "#/components/schemas/ReadyBody"
            elif code[0] in "45":
                assert ref == error_ref, (method, path, code)
            else:
                assert ref and ref != error_ref, (method, path, code)
    body = doc["components"]["schemas"]["BuildRequest"]
    assert body["additionalProperties"] is False and body["properties"]["profiles"]["maxItems"] == 32


@pytest.mark.timeout(600 if LONG else 120)
@pytest.mark.parametrize(("method", "path"), OPS, ids=[f"{m} {p}" for m, p in OPS])
def test_schemathesis_finds_no_server_error_and_no_schema_violation(schema: Any, fuzz_env: Env, method: str,
                                                                     path: str) -> None:
    op = schema[PREFIX + path][method]
    # /ready answers 503 when the replica is not ready: documented, with its own body; schemathesis's server-error
    # check would call that a failure
    not_ready_checks = [not_a_server_error, positive_data_acceptance] if path == "/ready" else []
    statuses: Counter[int] = Counter()
    cases = Counter[str]()

    def run(mode: GenerationMode, n: int) -> None:
        @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def one(case: Any) -> None:
            r = case.call_and_validate(headers=AUTH, excluded_checks=not_ready_checks)
            cases[mode.value] += 1
            if r.status_code == 503 and path == "/ready":  # "not ready" (no model loaded here) is its answer
                assert r.json()["ready"] is False and r.json()["reasons"], r.text
                statuses[-503] += 1
                return
            statuses[r.status_code] += 1
            assert r.status_code < 500, r.text
            assert "Traceback" not in r.text

        one()

    t0 = time.monotonic()
    run(GenerationMode.POSITIVE, SCHEMA_POSITIVE)
    if ("GET", PREFIX + path) not in OPEN:  # an open route without parameters has no invalid request to generate
        run(GenerationMode.NEGATIVE, SCHEMA_NEGATIVE)
    total = sum(cases.values())
    five_xx = sum(n for code, n in statuses.items() if code >= 500)
    print(f"schemathesis {method} {PREFIX}{path}: {total} cases ({dict(cases)}), statuses {dict(sorted(statuses.items()))}, "
          f"5xx {five_xx}, {time.monotonic() - t0:.1f} s")
    assert five_xx == 0
    # an open GET without parameters has exactly one request to make
    assert total >= (1 if ("GET", PREFIX + path) in OPEN else SCHEMA_MIN_CASES), dict(cases)
    fuzz_env.assert_canaries_untouched()


def test_schema_holds_for_successful_answers_too(schema: Any, fuzz_env: Env) -> None:
    """Random ids rarely exist: validate the 2xx bodies of the id routes on real objects."""
    def call(method: str, path: str, **kw: Any) -> Any:
        case = schema[PREFIX + path][method].Case(**kw)
        return case.call_and_validate(headers=AUTH)

    assert call("GET", "/engines").json()["engines"]
    r = call("POST", "/engines", body={"checkpoint": EXAMPLE_CKPT, "profiles": ["1x64x64x75"]},
             media_type="application/json")
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    assert call("GET", "/jobs/{job_id}", path_parameters={"job_id": job_id}).status_code == 200
    assert call("DELETE", "/jobs/{job_id}", path_parameters={"job_id": job_id}).status_code == 200
    fuzz_env.svc.jobs.wait(job_id, timeout=30)
    failed = fuzz_env.svc.jobs.get(job_id)
    assert failed.state == "cancelled" or (failed.state == "failed" and "does not exist" in (failed.error or ""))
    r = call("DELETE", "/engines/{engine_id}", path_parameters={"engine_id": DAMAGED_ID})
    assert r.status_code == 200 and r.json() == {"deleted": DAMAGED_ID}
    (fuzz_env.cache / DAMAGED_ID).mkdir()
    (fuzz_env.cache / DAMAGED_ID / "manifest.json").write_text("{not json", encoding="utf-8")
    assert call("GET", "/status").json()["jobs"]["queued"] >= 0
    fuzz_env.assert_canaries_untouched()


def test_not_found_answers_read_cleanly(env: Env) -> None:
    c = client(env.app({USER: PASSWORD}))
    job = assert_error_body(c.get(f"{PREFIX}/jobs/{'0' * 32}"), 404)
    assert job == {"error": "JobNotFound", "detail": f"no job {'0' * 32}"}
    engine = assert_error_body(c.delete(f"{PREFIX}/engines/sd1-onnxruntime-0123456789abcdef"), 404)
    assert engine["error"] == "EngineNotFound" and env.engine_id in engine["detail"]  # lists the known ones


# ---- credentials on every route --------------------------------------------------------------------------
def bad_auth_headers() -> list[dict[str, str]]:
    b64 = base64.b64encode
    return [{}, {"Authorization": "Basic " + b64(f"{USER}:wrong".encode()).decode()},
            {"Authorization": "Basic " + b64(f"nobody:{PASSWORD}".encode()).decode()},
            {"Authorization": "Basic " + b64(f"{USER}{PASSWORD}".encode()).decode()},  # no colon
            {"Authorization": "Basic " + b64(f"{USER}:{PASSWORD}x".encode()).decode()},
            {"Authorization": "Basic !!!not-base64"}, {"Authorization": "Bearer " + PASSWORD},
            {"Authorization": "Basic " + b64(f"{USER}:".encode()).decode()}, {"Authorization": "Basic"},
            {"Authorization": "basic " + b64(b"\xff\xfe:\x00").decode()}]


def test_every_route_refuses_requests_without_the_credentials(env: Env) -> None:
    app = env.app({USER: PASSWORD, "second": "other-pass"})
    routes = our_routes(app)
    assert len(routes) == len(OPS)
    anon = client(app, auth=False)
    jobs_before = len(env.svc.jobs.list())
    refused = 0
    for method, path, _ in routes:
        url = concrete(path, env.engine_id if "engine_id" in path else "0" * 32)
        if (method, path) in OPEN:  # answers a probe without credentials, with its report (not ready: no model)
            for headers in bad_auth_headers():
                r = anon.request(method, url, headers=headers)
                assert r.status_code == 503 and r.json()["ready"] is False and PASSWORD not in r.text
            continue
        for headers in bad_auth_headers():
            bodies: list[dict[str, Any]] = [{}]
            if method == "POST":
                bodies = [{"json": {"checkpoint": EXAMPLE_CKPT, "profiles": ["1x64x64x75"]}},
                          {"content": b"{broken json", "headers": {"content-type": "application/json"}},
                          {"content": b"x" * (2 * api_module.MAX_BODY_BYTES)}]
            for body in bodies:
                kw = dict(body)
                kw["headers"] = {**headers, **kw.get("headers", {})}
                r = anon.request(method, url, **kw)
                assert_error_body(r, 401)
                assert r.headers["www-authenticate"] == "Basic"
                assert PASSWORD not in r.text
                refused += 1
        harmless = concrete(path, "no-such-0123456789abcdef" if "engine_id" in path else "0" * 32)
        harmless_body = ({"json": {"checkpoint": "nope", "profiles": ["1x64x64x75"]}} if path.endswith("engines")
                         else {"json": {"width": 64, "height": 64}} if path.endswith("coverage")
                         else {"json": {"enabled": True}} if path.endswith("enabled") else {})
        ok = anon.request(method, harmless, headers={"Authorization": "Basic " + base64.b64encode(
            b"second:other-pass").decode()}, **(harmless_body if method == "POST" else {}))
        # (/ready: 503 "not ready" with its report, since no model is loaded here)
        assert ok.status_code in ((503,) if path.endswith("/ready") else (200, 400, 404)), (method, path, ok.status_code)
    print(f"auth: {len(routes) - len(OPEN)} of {len(routes)} routes under auth (open to probes: "
          f"{', '.join(p for _, p in sorted(OPEN))}); {refused} unauthenticated requests refused")
    assert len(env.svc.jobs.list()) == jobs_before  # the authenticated POST named an unknown checkpoint
    assert (env.cache / env.engine_id).is_dir()
    env.assert_canaries_untouched()


def test_a_route_added_later_without_the_guards_is_caught(env: Env) -> None:
    """The enumeration itself: a route someone adds with app.add_api_route under the prefix fails the check."""
    app = env.app({USER: PASSWORD})
    app.add_api_route(PREFIX + "/debug", lambda: {"secret": 1}, methods=["GET"])
    anon = client(app, auth=False)
    with pytest.raises(AssertionError):
        for method, path, _ in our_routes(app):
            assert anon.request(method, concrete(path)).status_code == 401, path


# ---- exposed without --api-auth ----------------------------------------------------------------------------
def test_exposed_without_auth_refuses_changes_but_serves_reads(env: Env) -> None:
    app = env.app(None, exposed=True)
    c = client(app, auth=False)
    jobs_before = len(env.svc.jobs.list())
    for method, path, _ in our_routes(app):
        url = concrete(path, env.engine_id if "engine_id" in path else "0" * 32)
        kw: dict[str, Any] = {}
        if method == "POST" and path.endswith("/engines"):
            kw["json"] = {"checkpoint": EXAMPLE_CKPT, "profiles": ["1x64x64x75"]}
        if path.endswith("/coverage"):  # a question with a body: read-only, so served as reads are
            r = c.post(url, json={"width": 64, "height": 64})
            assert r.status_code in (200, 400), (method, path, r.status_code)
            continue
        r = c.request(method, url, **kw)
        if method in ("POST", "DELETE"):
            body = assert_error_body(r, 403)
            assert "--api-auth" in body["detail"] and body["detail"] == EXPOSED_HINT
        elif path.endswith("/ready"):  # no model is loaded here: "not ready", with the reason
            assert r.status_code == 503 and r.json()["reasons"] == ["no checkpoint is loaded yet"], r.text
        else:
            assert r.status_code in (200, 404), (method, path, r.status_code)
    assert len(env.svc.jobs.list()) == jobs_before and (env.cache / env.engine_id).is_dir()
    # exposed with --api-auth: the credentials decide, not the exposure
    authed = client(env.app({USER: PASSWORD}, exposed=True))
    r = authed.post(PREFIX + "/engines", json={"checkpoint": "nope", "profiles": ["1x64x64x75"]})
    assert_error_body(r, 400)
    # local without auth (the default): open, as A1111's own API is
    assert_error_body(client(env.app(None), auth=False).delete(PREFIX + "/engines/no-such-0123456789abcdef"), 404)


@pytest.mark.parametrize(("opts", "exposed"), [
    ({}, False), ({"listen": True}, True), ({"share": True}, True), ({"ngrok": "token"}, True),
    ({"server_name": "0.0.0.0"}, True), ({"server_name": "192.168.1.20"}, True), ({"server_name": "gpu-box"}, True),
    ({"server_name": "127.0.0.1"}, False), ({"server_name": "localhost"}, False), ({"server_name": "::1"}, False),
    ({"server_name": "[::1]"}, False), ({"server_name": "127.0.0.2"}, False), ({"listen": False, "share": False}, False),
])
def test_webui_exposed_reads_a1111_flags(opts: dict[str, Any], exposed: bool) -> None:
    class CmdOpts:
        pass

    ns = CmdOpts()
    for k, v in opts.items():
        setattr(ns, k, v)
    assert webui_exposed(ns) is exposed


@pytest.mark.timeout(300)
def test_a1111_listen_without_api_auth_gets_403_and_status_keeps_secrets(tmp_path: Path, tiny_checkpoint: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the fake A1111's argument parsing and on_app_started: --listen alone refuses changes; --listen with
    --api-auth needs the credentials; /status never shows the planted secrets (in the WebUI too)."""
    from fakehost import FakeHost
    from sdtrt.webui import service as service_module

    secret_env = "env-secret-value-4b1d9e"
    monkeypatch.setenv("SDTRT_TEST_PLANTED_SECRET", secret_env)
    ckpt = tiny_checkpoint("sd1")
    cfg = {"sdtrt_cache_dir": str(tmp_path / "cache")}
    for n, (args, anon_post, authed) in enumerate([
        (["--listen"], 403, None),
        (["--server-name", "127.0.0.1"], 400, None),
        (["--listen", "--api-auth", f"{USER}:{PASSWORD}", "--gradio-auth", f"web:{PASSWORD}"], 401, 400),
    ]):
        service_module._SERVICE = None
        host = FakeHost.boot(tmp_path / f"h{n}", [ckpt], args=["--no-half", *args], config=cfg,
                             extensions={"sd-webui-trt": Path(__file__).resolve().parents[1]})
        try:
            anon = host.client()
            bad = {"checkpoint": "sd1-s0", "profiles": ["1x65x64x75"]}
            r = anon.post(PREFIX + "/engines", json=bad)
            assert r.status_code == anon_post, r.text
            if anon_post == 403:
                assert "--api-auth" in r.json()["detail"]
                assert anon.get(PREFIX + "/status").status_code == 200
            if authed is not None:
                c = host.client(auth=(USER, PASSWORD))
                assert c.post(PREFIX + "/engines", json=bad).status_code == authed
                for r in [c.get(PREFIX + p) for p in ("/status", "/engines", "/jobs")] + [anon.get(PREFIX + "/status")]:
                    assert_no_secrets(r.text, [PASSWORD, secret_env], flags=r.status_code == 200)
        finally:
            close_webuis([host])


# ---- ids never reach outside the cache ----------------------------------------------------------------------------
_RECORDING: list[list[tuple[str, str]]] = []
_FS_EVENTS = {"open", "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.listdir", "os.scandir", "shutil.rmtree",
              "os.symlink", "os.link", "os.chmod", "os.chown", "os.truncate", "os.utime", "os.chdir", "shutil.move",
              "shutil.copyfile", "os.replace", "os.unlink", "os.makedirs"}
_ON_THE_ENTRY = {"os.rename", "os.replace", "os.remove", "os.unlink", "os.rmdir", "os.symlink", "shutil.move"}
_HOOKED = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _RECORDING or event not in _FS_EVENTS:
        return
    for a in args[:2] if event in ("os.rename", "os.link", "os.symlink", "shutil.move") else args[:1]:
        if isinstance(a, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(a))
            if event in _ON_THE_ENTRY:  # acts on the directory entry itself, even when it is a symlink
                where = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
            else:  # follows symlinks: reading through a link counts as reading its target
                where = os.path.realpath(path)
            _RECORDING[-1].append((event, where))


@contextlib.contextmanager
def record_fs(seen: list[tuple[str, str]] | None = None) -> Iterator[list[tuple[str, str]]]:
    """Every file-system access (Python audit events) by any thread while active, appended to `seen`."""
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    seen = [] if seen is None else seen
    _RECORDING.append(seen)
    try:
        yield seen
    finally:
        _RECORDING.remove(seen)


#: Source the frameworks read (FastAPI inspects the endpoint for its error context; lazy imports): code, never a
#: path an id could name. Only reads of these are allowed outside the cache.
_CODE_DIRS = tuple(os.path.realpath(d) + os.sep for d in
                   {sys.prefix, sys.base_prefix, str(Path(sdtrt.__file__).resolve().parent)})


def assert_inside(seen: list[tuple[str, str]], cache: Path) -> int:
    """All recorded accesses are inside the cache, except reads of installed or extension source code."""
    root = os.path.realpath(cache)
    inside = [(e, p) for e, p in seen if p == root or p.startswith(root + os.sep)]
    code = [(e, p) for e, p in seen if e == "open" and p.endswith((".py", ".pyc", ".so")) and p.startswith(_CODE_DIRS)]
    escapes = [x for x in seen if x not in inside and x not in code]
    assert not escapes, escapes[:10]
    return len(inside)


NASTY_IDS = ["..", ".", "../", "../..", "../outside/victim", "..%2Foutside", "%2e%2e", "%2E%2E%2F", "%252e%252e",
             "..\\..\\outside", "/etc/passwd", "//etc/passwd", "~", "~root", "a\x00b", "\x00", "%00", "sd1\x00/../x",
             "ü", "engine-\u202e", "\ufeffsd1", "Ａ", "😀", "a" * 129, "a" * 5000, "a" * 60_000, "CON", "NUL",
             "sd1-onnxruntime-0123456789ABCDEF", "sd1-onnxruntime-0123456789abcdef\n", " sd1", "sd1 ", "-sd1",
             ".hidden", ".tmp-sd1-x-1-abc", ".locks", "a..b", "a/b", "a%2Fb", "0" * 31, "0" * 33, "g" * 32]


LISTINGS = {PREFIX + "/engines", PREFIX + "/jobs", PREFIX + "/status"}


def refused_or_harmless(method: str, r: Any) -> bool:
    """What an id route may answer a hostile id: 400, 404 or 405 (the URL, normalized by the client, matched
    another route or none), or, for a GET the client normalized into a listing ('jobs/.' -> 'jobs/'), the
    listing: reading, no change."""
    if r.status_code in (400, 404, 405):
        return True
    return method == "GET" and r.status_code == 200 and r.url.path in LISTINGS


def id_urls(raw: str, route: str) -> list[str]:
    """The id as clients could put it in a URL: percent-encoded, with slashes and escapes left raw, double-encoded."""
    return [concrete(route, quote(raw, safe="")), concrete(route, quote(raw, safe="/%.~")),
            concrete(route, quote(quote(raw, safe=""), safe=""))]


ID_ROUTES = [("DELETE", PREFIX + "/engines/{engine_id}"), ("POST", PREFIX + "/engines/{engine_id}/rebuild"),
             ("GET", PREFIX + "/jobs/{job_id}"), ("DELETE", PREFIX + "/jobs/{job_id}")]


def test_hostile_ids_get_400_or_404_and_touch_nothing_outside(env: Env) -> None:
    c = client(env.app({USER: PASSWORD}))
    extra = [str(env.outside / "canary.txt"), str(env.outside), str(env.root / "canary-beside-cache.txt"),
             "../" * 8 + str(env.outside / "canary.txt").lstrip("/")]
    codes: Counter[int] = Counter()
    with record_fs() as seen:
        for raw in NASTY_IDS + extra:
            for method, route in ID_ROUTES:
                for url in id_urls(raw, route):
                    r = c.request(method, url)
                    codes[r.status_code] += 1
                    assert refused_or_harmless(method, r), (raw[:80], url[:120], r.status_code, r.text[:200])
                    if r.status_code == 400:  # 404/405 may come from the router (no route of ours matched)
                        assert_error_body(r, 400)
    accesses = assert_inside(seen, env.cache)
    env.assert_canaries_untouched()
    assert (env.cache / env.engine_id).is_dir() and len(env.svc.jobs.list()) == 0
    print(f"ids: {len(NASTY_IDS) + len(extra)} hand-picked ids x 4 routes x 3 encodings: {dict(codes)}; "
          f"{accesses} file-system accesses, all inside the cache")


def test_symlink_in_the_cache_pointing_outside_is_never_followed(env: Env) -> None:
    c = client(env.app({USER: PASSWORD}))
    with record_fs() as seen:
        rows = {row["id"]: row for row in c.get(PREFIX + "/engines").json()["engines"]}
        assert rows[SYMLINK_ID]["ok"] is False and "symlink" in rows[SYMLINK_ID]["reason"]
        assert rows[env.engine_id]["ok"] is True
        assert_error_body(c.post(f"{PREFIX}/engines/{SYMLINK_ID}/rebuild"), 404)
        # deleting it removes the link in the cache, never what it points to
        assert c.delete(f"{PREFIX}/engines/{SYMLINK_ID}").json() == {"deleted": SYMLINK_ID}
    assert not os.path.lexists(env.cache / SYMLINK_ID)
    assert_inside(seen, env.cache)
    env.assert_canaries_untouched()
    assert (env.outside / "victim" / "manifest.json").is_file()


def _id_strategy(env: Env) -> st.SearchStrategy[str]:
    pieces = st.sampled_from(["..", ".", "", "%2e%2e", "%2E", "%2f", "%00", "\x00", "~", "outside", "victim",
                              "canary.txt", "etc", "passwd", SYMLINK_ID, env.engine_id[:10], "\\", "ü", "😀",
                              str(env.outside), str(env.cache)])
    return st.one_of(
        st.text(max_size=200),
        st.text(alphabet="./\\%2eEfF0aA-_~\x00", max_size=64),
        st.lists(pieces, min_size=1, max_size=8).map("/".join),
        st.lists(pieces, min_size=1, max_size=8).map("".join),
        st.from_regex(ENGINE_ID_PATTERN, fullmatch=True),
        st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
        st.integers(129, 20_000).map(lambda n: "a" * n),
        st.sampled_from(NASTY_IDS),
    )


@pytest.mark.timeout(600 if LONG else 120)
def test_generated_ids_never_escape_the_cache(env: Env) -> None:
    """N_IDS distinct hypothesis-generated ids, each sent to one of the 4 id routes (hypothesis picks the route and
    the URL encoding); every file-system access made while serving them is recorded."""
    c = client(env.app({USER: PASSWORD}))
    codes: Counter[int] = Counter()
    per_route: Counter[str] = Counter()
    ids: set[str] = set()
    seen: list[tuple[str, str]] = []
    strategy = _id_strategy(env)

    def run(n: int) -> None:
        # derandomize=False: under CI=true hypothesis's CI profile derandomizes, and every round would draw the
        # same examples again, so the loop below would never reach N_IDS distinct ids
        @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate], derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(raw=strategy, route=st.sampled_from(ID_ROUTES), encoding=st.integers(0, 2))
        def one(raw: str, route: tuple[str, str], encoding: int) -> None:
            method, path = route
            url = id_urls(raw, path)[encoding]
            with record_fs(seen):  # only around the request: hypothesis keeps its own files elsewhere
                r = c.request(method, url)
            ids.add(raw)
            per_route[f"{method} {path}"] += 1
            codes[r.status_code] += 1
            if method == "DELETE" and r.status_code == 200 and r.json() == {"deleted": SYMLINK_ID}:
                env.make_symlink()  # the link itself was removed (inside the cache); put it back
                return
            assert refused_or_harmless(method, r), (raw[:80], url[:120], r.status_code, r.text[:200])
            assert "Traceback" not in r.text

        one()

    t0 = time.monotonic()
    while len(ids) < N_IDS:  # hypothesis repeats some examples: go on until N_IDS distinct ids were sent
        run(max(50, int((N_IDS - len(ids)) * 1.15)))
    accesses = assert_inside(seen, env.cache)
    env.assert_canaries_untouched()
    assert (env.cache / env.engine_id).is_dir() and len(env.svc.jobs.list()) == 0
    print(f"ids: {len(ids)} distinct generated ids, {sum(per_route.values())} requests {dict(per_route)}, "
          f"statuses {dict(codes)}, {accesses} file-system accesses inside the cache, 0 outside, canaries "
          f"unchanged, {time.monotonic() - t0:.1f} s")


# ---- oversized and absurd bodies ---------------------------------------------------------------------------
def test_huge_deep_and_absurd_bodies_are_refused_without_a_job(env: Env) -> None:
    c = client(env.app({USER: PASSWORD}))
    url = PREFIX + "/engines"
    cap = api_module.MAX_BODY_BYTES
    ok_body = {"checkpoint": EXAMPLE_CKPT, "profiles": ["1x64x64x75"]}
    cases: list[tuple[str, dict[str, Any], tuple[int, ...]]] = [
        ("16 MiB body", {"content": b'{"checkpoint":"' + b"a" * (16 << 20) + b'"}',
                         "headers": {"content-type": "application/json"}}, (413,)),
        ("one byte over the cap", {"content": b" " * (cap + 1), "headers": {"content-type": "application/json"}},
         (413,)),
        ("streamed (chunked) over the cap", {"content": iter([b"[" * 4096] * 64),
                                             "headers": {"content-type": "application/json"}}, (413,)),
        ("lying content-length", {"content": b"{}", "headers": {"content-length": "999999999999",
                                                                 "content-type": "application/json"}}, (413, 400)),
        ("nested 30000 deep", {"content": b"[" * 30000 + b"]" * 30000,
                               "headers": {"content-type": "application/json"}}, (400, 422)),
        ("nested inside a field", {"content": b'{"checkpoint":"x","profiles":' + b"[" * 20000 + b"]" * 20000 + b"}",
                                   "headers": {"content-type": "application/json"}}, (400, 422)),
        ("10000 profiles", {"json": {**ok_body, "profiles": ["1x64x64x75"] * 10000}}, (413, 422)),
        ("33 profiles", {"json": {**ok_body, "profiles": ["1x64x64x75"] * 33}}, (422,)),
        ("profile 1 MB", {"json": {**ok_body, "profiles": ["1" * (1 << 20)]}}, (413,)),
        ("profile of 201 chars", {"json": {**ok_body, "profiles": ["1x64x64x75" + " " * 191]}}, (422,)),
        ("checkpoint 2000 chars", {"json": {**ok_body, "checkpoint": "c" * 2000}}, (422,)),
        ("batch 1e9", {"json": {**ok_body, "profiles": ["1000000000x512x512x75"]}}, (400,)),
        ("batch 999999", {"json": {**ok_body, "profiles": ["999999x512x512x75"]}}, (400,)),
        ("width 1e9", {"json": {**ok_body, "profiles": ["1x512x1000000000x75"]}}, (400,)),
        ("width 999992", {"json": {**ok_body, "profiles": ["1x512x999992x75"]}}, (400,)),
        ("tokens 1e9 in max", {"json": {**ok_body, "profiles": ["1x64x64x75:1x64x64x75:1x64x64x1000000000"]}},
         (400,)),
        ("1e9 as text", {"json": {**ok_body, "profiles": ["1e9x512x512x75"]}}, (400,)),
        ("batch as a number", {"json": {**ok_body, "profiles": [1e9]}}, (422,)),
        ("NaN literal", {"content": b'{"checkpoint":"x","profiles":[NaN]}',
                         "headers": {"content-type": "application/json"}}, (422,)),
        ("Infinity literal", {"content": b'{"checkpoint":"x","profiles":["1x64x64x75"],"dtype":Infinity}',
                              "headers": {"content-type": "application/json"}}, (422,)),
        ("negative batch", {"json": {**ok_body, "profiles": ["-1x64x64x75"]}}, (400,)),
        ("min > max", {"json": {**ok_body, "profiles": ["4x64x64x75:2x64x64x75:1x64x64x75"]}}, (400,)),
        ("unknown field", {"json": {**ok_body, "profile": "1x64x64x75"}}, (422,)),
        ("not an object", {"json": ["1x64x64x75"]}, (422,)),
        ("not JSON", {"content": b"\xff\xfe\x00garbage", "headers": {"content-type": "application/json"}},
         (400, 422)),
        ("form-encoded", {"content": b"checkpoint=x&profiles=1x64x64x75",
                          "headers": {"content-type": "application/x-www-form-urlencoded"}}, (422,)),
        ("empty", {"content": b"", "headers": {"content-type": "application/json"}}, (422,)),
        ("null", {"content": b"null", "headers": {"content-type": "application/json"}}, (422,)),
        ("lone surrogate", {"content": b'{"checkpoint":"\\ud800","profiles":["1x64x64x75"]}',
                            "headers": {"content-type": "application/json"}}, (400, 422)),
        ("NUL in checkpoint", {"json": {**ok_body, "checkpoint": "a\x00b"}}, (400,)),
    ]
    seen: dict[str, int] = {}
    for name, kw, codes in cases:
        r = c.post(url, **kw)
        assert_error_body(r, *codes)
        seen[name] = r.status_code
    assert env.svc.jobs.list() == []
    print("bodies:", seen)
    # the same body at a legal size is accepted: the refusals were about size and shape, not the route
    assert c.post(url, json=ok_body).status_code == 202


def test_a_streamed_body_stops_being_read_past_the_cap(env: Env) -> None:
    """Straight through ASGI: 1,000 chunks of 16 KiB offered, no Content-Length; the app must stop asking for
    more once the cap is passed (memory stays bounded) and answer 413."""
    app = env.app({USER: PASSWORD})
    chunk = b"[" * 16384
    offered = {"n": 0}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        offered["n"] += 1
        return {"type": "http.request", "body": chunk, "more_body": offered["n"] < 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(http_scope("POST", PREFIX + "/engines"), receive, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 413
    assert offered["n"] <= api_module.MAX_BODY_BYTES // len(chunk) + 2
    assert env.svc.jobs.list() == []


def http_scope(method: str, path: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    hs = {**AUTH, "content-type": "application/json", **(headers or {})}
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": [(k.lower().encode(), v.encode()) for k, v in hs.items()],
            "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}


# ---- a burst of builds ---------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_burst_of_builds_gets_429_past_the_cap_and_duplicates_share_a_job(env: Env) -> None:
    import httpx

    svc = env.svc
    app = env.app({USER: PASSWORD})
    gate = threading.Event()

    def occupy(job: Any, progress: Any) -> dict[str, Any]:  # a long build holding the worker
        while not gate.wait(0.01):
            progress("building", 0.5)
        return {}

    blocker = svc.jobs.submit({"blocker": True}, occupy)
    deadline = time.monotonic() + 30
    while svc.jobs.get(blocker.id).state != RUNNING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert svc.jobs.get(blocker.id).state == RUNNING
    cap = svc.jobs.max_queued
    distinct = [f"1x64x{64 + 8 * i}x75" for i in range(60)]
    bodies = [{"checkpoint": EXAMPLE_CKPT, "profiles": [p]} for p in distinct]
    bodies += [{"checkpoint": EXAMPLE_CKPT, "profiles": [distinct[i % 12]]} for i in range(40)]  # duplicates

    async def burst() -> list[tuple[str, Any]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH) as ac:
            rs = await asyncio.gather(*(ac.post(PREFIX + "/engines", json=b) for b in bodies))
        return [(b["profiles"][0], r) for b, r in zip(bodies, rs)]

    t0 = time.monotonic()
    answers = asyncio.run(burst())
    elapsed = time.monotonic() - t0
    try:
        codes = Counter(r.status_code for _, r in answers)
        assert set(codes) <= {202, 429}, codes
        by_profile: dict[str, set[str]] = {}
        for profile, r in answers:
            if r.status_code == 202:
                by_profile.setdefault(profile, set()).add(r.json()["job_id"])
            else:
                assert assert_error_body(r, 429)["error"] == "QueueFull"
        assert all(len(ids) == 1 for ids in by_profile.values()), by_profile  # duplicates: the same job
        queued = [j for j in svc.jobs.list() if j.state == QUEUED]
        assert len(queued) == cap == len(by_profile)  # exactly the cap; nothing created for a 429
        assert len(svc.jobs.list()) == cap + 1
        # while queued, and while running, an identical request returns that job
        c = client(app)
        first = queued[0]
        again = c.post(PREFIX + "/engines", json={"checkpoint": EXAMPLE_CKPT, "profiles": first.request["profiles"]})
        assert again.status_code == 202 and again.json()["job_id"] == first.id
        dup_429 = sum(1 for p, r in answers if r.status_code == 429 and p in distinct[:12])
        print(f"build flood: 100 POSTs in {elapsed:.2f} s: {dict(codes)}; {len(by_profile)} jobs queued (cap {cap}); "
              f"{sum(1 for p, r in answers if r.status_code == 202) - len(by_profile)} duplicates answered with the "
              f"existing job, {dup_429} duplicate(s) of refused requests refused too")
        for j in queued:
            assert c.delete(f"{PREFIX}/jobs/{j.id}").json()["state"] == CANCELLED
        assert c.post(PREFIX + "/engines", json=bodies[0]).status_code == 202  # room again after cancelling
    finally:
        gate.set()
        svc.jobs.wait(blocker.id, timeout=10)


# ---- clients that disconnect ---------------------------------------------------------------------------------
async def disconnecting_call(app: Any, method: str, path: str, body: bytes, *, mid_body: bool = False,
                             send_raises: bool = True) -> list[dict[str, Any]]:
    """One request whose client goes away: after sending the body (or halfway through it), every receive() says
    http.disconnect and, like a server writing to a closed socket, send() raises."""
    state = {"sent_body": False}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not state["sent_body"]:
            state["sent_body"] = True
            return {"type": "http.request", "body": body[: len(body) // 2] if mid_body else body,
                    "more_body": mid_body}
        await asyncio.sleep(0)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if send_raises:
            raise OSError("Broken pipe: the client closed the connection")
        sent.append(message)

    with contextlib.suppress(OSError):
        await app(http_scope(method, path, {"content-length": str(len(body))} if not mid_body else None),
                  receive, send)
    return sent


def sdtrt_threads() -> set[threading.Thread]:
    """Threads this code could leak: everything but anyio's pooled workers (which idle out on their own)."""
    return {t for t in threading.enumerate() if not t.name.startswith("AnyIO worker")}


@pytest.mark.timeout(300)
def test_client_disconnect_does_not_cancel_the_job_or_leak_threads(tmp_path: Path, engine_src: Path,
                                                                   tiny_checkpoint: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDTRT_CACHE", raising=False)
    env = Env(tmp_path / "api", engine_src, tiny_checkpoint("sd1", 0))
    try:
        app = env.app({USER: PASSWORD})
        c = client(app)
        # warm up: the job worker thread exists from the first submit on (one per service, reused)
        warm = c.post(PREFIX + "/engines", json={"checkpoint": EXAMPLE_CKPT, "profiles": ["1x64x64x75"]}).json()
        env.svc.jobs.wait(warm["job_id"], timeout=30)
        baseline = sdtrt_threads()

        body = json.dumps({"checkpoint": "sd1-s0", "profiles": ["1x64x72x75"], "backend": "onnxruntime"}).encode()

        async def scenario() -> None:
            # gone halfway through the body: nothing runs
            for _ in range(10):
                await disconnecting_call(app, "POST", PREFIX + "/engines", body, mid_body=True)
            assert [j for j in env.svc.jobs.list() if j.request.get("checkpoint") != EXAMPLE_CKPT] == []
            # gone after the body, before the answer: the build is queued and runs; repeats join the same job
            for i in range(10):
                await disconnecting_call(app, "POST", PREFIX + "/engines", body, send_raises=i % 2 == 0)

        asyncio.run(scenario())
        [job] = [j for j in env.svc.jobs.list() if j.request.get("checkpoint") != EXAMPLE_CKPT]
        assert job.state in (QUEUED, RUNNING)
        # a poller that disconnects does not disturb it either
        asyncio.run(disconnecting_call(app, "GET", f"{PREFIX}/jobs/{job.id}", b""))
        # while it runs, the identical request answers with this job (idempotent)
        deadline = time.monotonic() + 30
        while env.svc.jobs.get(job.id).state == QUEUED and time.monotonic() < deadline:
            time.sleep(0.01)
        sent_at = time.time()
        dup = c.post(PREFIX + "/engines", content=body, headers={"content-type": "application/json"})
        assert dup.status_code == 202
        if dup.json()["job_id"] != job.id:  # only if the build had already finished (a very fast machine)
            finished = env.svc.jobs.get(job.id).finished
            assert finished is not None and finished <= sent_at
            env.svc.jobs.wait(dup.json()["job_id"], timeout=240)
        done = env.svc.jobs.wait(job.id, timeout=240)
        assert done.state == "done", (done.state, done.error)
        assert done.result is not None and (env.cache / done.result["engine_id"] / "manifest.json").is_file()
        time.sleep(0.2)
        leaked = {t.name for t in sdtrt_threads() - baseline}
        print(f"disconnects: 20 disconnecting clients (10 mid-body, 10 before the answer) and a disconnecting poller: "
              f"1 job, state {done.state}; threads leaked: {sorted(leaked) or 0}")
        assert not leaked
        assert len(env.svc.jobs.list()) == (2 if dup.json()["job_id"] == job.id else 3)
    finally:
        env.close()


# ---- no secrets in what the API answers ---------------------------------------------------------------------
FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9]+(?:-[a-z0-9]+)*")


def assert_no_secrets(text: str, planted: list[str], *, flags: bool = True) -> None:
    """No planted secret (plain or base64), no environment value and, in data answers (`flags`), no command-line
    flag. Error answers may name a flag to set (401: "needs the --api-auth credentials"), never its value."""
    for secret in planted:
        assert secret not in text, secret
        assert base64.b64encode(secret.encode()).decode() not in text
    if flags:
        assert not FLAG_RE.search(text), FLAG_RE.search(text)
    for key, value in os.environ.items():
        if len(value) >= 12 and not value.startswith("/") and "/" not in value:
            assert value not in text, key
    assert "Traceback" not in text


def test_status_and_listings_hold_no_flags_environment_or_credentials(env: Env, monkeypatch: pytest.MonkeyPatch
                                                                       ) -> None:
    secret_env = "env-secret-value-91c2aa"
    monkeypatch.setenv("SDTRT_TEST_PLANTED_SECRET", secret_env)
    monkeypatch.setenv("HF_TOKEN", "hf_plantedtoken0123456789")
    monkeypatch.setattr(sys, "argv", ["webui.py", "--listen", "--api-auth", f"{USER}:{PASSWORD}",
                                      "--gradio-auth", f"web:{PASSWORD}"])
    app = env.app({USER: PASSWORD})
    c = client(app)
    planted = [PASSWORD, secret_env, "hf_plantedtoken0123456789"]
    c.post(PREFIX + "/engines", json={"checkpoint": EXAMPLE_CKPT, "profiles": ["1x64x64x75"]})
    answers = [c.get(PREFIX + p) for p in ("/status", "/engines", "/jobs")]
    answers += [client(app, auth=False).get(PREFIX + "/status"),
                c.get(PREFIX + "/jobs/" + "0" * 32), c.delete(PREFIX + "/engines/" + "x" * 300)]
    answers.append(TestClient(app, headers={"Authorization": "Basic " + base64.b64encode(
        f"{USER}:{PASSWORD[:-1]}".encode()).decode()}).get(PREFIX + "/status"))
    for r in answers:
        assert_no_secrets(r.text, planted, flags=r.status_code == 200)
    status = answers[0].json()
    assert {"enabled", "backend", "fallback", "cache_dir", "active", "counters", "jobs"} <= set(status)
    print(f"secrets: {len(answers)} answers scanned (status, listings, errors, 401s): no planted password, "
          "token or environment value, no command-line flag")
