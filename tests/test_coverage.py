"""POST /sdtrt/v1/coverage in a fake A1111 v1.10.1: for every state the status line shows, the prediction made
before a generation equals what that generation then did (engine calls and PyTorch calls from the counters, and
/status's last_generation). Plus the one-click path: the suggested build, built through the API, serves the
generation it was suggested for."""

from __future__ import annotations

from typing import Any

import pytest

import sdtrt.webui.service as service_module
from fakehost import FakeHost
from sdtrt.profiles import Profile, Shape
from sdtrt.serving.passes import CallShape, CfgOptions, GenerationSpec, HiresSpec, cfg_calls, hires_size, plan_passes
from test_webui_a1111 import boot as boot  # noqa: PLC0414 (the `boot` fixture, used by name)

pytest.importorskip("fastapi")

STEPS = 3
LONG = " ".join(f"w{i}" for i in range(80))  # 2 chunks
LONGER = " ".join(f"w{i}" for i in range(160))  # 3 chunks: beyond the shared engines' 2


def body(**kw: Any) -> dict[str, Any]:
    out = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": STEPS, "width": 64, "height": 64,
           "seed": 1234, "sampler_name": "Euler"}
    out.update(kw)
    return out


def ask(host: FakeHost, b: dict[str, Any], kind: str = "txt2img") -> dict[str, Any]:
    r = host.client().post(f"/sdtrt/v1/coverage?kind={kind}", json=b)
    assert r.status_code == 200, r.text
    return r.json()


def run(host: FakeHost, b: dict[str, Any], kind: str = "txt2img") -> dict[str, Any]:
    """Generate through the API path; what the generation did, from /status."""
    r = host.client().post(f"/sdapi/v1/{kind}", json=b)
    assert r.status_code == 200, r.text
    last = host.client().get("/sdtrt/v1/status").json()["last_generation"]
    assert last is not None
    return last


def predict_and_run(host: FakeHost, b: dict[str, Any], kind: str = "txt2img", *, same_words: bool = True
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ask, then generate; the prediction must match the outcome. `same_words`: the predicted reasons are the ones
    serving gave (False where serving knows more than the request says, e.g. a ControlNet unit's type)."""
    answer = ask(host, b, kind)
    outcome = run(host, b, kind)
    calls = [c for p in answer["passes"] for c in p["calls"]]
    # the prediction holds: every call on an engine exactly when predicted, some on PyTorch exactly when predicted
    assert answer["engine"] == (outcome["fallback_calls"] == 0 and outcome["engine_calls"] > 0), (answer, outcome)
    assert any(c["engine_id"] for c in calls) == (outcome["engine_calls"] > 0), (answer, outcome)
    if answer["state"] not in ("off", "no_engine"):  # else no server of ours counts the calls (SD Unet None)
        assert (not answer["engine"]) == (outcome["fallback_calls"] > 0), (answer, outcome)
    assert answer["state"] == ("engine" if answer["engine"] else "partial" if outcome["engine_calls"] else
                               answer["state"] if answer["state"] in ("off", "no_engine") else "pytorch")
    predicted = {c["reason"] for c in calls if c["reason"]}
    if same_words:
        assert predicted >= set(outcome["fallback_reasons"]), (predicted, outcome)  # the same words as serving's
    return answer, outcome


# ---- states ------------------------------------------------------------------------------------------------------
def test_served_generation_names_engine_profile_and_size(boot, tiny_checkpoint, engines) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    answer, outcome = predict_and_run(host, body(width=96, height=64, batch_size=2))
    assert answer["state"] == "engine" and outcome["engine_calls"] == STEPS
    assert answer["message"] == f"TensorRT: {engines[1]['sd1']} profile 1 serves 96x64, batch 2"
    assert answer["build"] is None


def test_img2img_is_predicted_too(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(buf, format="PNG")
    b = body(init_images=[base64.b64encode(buf.getvalue()).decode()], denoising_strength=0.6)
    answer, outcome = predict_and_run(host, b, "img2img")
    assert answer["engine"] and outcome["engine_calls"] > 0


@pytest.mark.parametrize(("hires", "served"), [({"hr_scale": 2.0}, True), ({"hr_scale": 3.0}, False),
                                               ({"hr_resize_x": 128, "hr_resize_y": 96}, True),
                                               ({"hr_resize_x": 200, "hr_resize_y": 0}, False)])
def test_hires_pass_in_and_out_of_the_profile(boot, tiny_checkpoint, hires, served) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    b = body(enable_hr=True, hr_second_pass_steps=2, denoising_strength=0.5, hr_upscaler="Latent", **hires)
    answer, outcome = predict_and_run(host, b)
    assert [p["name"] for p in answer["passes"]] == ["first pass", "hires pass"]
    assert answer["passes"][0]["engine"]
    if served:
        assert answer["state"] == "engine" and outcome["fallback_calls"] == 0
        assert "hires pass" in answer["message"]
    else:
        size = f"{answer['passes'][1]['width']}x{answer['passes'][1]['height']}"
        assert answer["state"] == "partial"
        assert answer["message"] == f"TensorRT: the hires pass ({size}) will run on PyTorch — no profile covers it"
        assert any(f"{answer['passes'][1]['height']}x{answer['passes'][1]['width']} px" in r
                   for r in outcome["fallback_reasons"])  # what serving said matches the predicted size
        assert answer["build"] is not None


@pytest.mark.parametrize(("fields", "state"), [
    ({"batch_size": 3}, "pytorch"),  # 6 rows: beyond the profile's 2 images
    ({"prompt": LONGER}, "partial"),  # cond: 3 chunks, beyond the profile's 2; uncond (1 chunk) on the engine
    ({"prompt": LONG}, "engine"),  # 2 chunks for cond, 1 for uncond: two calls of 1 row, both covered
    ({"prompt": LONG, "override_settings": {"pad_cond_uncond": True}}, "engine"),
    ({"prompt": LONG, "override_settings": {"batch_cond_uncond": False}}, "engine"),
])
def test_batch_and_prompt_length(boot, tiny_checkpoint, fields, state) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    answer, _ = predict_and_run(host, body(**fields))
    assert answer["state"] == state, answer
    if state != "engine":
        assert answer["message"].startswith("TensorRT: the first pass (64x64) will run on PyTorch — no profile")


@pytest.mark.parametrize(("override", "message"), [
    ({"sdtrt_enabled": False}, "TensorRT off"),
    ({"sd_unet": "None"}, "TensorRT off (SD Unet is None: the UNet runs on PyTorch)"),
])
def test_switched_off(boot, tiny_checkpoint, override, message) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    answer, outcome = predict_and_run(host, body(override_settings=override))
    assert answer["state"] == "off" and answer["message"] == message and outcome["engine_calls"] == 0


def test_tiling_is_predicted_on_pytorch(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    answer, outcome = predict_and_run(host, body(tiling=True))
    assert answer["state"] == "pytorch" and "tiling" in answer["message"] and outcome["engine_calls"] == 0
    assert answer["build"] is None  # no engine would fix it


def test_sdxl_refiner_passes_each_on_their_engine(boot, tiny_checkpoint, engines) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sdxl-base"), tiny_checkpoint("sdxl-refiner"),
                config={"sd_model_checkpoint": "sdxl-base-s0.safetensors"})
    answer, outcome = predict_and_run(host, body(steps=4, refiner_checkpoint="sdxl-refiner-s0",
                                                 refiner_switch_at=0.5))
    assert [p["name"] for p in answer["passes"]] == ["first pass", "first pass (refiner)"]
    assert [p["engine_id"] for p in answer["passes"]] == [engines[1]["sdxl-base"], engines[1]["sdxl-refiner"]]
    assert answer["engine"] and outcome["engine_calls"] == 4
    # no switch point given: A1111 switches before the first call, so the whole pass is the refiner's
    answer, outcome = predict_and_run(host, body(steps=4, refiner_checkpoint="sdxl-refiner-s0"))
    assert [(p["name"], p["engine_id"]) for p in answer["passes"]] == [("first pass (refiner)",
                                                                         engines[1]["sdxl-refiner"])]


def test_hires_on_another_checkpoint_of_the_architecture(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """The hires checkpoint is not loaded when asked: its architecture comes from its file's header."""
    host = boot(tiny_checkpoint("sd1", 0), tiny_checkpoint("sd1", 1), config={"sd_model_checkpoint": "sd1-s0.safetensors"})
    b = body(enable_hr=True, hr_scale=2.0, hr_second_pass_steps=2, denoising_strength=0.5, hr_upscaler="Latent",
             hr_checkpoint_name="sd1-s1")
    answer, _ = predict_and_run(host, b)
    assert answer["passes"][1]["checkpoint"].startswith("sd1-s1") and answer["engine"]


def test_no_engine_then_the_suggested_build_serves_it(boot, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), config={"sdtrt_cache_dir": str(tmp_path / "empty-cache")})
    b = body(width=96, height=80, enable_hr=True, hr_scale=1.6, hr_second_pass_steps=2, denoising_strength=0.5,
             hr_upscaler="Latent")
    answer, outcome = predict_and_run(host, b)
    assert answer["state"] == "no_engine" and answer["message"].startswith("TensorRT: no engine for this checkpoint")
    suggestion = answer["build"]
    assert suggestion["checkpoint"].startswith("sd1-s0") and suggestion["controlnet"] is False
    profile = Profile.parse(suggestion["profiles"][0])
    assert profile.covers(Shape(1, 80, 96, 75)) and profile.covers(Shape(1, 128, 152, 75))
    client = host.client()
    r = client.post("/sdtrt/v1/engines", json={**suggestion, "backend": "onnxruntime"})
    assert r.status_code == 202, r.text
    service_module.service().jobs.wait(r.json()["job_id"], timeout=600)
    job = client.get(f"/sdtrt/v1/jobs/{r.json()['job_id']}").json()
    assert job["state"] == "done", job
    answer, outcome = predict_and_run(host, b)
    assert answer["state"] == "engine" and outcome["fallback_calls"] == 0
    assert answer["passes"][0]["engine_id"] == job["engine_id"]


def test_enabled_switch_applies_to_the_next_generation(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    client = host.client()
    assert client.post("/sdtrt/v1/enabled", json={"enabled": True}).json() == {"enabled": True}  # already on: fine
    assert client.post("/sdtrt/v1/enabled", json={"enabled": False}).json() == {"enabled": False}
    answer, outcome = predict_and_run(host, body())
    assert answer["state"] == "off" and outcome["engine_calls"] == 0
    assert client.post("/sdtrt/v1/enabled", json={"enabled": True}).json() == {"enabled": True}
    answer, outcome = predict_and_run(host, body())
    assert answer["state"] == "engine" and outcome["fallback_calls"] == 0
    assert client.post("/sdtrt/v1/enabled", json={"enabled": "maybe"}).status_code == 422


def test_fallback_policy_error_is_predicted_as_a_failure(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    b = body(width=256, override_settings={"sdtrt_fallback": "error"})
    answer = ask(host, b)
    assert answer["state"] == "fails" and "the generation will fail" in answer["message"]
    r = host.client().post("/sdapi/v1/txt2img", json=b)
    assert r.status_code >= 400 and "no engine profile covers" in r.text


def test_override_naming_no_checkpoint_is_dropped_as_a1111_drops_it(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    answer, outcome = predict_and_run(host, body(override_settings={"sd_model_checkpoint": "no-such-model"}))
    assert answer["engine"] and outcome["fallback_calls"] == 0


def test_a_prediction_leaves_the_counters_alone(boot, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sdtrt.backends.base import BuildOptions
    from sdtrt.pipeline.build import build_engine

    cache = tmp_path / "fixed"
    build_engine(tiny_checkpoint("sd1", 0), [Profile.parse("1x64x64x75")], cache, backend="onnxruntime",
                 options=BuildOptions(refit=False, strip_weights=False))
    host = boot(tiny_checkpoint("sd1", 0), tiny_checkpoint("sd1", 1),
                config={"sd_model_checkpoint": "sd1-s0.safetensors", "sdtrt_cache_dir": str(cache)})
    before = host.client().get("/sdtrt/v1/status").json()["counters"]
    answer = ask(host, body(override_settings={"sd_model_checkpoint": "sd1-s1"}))
    assert "cannot take the loaded checkpoint's weights" in answer["message"]  # an unusable server, predicted
    assert host.client().get("/sdtrt/v1/status").json()["counters"] == before


def test_bad_bodies_get_clear_errors(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    client = host.client()
    r = client.post("/sdtrt/v1/coverage", json=body(width="wide"))
    assert r.status_code == 400 and "width must be a number" in r.json()["detail"]
    r = client.post("/sdtrt/v1/coverage?kind=extras", json=body())
    assert r.status_code == 400 and "kind must be one of txt2img, img2img" in r.json()["detail"]
    r = client.post("/sdtrt/v1/coverage", json=body(hr_checkpoint_name="nope", enable_hr=True))
    assert r.status_code == 400 and "hr_checkpoint_name: unknown checkpoint 'nope'" in r.json()["detail"]
    r = client.post("/sdtrt/v1/coverage?knd=img2img", json=body())
    assert r.status_code == 400 and "unknown query parameter 'knd'" in r.json()["detail"]


def test_coverage_is_read_only_where_the_webui_is_exposed(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sdtrt.webui.api import mount

    app = FastAPI()
    mount(app, service_module.service(), exposed=True)
    client = TestClient(app, raise_server_exceptions=False)
    assert client.post("/sdtrt/v1/coverage", json=body()).status_code == 200  # a question: allowed
    assert client.post("/sdtrt/v1/enabled", json={"enabled": False}).status_code == 403  # a change: not
    assert host.opts.sdtrt_enabled is True


# ---- the pure rules, against A1111's own numbers -----------------------------------------------------------------
def test_cfg_calls_follow_a1111s_batching() -> None:
    assert cfg_calls(2, 64, 64, 1, 1) == (CallShape(4, 64, 64, 1),)
    assert cfg_calls(2, 64, 64, 2, 1) == (CallShape(2, 64, 64, 2), CallShape(2, 64, 64, 1))
    assert cfg_calls(2, 64, 64, 2, 1, CfgOptions(pad_cond_uncond=True)) == (CallShape(4, 64, 64, 2),)
    assert cfg_calls(2, 64, 64, 1, 3, CfgOptions(pad_cond_uncond_v0=True)) == (CallShape(4, 64, 64, 1),)
    assert cfg_calls(2, 64, 64, 1, 1, CfgOptions(batch_cond_uncond=False)) == (CallShape(2, 64, 64, 1),)
    assert cfg_calls(1, 64, 64, 1, 1, CfgOptions(may_skip_uncond=True)) == (CallShape(2, 64, 64, 1),
                                                                            CallShape(1, 64, 64, 1))
    assert cfg_calls(1, 64, 64, 1, 1, conds_per_image=3) == (CallShape(4, 64, 64, 1),)
    # a skipped uncond with cond and uncond of different lengths: one call of the cond rows alone
    assert cfg_calls(1, 64, 64, 2, 1, CfgOptions(may_skip_uncond=True), conds_per_image=3) == (
        CallShape(2, 64, 64, 2), CallShape(1, 64, 64, 2), CallShape(1, 64, 64, 1), CallShape(3, 64, 64, 2))


def test_hires_size_follows_a1111() -> None:
    assert hires_size(512, 768, 2.0, 0, 0) == (1024, 1536)
    assert hires_size(512, 768, 1.0, 1024, 0) == (1024, 1536)
    assert hires_size(512, 768, 1.0, 0, 1024) == (680, 1024)
    assert hires_size(512, 768, 1.0, 1024, 1024) == (1024, 1024)  # upscaled to 1024x1536, cropped to 1024
    assert hires_size(64, 64, 1.5, 0, 0) == (96, 96)
    assert hires_size(519, 512, 2.0, 0, 0) == (1032, 1024)  # from the size as given, not rounded first


def test_refiner_pass_option_decides_which_pass_switches() -> None:
    gen = GenerationSpec(512, 512, 1, 1, 1, hires=HiresSpec(1024, 1024, 1, 1), refiner="R", refiner_switch_at=0.8)
    names = [p.name for p in plan_passes(gen)]
    assert names == ["first pass", "hires pass", "hires pass (refiner)"]
    both = GenerationSpec(**{**gen.__dict__, "refiner_pass": "both passes"})
    assert [p.name for p in plan_passes(both)] == ["first pass", "first pass (refiner)", "hires pass",
                                                   "hires pass (refiner)"]
    at_zero = GenerationSpec(512, 512, 1, 1, 1, refiner="R", refiner_switch_at=0.0)
    assert [(p.name, p.checkpoint) for p in plan_passes(at_zero)] == [("first pass (refiner)", "R")]
    unset = GenerationSpec(512, 512, 1, 1, 1, refiner="R", refiner_switch_at=None)
    assert [p.name for p in plan_passes(unset)] == ["first pass (refiner)"]
    # img2img at denoising 0.4 starts at 0.6 of the schedule: a switch at 0.5 is already past
    late = GenerationSpec(512, 512, 1, 1, 1, refiner="R", refiner_switch_at=0.5, first_start=0.6)
    assert [p.name for p in plan_passes(late)] == ["first pass (refiner)"]
    early = GenerationSpec(512, 512, 1, 1, 1, refiner="R", refiner_switch_at=0.8, first_start=0.6)
    assert [p.name for p in plan_passes(early)] == ["first pass", "first pass (refiner)"]


def test_fixed_weight_engine_with_a_lora_or_another_checkpoint(boot, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An engine built without refit serves its own checkpoint only, and no LoRA: predicted as serving finds it."""
    from sdtrt.backends.base import BuildOptions
    from sdtrt.pipeline.build import build_engine
    from test_webui_lora import add_lora

    cache = tmp_path / "fixed"
    built = build_engine(tiny_checkpoint("sd1", 0), [Profile.parse("1x64x64x75:1x64x64x75:2x128x128x150")], cache,
                         backend="onnxruntime", options=BuildOptions(refit=False, strip_weights=False)).manifest
    host = boot(tiny_checkpoint("sd1", 0), tiny_checkpoint("sd1", 1),
                config={"sd_model_checkpoint": "sd1-s0.safetensors", "sdtrt_cache_dir": str(cache)})
    answer, _ = predict_and_run(host, body())
    assert answer["state"] == "engine" and answer["passes"][0]["engine_id"] == built.id
    add_lora(host, "net", tiny_checkpoint("sd1", 0), "lora", seed=3)
    answer, outcome = predict_and_run(host, body(prompt="a photo of a cat <lora:net:0.8>"))
    assert answer["state"] == "pytorch" and f"engine {built.id} cannot take LoRA weights" in answer["message"]
    assert answer["build"] is None and outcome["engine_calls"] == 0
    answer, outcome = predict_and_run(host, body(override_settings={"sd_model_checkpoint": "sd1-s1"}))
    assert answer["state"] == "pytorch" and "cannot take the loaded checkpoint's weights" in answer["message"]
    # the next generation on its own checkpoint is on the engine again, as predicted
    answer, outcome = predict_and_run(host, body())
    assert answer["state"] == "engine" and outcome["fallback_calls"] == 0
