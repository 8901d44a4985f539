"""The extension inside a fake A1111 v1.10.1 (tests/fake_a1111, harness tests/fakehost.py), driven the way the
WebUI drives it: generations through the txt2img/img2img API path with override_settings, checkpoint switches,
hires fix, the refiner, memory flags, Reload UI, the REST API, and failures injected into builds.

Every case compares final latents with the engine against the same generation with `sd_unet` None (PyTorch).
Tolerance: the onnxruntime engine is fp32 like the PyTorch UNet here and agrees per call to ~1e-6 relative; a
few Euler steps amplify that by at most the step count, so 1e-3 of the latents' magnitude is a wide margin that
still catches any wrong weight, input or shape (those give differences of the latents' own size)."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import sdtrt.backends.ort
import sdtrt.pipeline.export
import sdtrt.webui.api
import sdtrt.webui.service as service_module
from conftest import WEBUI_PROFILE, needs_fp16
from fakehost import FakeHost
from webui_support import close_webuis

pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture
def boot(tmp_path: Path, engines: tuple[Path, dict[str, str]]):  # type: ignore[no-untyped-def]
    hosts: list[FakeHost] = []

    def make(*checkpoints: Path, config: dict[str, Any] | None = None, **kw: Any) -> FakeHost:
        service_module._SERVICE = None  # one service per WebUI process
        cfg = {"sd_unet": "Automatic", "sdtrt_enabled": True, "sdtrt_fallback": "pytorch",
               "sdtrt_cache_dir": str(engines[0]), **(config or {})}
        kw["args"] = ["--no-half", *kw.get("args", [])] if kw.pop("no_half", True) else kw.get("args", [])
        host = FakeHost.boot(tmp_path / f"host{len(hosts)}", list(checkpoints), config=cfg,
                             extensions={"sd-webui-trt": ROOT}, **kw)
        hosts.append(host)
        return host

    yield make
    close_webuis(hosts)


def svc() -> service_module.EngineService:
    return service_module.service()


def counters() -> dict[str, Any]:
    return svc().counters.snapshot()


def gen(host: FakeHost, unet: str = "Automatic", img2img: bool = False, **kw: Any) -> Any:
    kw.setdefault("prompt", "a photo of a cat")
    kw.setdefault("negative_prompt", "blurry")
    kw.setdefault("steps", STEPS)
    kw.setdefault("width", 64)
    kw.setdefault("height", 64)
    kw.setdefault("seed", 1234)
    kw["override_settings"] = {"sd_unet": unet, **kw.get("override_settings", {})}
    return host.img2img(**kw) if img2img else host.txt2img(**kw)


def assert_close(engine: torch.Tensor, reference: torch.Tensor, rel: float = 1e-3) -> None:
    assert engine.shape == reference.shape and engine.dtype == reference.dtype
    scale = reference.abs().max().item()
    assert scale > 0.1
    diff = (engine - reference).abs().max().item()
    assert diff <= rel * scale, f"max |diff| {diff} for latents of magnitude {scale}"


def compare(host: FakeHost, **kw: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(engine result, PyTorch result, counter deltas of the engine run)."""
    reference = gen(host, unet="None", **kw)
    before = counters()
    result = gen(host, **kw)
    after = counters()
    delta = {k: after[k] - before[k] for k in ("engine_calls", "fallback_calls", "refits")}
    assert_close(result.latents, reference.latents)
    return result, reference, delta


def ref(host: FakeHost) -> Any:
    """The loaded PyTorch UNet."""
    return host.sd_model.model.diffusion_model


# ---- item 3: generations ---------------------------------------------------------------------------------
def test_txt2img_runs_every_step_on_the_engine(boot, tiny_checkpoint, engines) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    assert "[TRT] sd1-s0" in [o.label for o in host.sd_unet.unet_options]
    host.clear_trace()
    result, _, delta = compare(host)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0, "refits": 0}
    assert host.sd_unet.current_unet.option.label == "[TRT] sd1-s0"
    assert next(ref(host).parameters()).device.type == "cpu"  # offloaded while the engine serves
    assert "ran on PyTorch" not in (result.comments or "")
    assert svc().status().active.engines == [engines[1]["sd1"]]


def test_img2img_and_batch_size_and_count(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    host = boot(tiny_checkpoint("sd1"))
    img = Image.new("RGB", (64, 64), (200, 30, 90))
    _, _, delta = compare(host, img2img=True, init_images=[img], denoising_strength=0.6)
    assert delta["engine_calls"] > 0 and delta["fallback_calls"] == 0
    result, _, delta = compare(host, batch_size=2, n_iter=2)
    assert result.latents.shape[0] == 4
    assert delta == {"engine_calls": 2 * STEPS, "fallback_calls": 0, "refits": 0}


def test_split_cond_uncond_and_long_prompts(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    long_prompt = " ".join(["word"] * 100)  # 2 chunks, negative 1 chunk: cond and uncond called apart
    _, _, delta = compare(host, prompt=long_prompt)
    assert delta["engine_calls"] == 2 * STEPS and delta["fallback_calls"] == 0
    _, _, delta = compare(host, override_settings={"batch_cond_uncond": False})
    assert delta["engine_calls"] == 2 * STEPS and delta["fallback_calls"] == 0


def test_inpainting_checkpoint(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    host = boot(tiny_checkpoint("sd1-inpaint"))
    img = Image.new("RGB", (64, 64), (10, 200, 90))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    _, _, delta = compare(host, img2img=True, init_images=[img], mask=mask, denoising_strength=0.75, steps=4)
    assert delta["engine_calls"] > 0 and delta["fallback_calls"] == 0
    _, _, delta = compare(host)  # txt2img on an inpainting model (dummy image conditioning)
    assert delta["engine_calls"] == STEPS


@pytest.mark.parametrize("hires", [{"hr_scale": 2.0}, {"hr_resize_x": 128, "hr_resize_y": 96}])
def test_hires_fix_both_passes_on_the_engine(boot, tiny_checkpoint, hires: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    result, _, delta = compare(host, enable_hr=True, hr_second_pass_steps=2, denoising_strength=0.5, **hires)
    assert delta["engine_calls"] >= STEPS + 2 and delta["fallback_calls"] == 0
    assert result.latents.shape[-2:] == ((hires.get("hr_resize_y") or 128) // 8, (hires.get("hr_resize_x") or 128) // 8)


def test_hires_second_pass_outside_every_profile_falls_back_and_says_so(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    result, _, delta = compare(host, enable_hr=True, hr_scale=3.0, hr_second_pass_steps=2, denoising_strength=0.5)
    assert delta["engine_calls"] == STEPS and delta["fallback_calls"] >= 2
    assert "TensorRT: some UNet calls ran on PyTorch" in result.comments and "192x192 px" in result.comments
    assert "192x192 px" in result.js() and "TensorRT fallback" in result.info  # API clients see it too
    assert result.comments.count("TensorRT:") == 1  # told once, not per step
    assert next(ref(host).parameters()).device.type == "cpu"  # given back after the generation


def test_sd2_v_prediction(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd2-v"))
    assert host.sd_model.parameterization == "v"
    _, _, delta = compare(host)
    assert delta["engine_calls"] == STEPS


def test_sdxl_base_with_the_refiner_switching_in_and_out(boot, tiny_checkpoint, engines) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sdxl-base"), tiny_checkpoint("sdxl-refiner"),
                config={"sd_model_checkpoint": "sdxl-base-s0.safetensors"})
    kw = {"steps": 4, "refiner_checkpoint": "sdxl-refiner-s0", "refiner_switch_at": 0.5}
    result, _, delta = compare(host, **kw)
    assert delta["engine_calls"] == 4 and delta["fallback_calls"] == 0  # refiner steps on the refiner engine
    assert "Refiner: sdxl-refiner-s0" in result.info
    _, _, delta = compare(host)  # base alone afterwards: back on the base engine
    assert delta["engine_calls"] == STEPS and delta["fallback_calls"] == 0
    assert svc().status().active.engines[0] == engines[1]["sdxl-base"]


def test_checkpoint_change_automatic_follows_and_refits(boot, tiny_checkpoint, engines) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1", 0), tiny_checkpoint("sd1", 1), tiny_checkpoint("sdxl-base", 0),
                config={"sd_model_checkpoint": "sd1-s0.safetensors"})
    compare(host)
    other = {"override_settings": {"sd_model_checkpoint": "sd1-s1"}}
    _, _, delta = compare(host, **other)  # same architecture, no engine of its own: refitted with its weights
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0, "refits": 1}
    assert host.sd_unet.current_unet.option.label == "[TRT] sd1-s1"
    _, _, delta = compare(host, override_settings={"sd_model_checkpoint": "sdxl-base-s0"})
    assert delta["engine_calls"] == STEPS and delta["fallback_calls"] == 0
    assert svc().status().active.engines == [engines[1]["sdxl-base"]]


@pytest.mark.parametrize("flag", ["--medvram", "--lowvram"])
def test_memory_flags(boot, tiny_checkpoint, flag: str) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), args=[flag])
    _, _, delta = compare(host, enable_hr=True, hr_scale=3.0, hr_second_pass_steps=2, denoising_strength=0.5)
    assert delta["engine_calls"] == STEPS and delta["fallback_calls"] >= 2


@needs_fp16
def test_half_precision_webui_gets_half_outputs(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """The WebUI's default fp16 UNet: the engine (fp32 here) is handed fp16 inputs and must answer in fp16. The
    PyTorch reference itself now carries fp16 rounding (~1e-3 relative per call), hence 2e-2."""
    host = boot(tiny_checkpoint("sd1"), no_half=False)
    assert host.m("devices").dtype_unet == torch.float16
    reference = gen(host, unet="None")
    before = counters()["engine_calls"]
    result = gen(host)
    assert counters()["engine_calls"] - before == STEPS
    assert_close(result.latents, reference.latents, rel=2e-2)
    assert any(c["x_dtype"] == torch.float16 for c in host.routed_calls)


# ---- item 4: toggles --------------------------------------------------------------------------------------
def test_sd_unet_none_a_named_engine_and_sdtrt_off_each_run_what_they_say(boot, tiny_checkpoint, engines) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    host.clear_trace()
    before = counters()
    none = gen(host, unet="None")
    assert host.sd_unet.current_unet is None  # None: no SdUnet routes the calls ...
    assert len(host.torch_calls) == STEPS and counters()["engine_calls"] == before["engine_calls"]  # ... PyTorch ran
    named = gen(host, unet=f"[TRT] {engines[1]['sd1']}")
    assert_close(named.latents, none.latents)
    assert host.sd_unet.current_unet.option.label == f"[TRT] {engines[1]['sd1']}"
    before = counters()
    off = gen(host, override_settings={"sdtrt_enabled": False})
    assert torch.equal(off.latents, none.latents)  # off: exactly the PyTorch images
    assert counters()["engine_calls"] == before["engine_calls"]
    assert host.opts.data["sdtrt_enabled"] is True  # override restored after the request
    again = gen(host, unet="None")
    assert torch.equal(again.latents, none.latents)
    assert host.sd_unet.current_unet is None


def test_api_override_settings_toggle_per_request(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    client = host.client()
    body = {"prompt": "a cat", "steps": STEPS, "width": 64, "height": 64, "seed": 7}
    calls = []
    for unet in ("None", "Automatic", "None", "Automatic"):
        before = counters()["engine_calls"]
        r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_unet": unet}})
        assert r.status_code == 200, r.text
        calls.append(counters()["engine_calls"] - before)
    assert calls == [0, STEPS, 0, STEPS]
    assert host.opts.data["sd_unet"] == "Automatic"


def test_fallback_policy_error_fails_with_advice(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    with pytest.raises(Exception, match="no engine profile covers"):
        gen(host, width=256, height=256, override_settings={"sdtrt_fallback": "error"})
    assert host.opts.data["sdtrt_fallback"] == "pytorch"
    before = counters()["fallback_calls"]
    gen(host, width=256, height=256)  # same active engine: the restored policy applies at once
    assert counters()["fallback_calls"] - before == STEPS


# ---- REST API and tab ---------------------------------------------------------------------------------------
def test_rest_api_build_then_generate_then_delete(boot, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "fresh-cache"
    host = boot(tiny_checkpoint("sd1"), args=["--api-auth", "ops:pw"], config={"sdtrt_cache_dir": str(cache)})
    assert host.sd_unet.unet_options == []
    anon = host.client()
    assert anon.get("/sdtrt/v1/engines").status_code == 401
    probe = anon.get("/sdtrt/v1/ready")  # a readiness probe has no credentials: the one open route
    assert probe.status_code == 200 and probe.json()["ready"] is True and probe.json()["serving"] == "pytorch"
    client = host.client(auth=("ops", "pw"))
    r = client.post("/sdtrt/v1/engines", json={"checkpoint": "sd1-s0", "profiles": [WEBUI_PROFILE],
                                               "backend": "onnxruntime"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    for _ in range(600):
        job = client.get(f"/sdtrt/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            break
        time.sleep(0.1)
    assert job["state"] == "done", job
    engine_id = job["engine_id"]
    assert (cache / engine_id / "manifest.json").is_file()
    assert "[TRT] sd1-s0" in [o.label for o in host.sd_unet.unet_options]  # the dropdown was refreshed
    _, _, delta = compare(host)
    assert delta["engine_calls"] == STEPS
    st = client.get("/sdtrt/v1/status").json()
    assert st["active"]["engines"] == [engine_id] and st["counters"]["engine_calls"] >= STEPS
    assert client.delete(f"/sdtrt/v1/engines/{engine_id}").status_code == 409  # serving
    gen(host, unet="None")
    assert client.delete(f"/sdtrt/v1/engines/{engine_id}").json() == {"deleted": engine_id}
    assert not (cache / engine_id).exists()
    assert host.sd_unet.unet_options == []


def test_settings_are_registered_in_their_section(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    labels = host.opts.data_labels
    for key in ("sdtrt_enabled", "sdtrt_backend", "sdtrt_cache_dir", "sdtrt_fallback"):
        assert labels[key].section[0] == "sdtrt"
    assert labels["sdtrt_backend"].default == "auto"
    options = host.client().get("/sdapi/v1/options").json()  # --nowebui: only import-time settings get through
    assert options["sdtrt_enabled"] is True and options["sdtrt_fallback"] == "pytorch"
    host.reload_ui()
    assert host.opts.data_labels["sdtrt_fallback"].section[0] == "sdtrt"  # still there after Reload UI


# ---- nothing survives a failure -------------------------------------------------------------------------------
def snapshot_host(host: FakeHost) -> dict[str, Any]:
    unet = ref(host)
    hijack = host.m("sd_hijack")
    return {
        "sdpa": torch.nn.functional.scaled_dot_product_attention,
        "optimizer": (getattr(hijack.model_hijack, "optimization_method", None),
                      getattr(hijack, "current_optimizer", None)),
        "device": next(unet.parameters()).device,
        "weights": {k: v.clone() for k, v in unet.state_dict().items()},
        "current_unet": host.sd_unet.current_unet,
        "mode": unet.training,
    }


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["sdpa"] is before["sdpa"]
    assert after["optimizer"] == before["optimizer"]
    assert after["device"] == before["device"] and after["mode"] == before["mode"]
    assert after["current_unet"] is before["current_unet"]
    assert before["weights"].keys() == after["weights"].keys()
    assert all(torch.equal(before["weights"][k], after["weights"][k]) for k in before["weights"])


@pytest.mark.parametrize("where", ["export", "build"])
def test_failed_build_leaves_the_webui_as_it_was(boot, tiny_checkpoint, tmp_path, monkeypatch, where) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), config={"sdtrt_cache_dir": str(tmp_path / "c")})
    gen(host, unet="None")
    before = snapshot_host(host)
    if where == "export":
        real = torch.onnx.export

        def exploding_export(*a: Any, **k: Any) -> None:
            assert torch.nn.functional.scaled_dot_product_attention is not before["sdpa"]  # swapped while tracing
            raise RuntimeError("injected export failure")

        monkeypatch.setattr(sdtrt.pipeline.export.torch.onnx, "export", exploding_export)
    else:
        real = None

        def exploding_build(self: Any, *a: Any, **k: Any) -> None:
            raise RuntimeError("injected build failure")

        monkeypatch.setattr(sdtrt.backends.ort.OrtBackend, "build", exploding_build)
    client = host.client()
    job_id = client.post("/sdtrt/v1/engines", json={"checkpoint": "sd1-s0", "profiles": ["1x64x64x75"],
                                                    "backend": "onnxruntime"}).json()["job_id"]
    job = svc().jobs.wait(job_id, timeout=120)
    assert job.state == "failed" and "injected" in (job.error or "")
    assert_unchanged(before, snapshot_host(host))
    assert not any((tmp_path / "c").glob("sd1-*"))  # nothing published
    if real is not None:
        monkeypatch.setattr(sdtrt.pipeline.export.torch.onnx, "export", real)
    reference = gen(host, unet="None")
    assert torch.equal(reference.latents, gen(host, unet="None").latents)


def test_engine_that_fails_mid_generation_falls_back(boot, tiny_checkpoint, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    none = gen(host, unet="None")

    def broken(self: Any, feeds: Any, index: int) -> Any:
        raise RuntimeError("injected: CUDA error: an illegal memory access")

    monkeypatch.setattr(sdtrt.backends.ort.OrtRunner, "infer", broken)
    result = gen(host)
    assert torch.equal(result.latents, none.latents)
    assert "illegal memory access" in result.comments and "illegal memory access" in counters()["last_error"]


def test_reload_ui_leaves_no_old_unet_behind(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    compare(host)
    old = host.sd_unet.current_unet
    assert old is not None
    host.reload_ui()
    assert host.sd_unet.current_unet is None  # handed back to PyTorch before the scripts were re-executed
    assert next(ref(host).parameters()).device == host.m("devices").device
    _, _, delta = compare(host)
    assert delta["engine_calls"] == STEPS
    assert type(host.sd_unet.current_unet) is not type(old)  # the re-executed script's class


def test_png_of_engine_and_pytorch_match_through_the_api(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """The images users get: decoded PNGs from /sdapi/v1/txt2img with and without the engine."""
    import io

    import numpy as np
    from PIL import Image

    host = boot(tiny_checkpoint("sd1"))
    client = host.client()
    body = {"prompt": "a cat", "steps": STEPS, "width": 64, "height": 64, "seed": 99}
    pics = []
    for unet in ("None", "Automatic"):
        r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_unet": unet}})
        pics.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))), dtype=np.int16))
    assert pics[0].std() > 1  # not a blank image
    assert np.abs(pics[0] - pics[1]).max() <= 1  # 8-bit rounding at most


# ---- engines with fixed weights (ahead-of-time builds on CPU nodes, --no-refit) ----------------------------------
def test_engine_with_fixed_weights_serves_its_own_checkpoint_only(boot, tiny_checkpoint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An engine built without refit (as TensorRT-RTX builds ahead of time without a GPU) serves the checkpoint it
    embeds; with another checkpoint of the same architecture loaded the generation runs on PyTorch and says why."""
    from sdtrt.backends.base import BuildOptions
    from sdtrt.pipeline.build import build_engine
    from sdtrt.profiles import Profile

    cache = tmp_path / "fixed"
    built = build_engine(tiny_checkpoint("sd1", 0), [Profile.parse(WEBUI_PROFILE)], cache, backend="onnxruntime",
                         options=BuildOptions(refit=False, strip_weights=False)).manifest
    host = boot(tiny_checkpoint("sd1", 0), tiny_checkpoint("sd1", 1),
                config={"sd_model_checkpoint": "sd1-s0.safetensors", "sdtrt_cache_dir": str(cache)})
    _, _, delta = compare(host)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0, "refits": 0}
    result, _, delta = compare(host, override_settings={"sd_model_checkpoint": "sd1-s1"})
    assert delta == {"engine_calls": 0, "fallback_calls": STEPS, "refits": 0}
    text = (result.comments or "") + str(result.info)
    assert f"engine {built.id} cannot take the loaded checkpoint's weights" in text and "sd1-s0" in text


def test_api_takes_build_targets_and_refuses_bad_ones(boot, tiny_checkpoint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), config={"sdtrt_cache_dir": str(tmp_path / "c")})
    client = host.client()
    body = {"checkpoint": "sd1-s0", "profiles": ["1x64x64x75"], "backend": "onnxruntime"}
    r = client.post("/sdtrt/v1/engines", json={**body, "targets": ["ampere"]})
    assert r.status_code == 400 and "not a GPU compute capability" in r.json()["detail"]
    r = client.post("/sdtrt/v1/engines", json={**body, "targets": ["sm89"]})
    assert r.status_code == 400 and "only for the device it runs on" in r.json()["detail"]
    r = client.post("/sdtrt/v1/engines", json={**body, "targets": "sm89"})
    assert r.status_code == 422  # a list, not a string
    job_id = client.post("/sdtrt/v1/engines", json={**body, "targets": []}).json()["job_id"]
    job = svc().jobs.wait(job_id, timeout=300)
    assert job.state == "done", job.error
    [row] = client.get("/sdtrt/v1/engines").json()["engines"]
    assert row["targets"] == [] and row["weights"] == "embedded" and row["ok"]


def test_checkpoints_kept_in_memory_switch_engines_too(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """With sd_checkpoints_limit > 1 A1111 brings an already loaded checkpoint back without its load callbacks
    (reuse_model_from_already_loaded): a hires pass on another checkpoint kept in memory must still run with that
    checkpoint's weights, not the first pass's engine weights."""
    host = boot(tiny_checkpoint("sd1", 0), tiny_checkpoint("sd1", 1),
                config={"sd_model_checkpoint": "sd1-s0.safetensors", "sd_checkpoints_limit": 2})
    kw = {"enable_hr": True, "hr_scale": 2.0, "hr_second_pass_steps": 2, "denoising_strength": 0.5,
          "hr_upscaler": "Latent", "hr_checkpoint_name": "sd1-s1"}
    for _ in range(2):  # the second time both checkpoints are in memory: no load, no callback
        result, _, delta = compare(host, **kw)
        assert delta["fallback_calls"] == 0 and delta["engine_calls"] == STEPS + 2
