"""sd-webui-trt inside the real A1111 WebUI (API only, CPU, ONNX Runtime backend): build an engine over the REST API,
generate with and without it, per-request toggles, the PyTorch fallback of a hires pass outside the profile, and
--api-auth on the /sdtrt/v1 routes.

One server serves the whole module (tests run in file order and build on each other's state: the engine built
first is used by the later ones); the --api-auth test starts its own.

Image tolerance. Both paths run in float32 on the CPU: the engine is the same graph exported to ONNX and run by
ONNX Runtime, whose kernels (convolution, matmul, softmax, group norm) sum in a different order than torch's, so the
UNet outputs differ by float32 rounding (relative ~1e-6). Four Euler steps carry that into the latent at about the
same size; the VAE decode then maps to [0, 1] and A1111 rounds `255 * x` to 8 bits. A difference of ~1e-5 moves a
value across a rounding boundary only when it lies within ~1e-5 * 255 of one, so a few channel values differ, by
exactly 1. Measured here: max 1, one channel value in 12288. The test allows max 2 and at most 1% of the values
differing: a wrong engine (other weights, a missed refit, a wrong timestep or context) changes nearly every value by
far more, while a bad rounding case or a different ORT kernel choice stays well inside.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .a1111_host import DEFAULT_CONFIG, WebUIHost, decode_image, png_pixels

pytestmark = pytest.mark.integration

PROFILE = "1x64x64x75:1x64x64x75:2x128x128x150"
STEPS = 4
PROMPT = "a photo of a cat"
SEED = 1234
#: Build, generation and job-poll limits: generous, for slow CI machines (the build takes ~10 s on 2 cores).
BUILD_TIMEOUT = 900.0
MAX_8BIT_DIFF = 2
MAX_DIFFERING_FRACTION = 0.01
FALLBACK_TEXT = "some UNet calls ran on PyTorch"


def sdtrt_config(cache_dir: Path) -> dict[str, Any]:
    """Every setting the tests override per request is in config.json, so A1111 restores it after the request."""
    return {**DEFAULT_CONFIG, "sd_unet": "Automatic", "sdtrt_enabled": True, "sdtrt_fallback": "pytorch",
            "sdtrt_backend": "auto", "sdtrt_cache_dir": str(cache_dir)}


@pytest.fixture(scope="module")
def host(webui_factory: Callable[..., WebUIHost], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebUIHost]:
    h = webui_factory(config=sdtrt_config(tmp_path_factory.mktemp("sdtrt-cache")))
    yield h
    h.stop()


@pytest.fixture(scope="module")
def engine_id(host: WebUIHost) -> str:
    """Build the engine over POST /sdtrt/v1/engines and follow the job to done."""
    status, answer = host.request("POST", "/sdtrt/v1/engines", {
        "checkpoint": host.checkpoint.stem,  # type: ignore[union-attr]
        "profiles": [PROFILE], "backend": "onnxruntime"})
    assert status == 202, answer
    job = wait_job(host, answer["job_id"])
    assert job["state"] == "done", job
    assert job["progress"] == 1.0 and job["engine_id"], job
    print(f"engine {job['engine_id']} built in {job['finished'] - job['started']:.1f}s")
    return str(job["engine_id"])


def wait_job(host: WebUIHost, job_id: str, timeout: float = BUILD_TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        job: dict[str, Any] = host.get(f"/sdtrt/v1/jobs/{job_id}", timeout=60)
        assert job["state"] in ("queued", "running", "done", "failed", "cancelled"), job
        assert 0.0 <= job["progress"] <= 1.0
        seen.append(job["progress"])
        if job["state"] not in ("queued", "running"):
            assert seen == sorted(seen), f"progress went backwards: {seen}"
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"build job {job_id} still {job['state']} after {timeout:.0f}s: {job}")
        time.sleep(0.5)


def counters(host: WebUIHost) -> dict[str, Any]:
    out: dict[str, Any] = host.get("/sdtrt/v1/status", timeout=60)["counters"]
    return out


def generate(host: WebUIHost, sd_unet: str, **kw: Any) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    """(response, pixels, counter deltas) of one 64x64 Euler txt2img with `sd_unet` set for this request only."""
    override = {"sd_unet": sd_unet, **kw.pop("override_settings", {})}
    before = counters(host)
    out = host.txt2img(kw.pop("prompt", PROMPT), steps=STEPS, width=64, height=64, sampler="Euler", seed=SEED,
                       override_settings=override, **kw)
    after = counters(host)
    delta = {k: after[k] - before[k] for k in ("engine_calls", "fallback_calls", "refits")}
    delta["fallback_reasons"] = {r: n - before["fallback_reasons"].get(r, 0)
                                 for r, n in after["fallback_reasons"].items()
                                 if n != before["fallback_reasons"].get(r, 0)}
    return out, png_pixels(decode_image(out["images"][0]))[3], delta


def compare(a: bytes, b: bytes) -> tuple[int, float]:
    """(max 8-bit difference, fraction of channel values that differ)."""
    assert len(a) == len(b)
    diffs = [abs(x - y) for x, y in zip(a, b)]
    return max(diffs), sum(d > 0 for d in diffs) / len(diffs)


def fallback_notices(out: dict[str, Any]) -> list[str]:
    """The extension's "ran on PyTorch" notices in a txt2img response (its `info` JSON's extra_generation_params)."""
    info = json.loads(out["info"])
    return [str(v) for v in info["extra_generation_params"].values() if FALLBACK_TEXT in str(v)]


@pytest.fixture(scope="module")
def reference(host: WebUIHost) -> bytes:
    """The PyTorch image (SD Unet None)."""
    _, pixels, delta = generate(host, "None")
    assert delta["engine_calls"] == 0 and delta["fallback_calls"] == 0, delta
    assert len(set(pixels)) > 8, "constant image"
    return pixels


# ---- tests, in order ----------------------------------------------------------------------------------------------
def test_build_over_rest_api_lists_an_ok_engine(host: WebUIHost, engine_id: str) -> None:
    rows = host.get("/sdtrt/v1/engines")["engines"]
    (row,) = [r for r in rows if r["id"] == engine_id]
    assert row["ok"] is True and row["reason"] is None, row
    assert row["backend"] == "onnxruntime" and row["family"] == "sd1" and row["profiles"] == [PROFILE]
    assert row["checkpoint"] == host.checkpoint.name  # type: ignore[union-attr]
    assert row["dtype"] == "float32" and row["size_bytes"] > 0
    status = host.get("/sdtrt/v1/status")
    assert status["cache_dir"] == host.config["sdtrt_cache_dir"], status  # the setting, not models/Unet-sdtrt
    assert Path(status["cache_dir"], engine_id, "manifest.json").is_file()
    # a bad request is a JSON 400, an unknown job a 404
    bad, err = host.request("POST", "/sdtrt/v1/engines", {"checkpoint": "no-such-model", "profiles": [PROFILE]})
    assert bad == 400 and err["error"] and "no-such-model" in err["detail"], err
    missing, err = host.request("GET", "/sdtrt/v1/jobs/" + "0123456789abcdef" * 2)
    assert missing == 404, err
    malformed, err = host.request("GET", "/sdtrt/v1/jobs/0123456789abcdef")  # job ids are 32 hex digits
    assert malformed == 400 and err["error"] == "InvalidId", err


def test_automatic_runs_every_step_on_the_engine_and_matches_pytorch(host: WebUIHost, engine_id: str,
                                                                    reference: bytes) -> None:
    t0 = time.monotonic()
    out, pixels, delta = generate(host, "Automatic")
    elapsed = time.monotonic() - t0
    assert delta["engine_calls"] == STEPS, delta  # cond and uncond go batched: one call per step
    assert delta["fallback_calls"] == 0 and delta["fallback_reasons"] == {}, delta
    status = host.get("/sdtrt/v1/status")
    assert status["active"]["label"] == f"[TRT] {host.checkpoint.stem}", status  # type: ignore[union-attr]
    assert status["active"]["engines"] == [engine_id] and status["active"]["unusable"] is None, status
    assert status["counters"]["last_error"] is None, status
    worst, frac = compare(reference, pixels)
    print(f"engine vs PyTorch: max 8-bit diff {worst}, differing values {frac:.5%} ({elapsed:.2f}s)")
    assert worst <= MAX_8BIT_DIFF and frac <= MAX_DIFFERING_FRACTION, (worst, frac)
    assert FALLBACK_TEXT not in out["info"]
    assert host.get("/sdapi/v1/options")["sd_unet"] == "Automatic"


def test_per_request_toggle_works_both_ways_repeatedly(host: WebUIHost, engine_id: str, reference: bytes) -> None:
    engine_image = None
    for sd_unet in ("None", "Automatic", "None", f"[TRT] {host.checkpoint.stem}",  # type: ignore[union-attr]
                    "None", f"[TRT] {engine_id}", "None"):
        _, pixels, delta = generate(host, sd_unet)
        if sd_unet == "None":
            assert delta["engine_calls"] == 0 and delta["fallback_calls"] == 0, (sd_unet, delta)
            assert pixels == reference, "PyTorch image changed after using the engine"
        else:
            assert delta["engine_calls"] == STEPS and delta["fallback_calls"] == 0, (sd_unet, delta)
            engine_image = pixels if engine_image is None else engine_image
            assert pixels == engine_image, f"{sd_unet}: the engine's image is not reproducible"
        assert host.get("/sdapi/v1/options")["sd_unet"] == "Automatic"  # override_settings restored


def test_switched_off_per_request_is_pytorch(host: WebUIHost, engine_id: str, reference: bytes) -> None:
    out, pixels, delta = generate(host, "Automatic", override_settings={"sdtrt_enabled": False})
    assert delta["engine_calls"] == 0, delta
    assert pixels == reference, "sdtrt_enabled=false must give the PyTorch image bit for bit"
    assert FALLBACK_TEXT not in out["info"]  # switched off is not a fallback to tell the user about
    assert host.get("/sdtrt/v1/status")["enabled"] is True  # restored after the request
    _, _, delta = generate(host, "Automatic")  # and on again for the next request
    assert delta["engine_calls"] == STEPS, delta


def test_hires_pass_outside_the_profile_falls_back_and_says_so(host: WebUIHost, engine_id: str) -> None:
    """64 -> 192 px: the second pass is outside the profile (max 128 px) and runs on PyTorch."""
    hr_steps = 2
    out, _, delta = generate(host, "Automatic", enable_hr=True, hr_scale=3, hr_upscaler="Latent",
                                  hr_second_pass_steps=hr_steps, denoising_strength=0.5)
    width, height = png_pixels(decode_image(out["images"][0]))[:2]
    assert (width, height) == (192, 192)
    assert delta["engine_calls"] == STEPS, delta  # the first pass still runs on the engine
    assert 1 <= delta["fallback_calls"] <= hr_steps, delta
    (reason,) = delta["fallback_reasons"]
    assert "192x192 px" in reason and engine_id in reason, reason
    # A1111 keeps p.comments for the UI only: the API response ({images, parameters, info}) has no comments field,
    # so the notice reaches API clients through extra_generation_params (the `info` JSON and the PNG infotext).
    assert set(out) == {"images", "parameters", "info"}
    info = json.loads(out["info"])
    assert "comments" not in info
    notices = [str(v) for v in info["extra_generation_params"].values() if FALLBACK_TEXT in str(v)]
    assert len(notices) == 1 and "192x192 px" in notices[0], info["extra_generation_params"]
    assert info["infotexts"][0].count(FALLBACK_TEXT) == 1, info["infotexts"][0]
    print(f"hires fallback: {delta}; notice: {notices[0]}")
    assert counters(host)["last_error"] is None  # a fallback is not an error


def hires_request(override: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": PROMPT, "steps": STEPS, "width": 64, "height": 64, "sampler_name": "Euler", "seed": SEED,
            "enable_hr": True, "hr_scale": 3, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
            "denoising_strength": 0.5, "override_settings": override}


def test_fallback_policy_error_fails_the_hires_request(host: WebUIHost, engine_id: str) -> None:
    generate(host, "None")  # the engine is activated afresh by the next request, with its settings
    before = counters(host)
    status, answer = host.request("POST", "/sdapi/v1/txt2img",
                                  hires_request({"sd_unet": "Automatic", "sdtrt_fallback": "error"}))
    assert status == 500, answer
    assert answer["error"] == "NoMatchingProfile" and "192x192 px" in answer["errors"], answer
    after = counters(host)
    assert after["fallback_calls"] == before["fallback_calls"]
    assert after["engine_calls"] - before["engine_calls"] == STEPS  # the first pass ran on the engine
    assert host.get("/sdtrt/v1/status")["fallback"] == "pytorch"  # restored after the failed request
    _, _, delta = generate(host, "Automatic")  # the server still serves
    assert delta["engine_calls"] == STEPS, delta


def test_fallback_policy_override_does_not_outlive_its_request(host: WebUIHost, engine_id: str) -> None:
    generate(host, "None")
    status, _ = host.request("POST", "/sdapi/v1/txt2img",
                             hires_request({"sd_unet": "Automatic", "sdtrt_fallback": "error"}))
    assert status == 500  # activated by this request, with its "error" policy
    assert host.get("/sdtrt/v1/status")["fallback"] == "pytorch"  # the setting is restored...
    status, answer = host.request("POST", "/sdapi/v1/txt2img", hires_request({"sd_unet": "Automatic"}))
    assert status == 200, str(answer)[:300]  # ...and the still-active engine falls back again


def test_delete_is_refused_while_active_then_allowed(host: WebUIHost, engine_id: str) -> None:
    generate(host, "Automatic")
    status, answer = host.request("DELETE", f"/sdtrt/v1/engines/{engine_id}")
    assert status == 409 and answer["error"] == "EngineInUse", answer
    generate(host, "None")  # deactivates the engine
    assert host.get("/sdtrt/v1/status")["active"] is None
    status, answer = host.request("DELETE", f"/sdtrt/v1/engines/{engine_id}")
    assert status == 200 and answer == {"deleted": engine_id}, answer
    assert host.get("/sdtrt/v1/engines")["engines"] == []
    # Automatic now finds no engine: plain PyTorch, nothing counted
    _, _, delta = generate(host, "Automatic")
    assert delta["engine_calls"] == 0 and delta["fallback_calls"] == 0, delta
    assert host.extension_errors() == [], host.log_tail(150)


# ---- --api-auth ---------------------------------------------------------------------------------------------------
def test_api_auth_guards_the_sdtrt_routes(webui_factory: Callable[..., WebUIHost],
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    cred = ("u", "p")
    h = webui_factory(config=sdtrt_config(tmp_path_factory.mktemp("sdtrt-cache-auth")),
                      extra_args=["--api-auth", f"{cred[0]}:{cred[1]}"], auth=cred, wait_model=False)
    try:
        # (method, path, body, status with the right credentials)
        routes = [("GET", "/sdtrt/v1/engines", None, 200), ("GET", "/sdtrt/v1/status", None, 200),
                  ("GET", "/sdtrt/v1/jobs", None, 200),
                  ("GET", "/sdtrt/v1/jobs/" + "0123456789abcdef" * 2, None, 404),
                  ("POST", "/sdtrt/v1/engines", {"checkpoint": "no-such-model", "profiles": [PROFILE]}, 400),
                  ("DELETE", "/sdtrt/v1/engines/sd1-onnxruntime-0123456789abcdef", None, 404)]
        for method, path, body, expected in routes:
            for wrong in (None, ("u", "wrong"), ("x", "p")):
                status, answer = h.request(method, path, body, auth=wrong, timeout=60)
                assert status == 401, (method, path, wrong, status, answer)
            status, answer = h.request(method, path, body, auth=cred, timeout=60)
            assert status == expected, (method, path, status, answer)
        assert h.get("/sdtrt/v1/engines") == {"engines": []}
        assert h.request("GET", "/sdapi/v1/sd-models", auth=None)[0] == 401  # A1111's own routes agree
    finally:
        h.stop()
