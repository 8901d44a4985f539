"""SDXL base and SDXL refiner served by engines in the real A1111 1.10.1 (API only, CPU, ONNX Runtime backend).

The models (tiny_webui_model.py, "sdxl-base" and "sdxl-refiner") are what A1111 loads for SDXL: an sgm
DiffusionEngine from a yaml laid out as generative-models' sd_xl_base.yaml / sd_xl_refiner.yaml, with the text
encoders at their real architectures (CLIP ViT-L/14 and OpenCLIP ViT-bigG-14 for the base, ViT-bigG-14 for the
refiner; random weights, built without any download), a tiny UNet with SDXL's block layout (context 2048 and `y`
2816 for the base, 1280 and 2560 for the refiner) and a tiny VAE. Each file is ~1.5 GB (the bigG text tower in
float16); A1111 loads one in ~12 s on 2 cores.

One server serves the module, started on the base. Engines are built over POST /sdtrt/v1/engines from the files, as
a user would; the refiner's only after the first base+refiner generation, so that generation shows how many calls
the base pass makes on its engine (the refiner pass, with no engine of its own, runs on plain PyTorch and is not
counted), and the next one, with both engines, that every call of both passes runs on an engine. Live previews are
off (DEFAULT_CONFIG): for SDXL A1111 would download vaeapprox-sdxl.pt for them at the first generation.

Every image is compared with SD Unet "None" (PyTorch) for the same request, with test_real_webui_sdtrt's tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .a1111_host import A1111Install, WebUIHost, decode_image, png_pixels, write_tiny_model
from .test_real_webui_sdtrt import MAX_8BIT_DIFF, MAX_DIFFERING_FRACTION, compare, counters, sdtrt_config, wait_job

pytestmark = pytest.mark.integration

BASE, REFINER = "tiny-sdxl-base", "tiny-sdxl-refiner"
#: 64 to 128 px, one image (two UNet rows with CFG): the sizes below, and nothing larger.
PROFILE = "1x64x64x75:1x64x64x75:1x128x128x75"
STEPS = 4
REFINER_STEPS = 6
REFINER_SWITCH_AT = 0.5
PROMPT = "a photo of a cat"
SEED = 4321


def request_with_counters(host: WebUIHost, route: str, payload: dict[str, Any],
                          sd_unet: str) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    """(response, pixels of the first image, counter deltas) of one POST /sdapi/v1/<route> (txt2img or img2img)
    with `sd_unet` set for this request only."""
    body = {"cfg_scale": 7, "batch_size": 1, "n_iter": 1, "sampler_name": "Euler", "seed": SEED, **payload}
    body["override_settings"] = {"sd_unet": sd_unet, **payload.get("override_settings", {})}
    before = counters(host)
    t0 = time.monotonic()
    out: dict[str, Any] = host.post(f"/sdapi/v1/{route}", body)
    elapsed = time.monotonic() - t0
    after = counters(host)
    delta: dict[str, Any] = {k: after[k] - before[k] for k in ("engine_calls", "fallback_calls", "refits")}
    delta["fallback_reasons"] = {r: n - before["fallback_reasons"].get(r, 0)
                                 for r, n in after["fallback_reasons"].items()
                                 if n != before["fallback_reasons"].get(r, 0)}
    delta["seconds"] = round(elapsed, 2)
    width, height, _, pixels = png_pixels(decode_image(out["images"][0]))
    assert (width, height) == (body["width"], body["height"]), (width, height)
    return out, pixels, delta


def build_engine(host: WebUIHost, checkpoint: str, profile: str = PROFILE) -> dict[str, Any]:
    """Build an onnxruntime engine for `checkpoint` (a stem A1111 lists) over the REST API; its /engines row."""
    t0 = time.monotonic()
    status, answer = host.request("POST", "/sdtrt/v1/engines",
                                  {"checkpoint": checkpoint, "profiles": [profile], "backend": "onnxruntime"})
    assert status == 202, answer
    job = wait_job(host, answer["job_id"])
    assert job["state"] == "done" and job["engine_id"], job
    (row,) = [r for r in host.get("/sdtrt/v1/engines")["engines"] if r["id"] == job["engine_id"]]
    assert row["ok"] is True and row["reason"] is None, row
    print(f"engine {row['id']} ({row['family']}) for {checkpoint} built in {time.monotonic() - t0:.1f}s")
    return dict(row)


def assert_same_image(reference: bytes, pixels: bytes, what: str) -> None:
    worst, frac = compare(reference, pixels)
    print(f"{what}: engine vs PyTorch max 8-bit diff {worst}, differing values {frac:.5%}")
    assert worst <= MAX_8BIT_DIFF and frac <= MAX_DIFFERING_FRACTION, (what, worst, frac)


@pytest.fixture(scope="module")
def sdxl_models(a1111_install: A1111Install, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both SDXL models, in one folder (A1111's --ckpt-dir: the refiner must be listed to be found)."""
    folder = tmp_path_factory.mktemp("a1111-models-sdxl")
    t0 = time.monotonic()
    models = {stem: write_tiny_model(a1111_install, folder, stem=stem, unet=layout)
              for stem, layout in ((BASE, "sdxl-base"), (REFINER, "sdxl-refiner"))}
    print(f"SDXL base and refiner written in {time.monotonic() - t0:.1f}s")
    return models


@pytest.fixture(scope="module")
def host(sdxl_models: dict[str, Path], webui_factory: Callable[..., WebUIHost],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebUIHost]:
    h = webui_factory(checkpoint=sdxl_models[BASE], config=sdtrt_config(tmp_path_factory.mktemp("sdtrt-cache-sdxl")))
    titles = [m["title"] for m in h.get("/sdapi/v1/sd-models")]
    assert any(t.startswith(REFINER) for t in titles), titles
    yield h
    h.stop()


@pytest.fixture(scope="module")
def base_engine(host: WebUIHost) -> str:
    row = build_engine(host, BASE)
    assert row["family"] == "sdxl-base" and row["checkpoint"] == f"{BASE}.safetensors", row
    return str(row["id"])


def txt2img(width: int = 64, height: int = 64, steps: int = STEPS, **extra: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "negative_prompt": "blurry", "width": width, "height": height, "steps": steps,
            **extra}


# ---- tests, in order ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width,height", [(64, 64), (80, 72)], ids=["64x64", "80x72"])
def test_sdxl_base_runs_every_step_on_its_engine_and_matches_pytorch(host: WebUIHost, base_engine: str,
                                                                     width: int, height: int) -> None:
    """80x72 px: latents of 10x9, which SDXL's UNet halves to 5x5 and 3x3, so its skip connections only fit
    through A1111's resizing `cat` (sizes in steps of 8); the engine must do the same."""
    payload = txt2img(width, height)
    _, reference, ref_delta = request_with_counters(host, "txt2img", payload, "None")
    assert ref_delta["engine_calls"] == 0 and ref_delta["fallback_calls"] == 0, ref_delta
    assert len(set(reference)) > 8, "constant image"
    out, pixels, delta = request_with_counters(host, "txt2img", payload, "Automatic")
    print(f"SDXL base {width}x{height}: {delta} (PyTorch {ref_delta['seconds']}s)")
    assert delta["engine_calls"] == STEPS, delta  # cond and uncond batched: one call per step
    assert delta["fallback_calls"] == 0 and delta["fallback_reasons"] == {}, delta
    status = host.get("/sdtrt/v1/status")
    assert status["active"]["engines"] == [base_engine], status["active"]
    assert status["active"]["label"] == f"[TRT] {BASE}", status["active"]
    assert status["counters"]["last_error"] is None, status["counters"]
    assert_same_image(reference, pixels, f"SDXL base {width}x{height}")
    assert "some UNet calls ran on PyTorch" not in out["info"]


def test_sdxl_base_plus_refiner_runs_each_pass_on_its_own_engine(host: WebUIHost, base_engine: str) -> None:
    payload = txt2img(steps=REFINER_STEPS, refiner_checkpoint=REFINER, refiner_switch_at=REFINER_SWITCH_AT)
    ref_out, reference, ref_delta = request_with_counters(host, "txt2img", payload, "None")
    assert ref_delta["engine_calls"] == 0 and ref_delta["fallback_calls"] == 0, ref_delta
    assert f"Refiner: {REFINER}" in ref_out["info"], ref_out["info"][:1000]  # the refiner really took over
    _, base_only, _ = request_with_counters(host, "txt2img", txt2img(steps=REFINER_STEPS), "None")
    # The refiner's steps visibly change the image (measured: max 15/255, a third of the values by more than the
    # tolerance), so a refiner pass run on the base's engine, or skipped, could not pass as the reference.
    effect, _ = compare(base_only, reference)
    beyond = sum(abs(a - b) > MAX_8BIT_DIFF for a, b in zip(base_only, reference)) / len(reference)
    print(f"refiner effect: max 8-bit diff {effect}, values beyond the tolerance {beyond:.3%}")
    assert effect > 2 * MAX_8BIT_DIFF and beyond > 10 * MAX_DIFFERING_FRACTION, (effect, beyond)

    # Only the base has an engine: the base pass runs on it, the refiner pass on plain PyTorch (no engine for the
    # refiner, so "Automatic" picks none for it and nothing is counted).
    _, pixels, delta = request_with_counters(host, "txt2img", payload, "Automatic")
    base_calls = delta["engine_calls"]
    print(f"base + refiner, base engine only: {delta} (PyTorch {ref_delta['seconds']}s)")
    assert 0 < base_calls < REFINER_STEPS, delta
    assert delta["fallback_calls"] == 0, delta
    assert_same_image(reference, pixels, "SDXL base (engine) + refiner (PyTorch)")

    # With the refiner's engine too, the refiner pass (its remaining calls) runs on that one: every call of the
    # generation is on an engine, and the refiner's engine is the one active at its end.
    refiner = build_engine(host, REFINER)
    assert refiner["family"] == "sdxl-refiner" and refiner["checkpoint"] == f"{REFINER}.safetensors", refiner
    prediction = host.post("/sdtrt/v1/coverage", payload)
    print(f"coverage: {prediction['state']}: {[(p['name'], p['engine_id'], p['kind']) for p in prediction['passes']]}")
    assert prediction["engine"] is True, prediction
    assert [p["engine_id"] for p in prediction["passes"]] == [base_engine, refiner["id"]], prediction["passes"]

    out, pixels, delta = request_with_counters(host, "txt2img", payload, "Automatic")
    print(f"base + refiner, both engines: {delta}")
    assert delta["engine_calls"] == REFINER_STEPS, delta  # base_calls on the base's, the rest on the refiner's
    assert delta["fallback_calls"] == 0 and delta["fallback_reasons"] == {}, delta
    status = host.get("/sdtrt/v1/status")
    assert status["active"]["engines"] == [refiner["id"]], status["active"]
    assert status["counters"]["last_error"] is None, status["counters"]
    assert_same_image(reference, pixels, "SDXL base + refiner, both on engines")
    assert "some UNet calls ran on PyTorch" not in out["info"]

    # The next plain base generation is back on the base's engine (A1111 reloads the base for it).
    _, pixels, delta = request_with_counters(host, "txt2img", txt2img(steps=REFINER_STEPS), "Automatic")
    assert delta["engine_calls"] == REFINER_STEPS and delta["fallback_calls"] == 0, delta
    assert host.get("/sdtrt/v1/status")["active"]["engines"] == [base_engine]
    assert_same_image(base_only, pixels, "SDXL base after a refiner generation")
    assert host.extension_errors() == [], host.log_tail(150)
