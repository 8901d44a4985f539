"""The host-agnostic WebUI core over a minimal host: which engines are offered, per-call serving with PyTorch
fallback, counters, notices, build jobs, the REST API and the tab's handlers."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import FP16_RUNS
from sdtrt.errors import NoMatchingProfile, ProfileError, SdtrtError
from sdtrt.pipeline.build import build_engine
from sdtrt.profiles import Profile
from sdtrt.webui import tab
from sdtrt.webui.jobs import CANCELLED, DONE, FAILED, JobNotFound, JobQueue
from sdtrt.webui.service import EngineService, OptionSpec
from webui_support import DictHost, fresh_service

PROFILE = "1x64x64x75:1x64x64x75:2x64x96x150"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint) -> Path:  # type: ignore[no-untyped-def]
    """A models folder whose default engine cache holds one onnxruntime engine built from sd1 seed 0."""
    root = tmp_path_factory.mktemp("models")
    build_engine(tiny_checkpoint("sd1", 0), [Profile.parse(PROFILE)], root / "Unet-sdtrt", backend="onnxruntime")
    return root


@pytest.fixture
def host(models: Path, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch) -> DictHost:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("SDTRT_CACHE", raising=False)
    h = DictHost(models)
    h.add_checkpoint(tiny_checkpoint("sd1", 0), load=True)
    h.add_checkpoint(tiny_checkpoint("sd1", 1))
    h.add_checkpoint(tiny_checkpoint("sdxl-base", 0))
    return h


@pytest.fixture
def svc(host: DictHost):  # type: ignore[no-untyped-def]
    with fresh_service(host) as s:
        yield s


def inputs(batch: int = 2, h: int = 8, w: int = 8, rows: int = 77, ctx: int = 32, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, h, w, generator=g), torch.tensor([999.0, 500.5][:batch] * (batch // 2 or 1))[:batch],
            torch.randn(batch, rows, ctx, generator=g))


def context_dim(host: DictHost) -> int:
    assert host.unet is not None
    return int(host.unet.spec.context_dim)


def option(svc: EngineService, label_part: str) -> OptionSpec:
    specs = svc.unet_options()
    found = [s for s in specs if label_part in s.label]
    assert found, [s.label for s in specs]
    return found[0]


# ---- options ----------------------------------------------------------------------------------------------
def test_options_offer_the_engine_for_its_checkpoint_and_per_engine(svc: EngineService) -> None:
    specs = svc.unet_options()
    labels = [s.label for s in specs]
    assert "[TRT] sd1-s0" in labels
    [own] = [s for s in specs if s.label == "[TRT] sd1-s0"]
    assert own.model_name == "sd1-s0" and len(own.engine_ids) == 1
    [per_engine] = [s for s in specs if s.label == f"[TRT] {own.engine_ids[0]}"]
    assert per_engine.model_name is None  # only by name: "Automatic" never picks it
    assert len(set(labels)) == len(labels)


def test_loaded_checkpoint_of_the_same_architecture_gets_a_refit_option(host: DictHost, svc: EngineService) -> None:
    host.load(host.refs[1])  # sd1 seed 1: same architecture, no engine of its own
    assert "[TRT] sd1-s1" in [s.label for s in svc.unet_options()]
    host.load(host.refs[2])  # sdxl: no engine fits
    assert all(s.model_name != "sdxl-base-s0" for s in svc.unet_options())


def test_backend_setting_filters_engines(host: DictHost, svc: EngineService) -> None:
    host.set(backend="tensorrt")
    assert svc.unet_options() == []
    host.set(backend="onnxruntime")
    assert svc.unet_options()


# ---- serving ----------------------------------------------------------------------------------------------
def test_engine_serves_calls_like_pytorch_and_counts_them(host: DictHost, svc: EngineService) -> None:
    server = svc.make_server(option(svc, "sd1-s0"))
    svc.activate(server, "[TRT] sd1-s0")
    assert server.unusable is None
    for batch, w, rows in ((2, 8, 77), (1, 8, 154), (4, 12, 154)):
        x, t, c = inputs(batch, 8, w, rows, context_dim(host), seed=batch)
        got = server(x, t.half(), c)  # A1111 hands fp16 timesteps
        want = host.unet(x, t.half().float(), c)
        assert got.shape == want.shape and got.dtype == x.dtype
        assert want.abs().max() > 0.1
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    snap = svc.counters.snapshot()
    assert snap["engine_calls"] == 3 and snap["fallback_calls"] == 0 and snap["refits"] == 0


def test_cuda_graphs_setting_reloads_engines_at_the_next_generation(host: DictHost, svc: EngineService) -> None:
    """The setting reaches the backend: engines load with it, and a change reloads them when a generation begins
    (not mid-generation); calls keep matching PyTorch either way."""
    server = svc.make_server(option(svc, "sd1-s0"))
    svc.activate(server, "[TRT] sd1-s0")
    x, t, c = inputs(2, 8, 8, 77, context_dim(host))
    server(x, t, c)
    (first,) = [s.session for s in server.slots if s.session is not None]
    assert first.cuda_graphs is True
    host.set(cuda_graphs=False)
    server(x, t, c)
    assert [s.session for s in server.slots if s.session is not None] == [first]  # mid-generation: unchanged
    svc.begin(object())
    torch.testing.assert_close(server(x, t, c), host.unet(x, t, c), rtol=1e-4, atol=1e-4)
    (second,) = [s.session for s in server.slots if s.session is not None]
    assert first.closed and second is not first and second.cuda_graphs is False
    svc.begin(object())
    server(x, t, c)
    assert [s.session for s in server.slots if s.session is not None] == [second]  # no change: no reload
    host.set(cuda_graphs=True)


def test_other_checkpoint_is_refitted_into_the_engine(host: DictHost, svc: EngineService) -> None:
    host.load(host.refs[1])
    server = svc.make_server(option(svc, "sd1-s1"))
    svc.activate(server, "[TRT] sd1-s1")
    x, t, c = inputs(2, 8, 8, 77, context_dim(host))
    got = server(x, t, c)
    torch.testing.assert_close(got, host.unet(x, t, c), rtol=1e-4, atol=1e-4)
    assert svc.counters.snapshot()["refits"] == 1
    host.load(host.refs[0])
    assert (got - host.unet(x, t, c)).abs().max() > 1e-2  # the seed-0 weights really were replaced


def test_call_outside_every_profile_runs_on_pytorch_and_tells_once(host: DictHost, svc: EngineService) -> None:
    server = svc.make_server(option(svc, "sd1-s0"))
    svc.activate(server, "x")
    p = object()
    svc.begin(p)
    x, t, c = inputs(2, 16, 16, 77, context_dim(host))
    for _ in range(3):
        got = server(x, t, c)
        assert torch.equal(got, host.unet(x, t, c))
    svc.end(p)
    snap = svc.counters.snapshot()
    assert snap["fallback_calls"] == 3 and snap["engine_calls"] == 0
    [(reason, n)] = snap["fallback_reasons"].items()
    assert n == 3 and "128x128 px" in reason and PROFILE in reason
    assert len(host.told) == 1 and host.told[0][0] is p and "PyTorch" in host.told[0][1]


def test_error_policy_fails_the_call_with_advice(host: DictHost, svc: EngineService) -> None:
    host.set(fallback="error")
    server = svc.make_server(option(svc, "sd1-s0"))
    x, t, c = inputs(2, 16, 16, 77, context_dim(host))
    with pytest.raises(NoMatchingProfile, match="Build an engine with a profile for this size"):
        server(x, t, c)


def test_switched_off_runs_pytorch_without_notice(host: DictHost, svc: EngineService) -> None:
    server = svc.make_server(option(svc, "sd1-s0"))
    host.set(enabled=False)
    p = object()
    svc.begin(p)
    x, t, c = inputs(2, 8, 8, 77, context_dim(host))
    assert torch.equal(server(x, t, c), host.unet(x, t, c))
    svc.end(p)
    assert svc.counters.snapshot()["engine_calls"] == 0 and host.told == []


def test_engine_of_another_family_falls_back_with_the_reason(host: DictHost, svc: EngineService) -> None:
    spec = option(svc, "sd1-s0")
    host.load(host.refs[2])  # SDXL now loaded, SD1 engine selected by name
    server = svc.make_server(spec)
    assert server.unusable and "sd1" in server.unusable and "sdxl-base" in server.unusable
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 10.0])
    c, y = torch.randn(2, 77, context_dim(host), generator=g), torch.randn(2, 2816, generator=g)
    assert torch.equal(server(x, t, c, y=y), host.unet(x, t, c, y=y))


def test_damaged_engine_falls_back_instead_of_failing(host: DictHost, svc: EngineService, models: Path) -> None:
    spec = option(svc, "sd1-s0")
    engine_dir = svc.registry().engine_dir(spec.engine_ids[0])
    onnx = next(engine_dir.glob("*.onnx"))
    original = onnx.read_bytes()
    try:
        onnx.write_bytes(original[:-10] + b"0123456789")  # same size, different hash
        server = svc.make_server(spec)
        x, t, c = inputs(2, 8, 8, 77, context_dim(host))
        assert torch.equal(server(x, t, c), host.unet(x, t, c))
        assert "cannot be used" in (svc.counters.snapshot()["last_error"] or "")
    finally:
        onnx.write_bytes(original)


def test_extra_unet_inputs_go_to_pytorch(host: DictHost, svc: EngineService) -> None:
    server = svc.make_server(option(svc, "sd1-s0"))
    x, t, c = inputs(2, 8, 8, 77, context_dim(host))
    calls: list[dict[str, Any]] = []
    host.torch_forward = lambda unet: (lambda *a, **k: calls.append(k) or unet(*a[:3]))  # type: ignore[method-assign]
    server(x, t, c, control=[torch.zeros(1)])
    assert calls and "control" in calls[0]
    assert "extra inputs" in next(iter(svc.counters.snapshot()["fallback_reasons"]))


# ---- jobs ------------------------------------------------------------------------------------------------
def test_jobs_run_one_at_a_time_in_order_and_report_failures() -> None:
    q = JobQueue()
    running = threading.Semaphore(1)
    order: list[int] = []
    overlap: list[bool] = []

    def work(n: int) -> Any:
        def run(job: Any, progress: Any) -> dict[str, Any]:
            overlap.append(not running.acquire(blocking=False))
            try:
                for i in range(3):
                    progress("step", (i + 1) / 3)
                    time.sleep(0.01)
                order.append(n)
                if n == 2:
                    raise SdtrtError("the checkpoint is broken")
                return {"n": n}
            finally:
                running.release()
        return run

    jobs = [q.submit({"n": n}, work(n)) for n in range(4)]
    done = [q.wait(j.id, timeout=10) for j in jobs]
    assert order == [0, 1, 2, 3] and not any(overlap)
    assert [j.state for j in done] == [DONE, DONE, FAILED, DONE]
    assert done[2].error == "the checkpoint is broken" and done[0].result == {"n": 0}


def test_cancel_and_unknown_jobs() -> None:
    q = JobQueue()
    gate = threading.Event()

    def slow(job: Any, progress: Any) -> dict[str, Any]:
        while not gate.is_set():
            progress("waiting", 0.1)
            time.sleep(0.01)
        return {}

    first, second = q.submit({}, slow), q.submit({}, slow)
    assert q.cancel(second.id).state == CANCELLED
    q.cancel(first.id)
    assert q.wait(first.id, timeout=10).state == CANCELLED
    with pytest.raises(JobNotFound, match="invalid job id"):
        q.get("../../etc")
    with pytest.raises(JobNotFound, match="no job"):
        q.get("0" * 32)


# ---- REST API ---------------------------------------------------------------------------------------------
@pytest.fixture
def api(svc: EngineService):  # type: ignore[no-untyped-def]
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sdtrt.webui.api import mount

    app = FastAPI()
    mount(app, svc, {"ops": "s3cret"})
    client = TestClient(app)
    client.headers["Authorization"] = "Basic " + base64.b64encode(b"ops:s3cret").decode()
    return client


def wait_job(api: Any, job_id: str) -> dict[str, Any]:
    for _ in range(600):
        job = api.get(f"/sdtrt/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError("job did not finish")


def test_api_requires_the_webui_credentials(api: Any) -> None:
    from fastapi.testclient import TestClient

    anon = TestClient(api.app)
    r = anon.get("/sdtrt/v1/engines")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic"
    wrong = anon.get("/sdtrt/v1/status", headers={"Authorization": "Basic " + base64.b64encode(b"ops:no").decode()})
    assert wrong.status_code == 401
    assert api.get("/sdtrt/v1/engines").status_code == 200


def test_api_build_job_then_engine_listed_then_deleted(api: Any, host: DictHost, svc: EngineService) -> None:
    before = {e["id"] for e in api.get("/sdtrt/v1/engines").json()["engines"]}
    r = api.post("/sdtrt/v1/engines", json={"checkpoint": "sd1-s1", "profiles": ["1x64x64x75"],
                                            "backend": "onnxruntime"})
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["job_id"])
    assert job["state"] == "done", job
    engines = {e["id"]: e for e in api.get("/sdtrt/v1/engines").json()["engines"]}
    new = job["engine_id"]
    assert new in engines and new not in before and engines[new]["ok"] and engines[new]["family"] == "sd1"
    assert engines[new]["convention"] == "a1111" and job["request"]["convention"] == "a1111"  # the host's default
    assert (svc.registry().engine_dir(new) / "manifest.json").is_file()
    assert host.refreshes >= 1  # the SD Unet list was refreshed for the new engine
    assert api.delete(f"/sdtrt/v1/engines/{new}").json() == {"deleted": new}
    assert not svc.registry().engine_dir(new).exists()
    assert api.delete(f"/sdtrt/v1/engines/{new}").status_code == 404


def test_api_build_on_a_read_only_cache_is_refused_up_front_with_503(api: Any, svc: EngineService,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 14: the engines there keep serving (listed ok); a build is refused at once, no job is created."""
    from sdtrt.storage.registry import Registry

    probes = []

    def read_only_mkdir(path: Any, *a: Any, **k: Any) -> None:
        probes.append(path)
        raise OSError(30, "Read-only file system", str(path))

    jobs_before = len(api.get("/sdtrt/v1/jobs").json()["jobs"])
    monkeypatch.setattr("os.mkdir", read_only_mkdir)
    assert not Registry(svc.registry().root).writable()
    r = api.post("/sdtrt/v1/engines", json={"checkpoint": "sd1-s1", "profiles": ["1x64x64x75"],
                                            "backend": "onnxruntime"})
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "CacheNotWritable" and "not writable" in r.json()["detail"]
    assert len(api.get("/sdtrt/v1/jobs").json()["jobs"]) == jobs_before
    engines = api.get("/sdtrt/v1/engines").json()["engines"]
    assert engines and all(e["ok"] for e in engines)
    assert probes  # the probe really tried to write


def test_startup_garbage_collection_removes_dead_builds_only(svc: EngineService) -> None:
    root = svc.registry().root
    ids = [e.id for e in svc.registry().list()]
    dead = root / f".tmp-{ids[0]}-elsewhere-77-0badc0de"
    dead.mkdir()
    (dead / "model.onnx").write_bytes(b"partial")
    assert svc.collect_garbage(max_age_s=3600) == []  # fresh: could be a live build on another host
    assert svc.collect_garbage(max_age_s=0) == [dead.name]
    assert not dead.exists() and [e.id for e in svc.registry().list()] == ids


@pytest.mark.parametrize(("body", "needle"), [
    ({"checkpoint": "nope", "profiles": ["1x64x64x75"]}, "unknown checkpoint"),
    ({"checkpoint": "sd1-s0", "profiles": ["1x65x64x75"]}, "not a multiple of 8"),
    ({"checkpoint": "sd1-s0", "profiles": []}, "at least one profile"),
    ({"checkpoint": "sd1-s0", "profiles": ["1x64x64x75"], "backend": "cuda"}, "unknown backend"),
    ({"checkpoint": "sd1-s0", "profiles": ["1x64x64x75"], "convention": "comfy"},
     "convention must be 'a1111' or 'forge'"),
])
def test_api_rejects_bad_build_requests(api: Any, body: dict[str, Any], needle: str) -> None:
    r = api.post("/sdtrt/v1/engines", json=body)
    assert r.status_code == 400 and needle in r.json()["detail"]


def test_api_ids_cannot_reach_outside_the_cache(api: Any, svc: EngineService, tmp_path: Path) -> None:
    victim = svc.registry().root.parent / "victim"
    victim.mkdir(exist_ok=True)
    for bad in ("..", "..%2Fvictim", "%2E%2E", "Victim", "a" * 200):
        r = api.delete(f"/sdtrt/v1/engines/{bad}")
        assert r.status_code in (400, 404), (bad, r.status_code)
    assert victim.is_dir()
    assert api.get("/sdtrt/v1/jobs/..%2F..%2Fx").status_code in (400, 404)


def test_api_refuses_to_delete_the_active_engine_and_reports_status(api: Any, svc: EngineService,
                                                                   host: DictHost) -> None:
    spec = option(svc, "sd1-s0")
    server = svc.make_server(spec)
    svc.activate(server, spec.label)
    x, t, c = inputs(2, 8, 8, 77, context_dim(host))
    server(x, t, c)
    server(*inputs(2, 16, 16, 77, context_dim(host)))
    r = api.delete(f"/sdtrt/v1/engines/{spec.engine_ids[0]}")
    assert r.status_code == 409 and "in use" in r.json()["detail"]
    st = api.get("/sdtrt/v1/status").json()
    assert st["active"]["label"] == spec.label and st["active"]["engines"] == list(spec.engine_ids)
    assert st["counters"]["engine_calls"] == 1 and st["counters"]["fallback_calls"] == 1
    assert st["enabled"] is True and st["cache_dir"].endswith("Unet-sdtrt")


# ---- tab handlers -----------------------------------------------------------------------------------------
def test_profiles_text_and_editor() -> None:
    assert tab.profiles_from_text("# hires\n1x512x512x75\n\n1x256x256x75:1x512x512x75:2x768x768x150  # dyn") == [
        "1x512x512x75", "1x256x256x75:1x512x512x75:2x768x768x150"]
    with pytest.raises(SdtrtError, match="line 2: .*not a multiple of 8"):
        tab.profiles_from_text("1x512x512x75\n1x513x512x75")
    with pytest.raises(SdtrtError, match="no profiles"):
        tab.profiles_from_text("  \n# nothing")
    assert tab.profile_from_fields((1, 1, 1), (512, 512, 512), (512, 512, 512), (75, 75, 75)) == "1x512x512x75"
    assert tab.profile_from_fields((1, 2, 4), (256, 512, 768), (256, 512, 768), (75, 75, 150)) == \
        "1x256x256x75:2x512x512x75:4x768x768x150"
    with pytest.raises(SdtrtError, match="min <= opt <= max"):
        tab.profile_from_fields((4, 2, 1), (512,) * 3, (512,) * 3, (75,) * 3)
    # what gradio Number fields can hold: empty (None), NaN, infinity, fractions -> the same error type
    for bad in (None, float("nan"), float("inf"), 1.5, "x"):
        with pytest.raises(ProfileError, match="whole number"):
            tab.profile_from_fields((1, bad, 1), (512,) * 3, (512,) * 3, (75,) * 3)  # type: ignore[arg-type]
    for preset in tab.PRESETS.values():
        assert tab.profiles_from_text("\n".join(preset))


def test_tab_build_reports_progress_until_done(svc: EngineService) -> None:
    seen: list[float] = []
    msg = tab.run_build(svc, "sd1-s1", "1x64x64x75\n1x128x128x75", "onnxruntime",
                        lambda f, d: seen.append(f), poll=0.01)
    assert msg.startswith(("Built engine", "Already in the cache")), msg
    assert seen == sorted(seen) and seen and seen[-1] <= 1.0
    rows = tab.table(svc.engine_rows())
    assert any("1x128x128x75" in r[3] and r[1].startswith("ok") and r[-1] == "a1111" for r in rows)
    assert tab.HEADERS[-1] == "convention"
    assert tab.run_build(svc, "sd1-s1", "1x64x64", "onnxruntime", lambda f, d: None).startswith("Not started")
    assert tab.run_build(svc, "sd1-s1", "1x64x64x75", "onnxruntime", lambda f, d: None, convention="comfy"
                         ).startswith("Not started: convention must be 'a1111' or 'forge'")
    engine_id = msg.split("engine ")[1].split(" ")[0]
    assert tab.delete_engine(svc, engine_id) == f"Deleted {engine_id}."
    assert tab.delete_engine(svc, "../x").startswith("Not deleted: invalid engine id")


def test_tab_builds_ahead_of_time_for_named_targets(svc: EngineService) -> None:
    assert tab.run_build(svc, "sd1-s1", "1x64x64x75", "auto", lambda f, d: None,
                         targets="ampere").startswith("Not started: 'ampere' is not a GPU compute capability")
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        pytest.skip("tensorrt_rtx is not installed here (pip install tensorrt-rtx-cu12)")
    if torch.cuda.is_available() or not FP16_RUNS:
        pytest.skip("checks a float16 build on a machine without a GPU (torch 2.1 cannot trace float16 on a CPU)")
    msg = tab.run_build(svc, "sd1-s1", "1x64x64x75", "tensorrt-rtx", lambda f, d: None, poll=0.05,
                        targets="sm89, sm86")
    assert msg.startswith("Built engine") and "embeds its checkpoint's weights" in msg, msg
    [row] = [r for r in tab.table(svc.engine_rows()) if "tensorrt-rtx" in r[4]]
    assert row[4].endswith(" for sm86, sm89") and "no CUDA GPU" in row[1]  # built here, served on a GPU of those


@pytest.mark.parametrize(("gpu", "kept"), [("9.0", False), ("8.9", True)], ids=["stale-by-target", "servable"])
def test_rebuild_of_an_ahead_of_time_engine(svc: EngineService, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch,
                                            gpu: str, kept: bool) -> None:  # type: ignore[no-untyped-def]
    """Rebuild keeps an ahead-of-time engine's backend; one stale here because of its targets is rebuilt for this
    GPU (the same targets again would make the same, still stale, engine)."""
    from sdtrt.backends.base import BuildResult
    from sdtrt.engine_types import BackendInfo
    from sdtrt.pipeline.checkpoint import file_sha256
    from sdtrt.storage.key import EngineKey
    from sdtrt.storage.registry import Registry

    ckpt = tiny_checkpoint("sd1", 1)
    sha = file_sha256(ckpt)
    key = EngineKey(family="sd1", arch_hash="ab" * 8, io={"contract": "ldm-unet", "in_channels": 4,
                    "context_dim": 32, "y_dim": None}, profiles=("1x64x64x75",), backend="tensorrt-rtx",
                    backend_version="1.7.1", device="ahead-of-time", compute_capability=None, refit_mode="none",
                    weights="embedded", export={"dtype": "float16"}, checkpoint_sha256=sha, targets=("sm86", "sm89"))

    def produce(tmp: Path) -> BuildResult:
        (tmp / "unet.plan").write_bytes(b"plan")
        return BuildResult(files=["unet.plan"], weights="embedded", refit_mode="none")

    m = Registry(svc.registry().root).build(key, {"name": ckpt.name, "sha256": sha}, produce)
    monkeypatch.setattr(svc.probe, "info", lambda name: BackendInfo("tensorrt-rtx", "1.7.1", "GPU", gpu))
    asked: dict[str, Any] = {}
    monkeypatch.setattr(svc.builds, "submit", lambda checkpoint, profiles, backend, dtype, replaces=None,
                        controlnet=False, targets=None, convention=None: asked.update(
                            backend=backend, targets=targets, replaces=replaces, convention=convention))
    svc.builds.rebuild(m.id)
    assert asked == {"backend": "tensorrt-rtx", "targets": ("sm86", "sm89") if kept else (), "replaces": m.id,
                     "convention": "a1111"}  # a rebuild keeps the engine's convention


def test_instance_forward_override_gets_the_pytorch_unet_on_the_device(host: DictHost, svc: EngineService) -> None:
    """ControlNet replaces forward on the UNet instance and then runs the torch blocks itself."""
    assert host.unet is not None
    server = svc.make_server(option(svc, "sd1-s0"))
    svc.activate(server, "x")
    moved: list[str] = []
    host.device = lambda: torch.device("meta")  # type: ignore[method-assign]  # a device the UNet is not on
    host.unet.to = lambda d: moved.append(str(d)) or host.unet  # type: ignore[method-assign, assignment]
    p = object()
    svc.begin(p)
    svc.before_sampling()
    assert moved == []  # no override: the PyTorch UNet stays offloaded
    host.unet.forward = lambda *a, **k: None  # type: ignore[method-assign]
    svc.before_sampling()
    assert moved == ["meta"] and "ControlNet" in host.told[-1][1]
    svc.end(p)
    assert moved[-1] == "cpu"  # offloaded again after the generation


def test_fallback_reasons_are_bounded() -> None:
    from sdtrt.serving.counters import MAX_REASONS, Counters

    c = Counters()
    for i in range(MAX_REASONS + 10):
        c.fallback(f"size {i}")
    snap = c.snapshot()
    assert snap["fallback_calls"] == MAX_REASONS + 10 and len(snap["fallback_reasons"]) == MAX_REASONS + 1
    assert snap["fallback_reasons"]["other reasons"] == 10


# ---- networks (LoRA) ----------------------------------------------------------------------------------------
def test_networks_are_refitted_once_per_set_and_a_failure_runs_the_generation_on_pytorch(
        host: DictHost, svc: EngineService) -> None:
    server = svc.make_server(option(svc, "sd1-s0"))
    svc.activate(server, "x")
    assert host.unet is not None
    name = next(n for n, _ in host.unet.named_parameters() if n.endswith("attn2.to_v.weight"))
    new = host.unet.state_dict()[name] * 1.5
    host.net_key, host.net_weights = ("styleA", 0.8), lambda base: {name: new}
    p = object()
    svc.begin(p)
    svc.apply_networks()
    x, t, c = inputs(2, 8, 8, 77, context_dim(host))
    with torch.no_grad():
        original = host.unet.state_dict()[name].clone()
        host.unet.state_dict()[name].copy_(new)
        want = host.unet(x, t, c)
        host.unet.state_dict()[name].copy_(original)
    torch.testing.assert_close(server(x, t, c), want, rtol=1e-4, atol=1e-4)
    assert svc.counters.snapshot()["last_refit"]["weights"] == 1
    refits = svc.counters.snapshot()["refits"]
    svc.apply_networks()  # same set again (e.g. the hires pass): nothing to do
    assert svc.counters.snapshot()["refits"] == refits
    svc.end(p)

    def broken(base: Any) -> Any:
        raise ValueError("lora_up has 7 rows, the layer 320")

    host.net_key, host.net_weights = ("broken", 1.0), broken
    p2 = object()
    svc.begin(p2)
    svc.apply_networks()
    assert torch.equal(server(x, t, c), host.unet(x, t, c))  # this generation: PyTorch
    assert "could not be put into the engine" in host.told[-1][1] and "7 rows" in host.told[-1][1]
    svc.end(p2)
    host.net_key, host.net_weights = (), lambda base: {}
    svc.begin(object())
    svc.apply_networks()
    torch.testing.assert_close(server(x, t, c), host.unet(x, t, c), rtol=1e-4, atol=1e-4)  # next one: engine again
