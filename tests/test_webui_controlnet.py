"""ControlNet generations on an engine with ControlNet inputs (webui/controlnet.py) in the fake A1111 1.10.1 with
the sd-webui-controlnet stand-in: each image against SD Unet None's (PyTorch running the same hook), every UNet call
on the engine, unsupported unit types on PyTorch with the notice, nothing left behind for the next generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fakehost import FakeHost
from test_webui_a1111 import ROOT, STEPS, assert_close, gen
from test_webui_host_changes import CONTROLNET, differs, run, units
from webui_support import close_webuis

pytest.importorskip("fastapi")

PROFILE = "1x64x64x75:1x64x64x75:2x128x128x150"


@pytest.fixture(scope="module")
def control_cache(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Engines with ControlNet inputs for the seed-0 SD1 and SDXL checkpoints (the hosts load those)."""
    from sdtrt.pipeline.build import build_engine
    from sdtrt.profiles import Profile

    cache = tmp_path_factory.mktemp("control-cache")
    for family in ("sd1", "sd1-inpaint", "sdxl-base"):
        build_engine(tiny_checkpoint(family, 0), [Profile.parse(PROFILE)], cache, backend="onnxruntime",
                     controlnet=True)
    return cache


@pytest.fixture
def host_for(tmp_path, control_cache, tiny_checkpoint):  # type: ignore[no-untyped-def]
    import sdtrt.webui.service as service_module

    hosts = []

    def boot(family: str = "sd1", seed: int = 0, cache: Path | None = None) -> FakeHost:
        service_module._SERVICE = None
        cfg = {"sd_unet": "Automatic", "sdtrt_enabled": True, "sdtrt_fallback": "pytorch",
               "sdtrt_cache_dir": str(cache or control_cache)}
        host = FakeHost.boot(tmp_path / f"cn-{family}-{seed}-{len(hosts)}", [tiny_checkpoint(family, seed)],
                             config=cfg, args=["--no-half"],
                             extensions={"sd-webui-trt": ROOT, "sd-webui-controlnet": CONTROLNET})
        hosts.append(host)
        return host

    yield boot
    close_webuis(hosts)


def engine_matches_pytorch(host: FakeHost, *unit_specs: dict[str, Any], calls: int = STEPS, **kw: Any) -> Any:
    plain = gen(host, unet="None", **kw)
    reference = gen(host, unet="None", alwayson_scripts=units(*unit_specs), **kw)
    assert differs(reference, plain) > 0.01  # the units have an effect under PyTorch
    result, d = run(host, alwayson_scripts=units(*unit_specs), **kw)
    assert_close(result.latents, reference.latents)
    assert d == {"engine_calls": calls, "fallback_calls": 0}, d
    assert "TensorRT fallback" not in result.info
    unet = host.sd_model.model.diffusion_model
    assert next(unet.parameters()).device.type == "cpu"  # the PyTorch UNet stayed offloaded
    return result


@pytest.mark.parametrize("unit", [
    {"module": "controlnet", "weight": 1.0},
    {"module": "controlnet", "weight": 0.5, "control_mode": "prompt"},
    {"module": "controlnet", "weight": 1.0, "control_mode": "controlnet"},
    {"module": "t2i_adapter", "weight": 0.8},
    {"module": "colorfix", "weight": 0.7},
    {"module": "shuffle", "weight": 1.0},
])
def test_controlnet_units_run_on_the_engine(host_for, unit) -> None:  # type: ignore[no-untyped-def]
    engine_matches_pytorch(host_for("sd1"), unit)


def test_style_adapter_tokens_run_on_the_engine(host_for) -> None:  # type: ignore[no-untyped-def]
    """77 prompt tokens + 8 style tokens = 85 context rows, inside the profile's 75-150 token range."""
    engine_matches_pytorch(host_for("sd1"), {"module": "t2ia_style_clipvision", "weight": 1.0})


def test_sdxl_revision_changes_y_and_runs_on_the_engine(host_for) -> None:  # type: ignore[no-untyped-def]
    engine_matches_pytorch(host_for("sdxl-base"), {"module": "revision_clipvision", "weight": 1.0},
                           {"module": "controlnet", "weight": 0.5})


def test_inpaint_model_with_inpaint_only(host_for) -> None:  # type: ignore[no-untyped-def]
    """An inpainting model (9 input channels): the hook replaces the mask and masked-image channels and blends the
    output; the engine gets the sample the hook built."""
    engine_matches_pytorch(host_for("sd1-inpaint"), {"module": "inpaint_only", "weight": 1.0},
                           {"module": "controlnet", "weight": 0.5})


def test_lora_and_another_checkpoint_with_a_controlnet_unit(host_for, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """The engine was built from the seed-0 checkpoint; the host runs a seed-3 checkpoint of the same architecture
    (its weights refitted in) with a LoRA (refitted on top), and a ControlNet unit."""
    from test_webui_lora import add_lora

    host = host_for("sd1", seed=3)
    add_lora(host, "net", tiny_checkpoint("sd1", 3), "lora", seed=3)
    unit = {"module": "controlnet", "weight": 1.0}
    without = gen(host, unet="None", alwayson_scripts=units(unit))
    result = engine_matches_pytorch(host, unit, prompt="a photo of a cat <lora:net:0.8>")
    assert differs(result, without) > 0.01  # the LoRA has an effect too


def test_two_units_a_guidance_window_and_a_batch(host_for) -> None:  # type: ignore[no-untyped-def]
    host = host_for("sd1")
    engine_matches_pytorch(host, {"module": "controlnet", "weight": 0.6, "guidance_start": 0.3,
                                  "guidance_end": 0.7},
                           {"module": "t2i_adapter", "weight": 1.0}, batch_size=2, width=88, height=72)


def test_hires_fix_both_passes_on_the_engine(host_for) -> None:  # type: ignore[no-untyped-def]
    host = host_for("sd1")
    engine_matches_pytorch(host, {"module": "controlnet", "weight": 1.0}, calls=STEPS + 2, enable_hr=True,
                           hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.5)


def test_sdxl_controlnet_and_adapter(host_for) -> None:  # type: ignore[no-untyped-def]
    host = host_for("sdxl-base")
    engine_matches_pytorch(host, {"module": "controlnet", "weight": 1.0}, {"module": "t2i_adapter", "weight": 1.0})


@pytest.mark.parametrize(("module", "told"), [("reference_only", "AttentionInjection"),
                                              ("ip_adapter", "IPAdapter")])
def test_units_that_change_the_unets_inside_run_on_pytorch_with_the_notice(host_for, module, told) -> None:  # type: ignore[no-untyped-def]
    host = host_for("sd1")
    plain = gen(host, unet="None")
    reference = gen(host, unet="None", alwayson_scripts=units({"module": module, "weight": 1.0}))
    assert differs(reference, plain) > 0.01
    result, d = run(host, alwayson_scripts=units({"module": module, "weight": 1.0}))
    assert_close(result.latents, reference.latents)
    assert d["engine_calls"] == 0
    assert "TensorRT fallback" in result.info and told in result.info
    # nothing the unit or we did stays behind: the next plain generation runs on the engine
    result, d = run(host)
    assert_close(result.latents, plain.latents)
    assert d == {"engine_calls": STEPS, "fallback_calls": 0}
    assert "forward" not in vars(host.sd_model.model.diffusion_model) or \
        vars(host.sd_model.model.diffusion_model)["forward"].__func__ is type(host.sd_model.model.diffusion_model).forward


def test_a_controlnet_generation_leaves_nothing_behind(host_for) -> None:  # type: ignore[no-untyped-def]
    from sdtrt.webui.controlnet import installed_wrapper, recognise

    host = host_for("sd1")
    plain = gen(host, unet="None")
    engine_matches_pytorch(host, {"module": "controlnet", "weight": 1.0})
    unet = host.sd_model.model.diffusion_model
    assert installed_wrapper(unet) is None and recognise(unet) is None
    result, d = run(host)
    assert_close(result.latents, plain.latents)
    assert d == {"engine_calls": STEPS, "fallback_calls": 0}


def test_plain_engine_sends_controlnet_to_pytorch_naming_the_fix(host_for, engines) -> None:  # type: ignore[no-untyped-def]
    host = host_for("sd1", cache=engines[0])
    unit = {"module": "controlnet", "weight": 1.0}
    reference = gen(host, unet="None", alwayson_scripts=units(unit))
    result, d = run(host, alwayson_scripts=units(unit))
    assert_close(result.latents, reference.latents)
    assert d == {"engine_calls": 0, "fallback_calls": STEPS}
    assert "ControlNet inputs" in result.info


def test_api_builds_an_engine_with_controlnet_inputs(host_for, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from test_webui_a1111 import svc

    host = host_for("sd1", cache=tmp_path / "c")
    client = host.client()
    bad = client.post("/sdtrt/v1/engines", json={"checkpoint": "sd1-s0", "profiles": [PROFILE],
                                                 "backend": "onnxruntime", "controlnet": "maybe"})
    assert bad.status_code == 422
    job_id = client.post("/sdtrt/v1/engines", json={"checkpoint": "sd1-s0", "profiles": [PROFILE],
                                                    "backend": "onnxruntime", "controlnet": True}).json()["job_id"]
    job = svc().jobs.wait(job_id, timeout=300)
    assert job.state == "done", job.error
    rows = client.get("/sdtrt/v1/engines").json()["engines"]
    assert [r["controlnet"] for r in rows] == [True]
    unit = {"module": "controlnet", "weight": 1.0}
    reference = gen(host, unet="None", alwayson_scripts=units(unit))
    result, d = run(host, alwayson_scripts=units(unit))
    assert_close(result.latents, reference.latents)
    assert d == {"engine_calls": STEPS, "fallback_calls": 0}


def test_a_unit_that_fails_while_the_engine_serves_runs_on_pytorch(host_for, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A unit whose own code fails when the PyTorch UNet is not on the device (as ControlNet-LoRA could): the call
    runs again through the hook on PyTorch, with the UNet moved back, and the generation does not fail."""
    import sdtrt.webui.controlnet as cn

    host = host_for("sd1")
    unit = {"module": "controlnet", "weight": 1.0}
    reference = gen(host, unet="None", alwayson_scripts=units(unit))
    real_serve = cn.serve

    def serve_once_broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("injected: Expected all tensors to be on the same device")

    monkeypatch.setattr(cn, "serve", serve_once_broken)
    result, d = run(host, alwayson_scripts=units(unit))
    assert_close(result.latents, reference.latents)
    assert d == {"engine_calls": 0, "fallback_calls": STEPS}
    assert "same device" in result.info
    monkeypatch.setattr(cn, "serve", real_serve)
    result, d = run(host, alwayson_scripts=units(unit))
    assert d == {"engine_calls": STEPS, "fallback_calls": 0}


def test_error_policy_fails_an_uncovered_controlnet_generation(host_for) -> None:  # type: ignore[no-untyped-def]
    """With the fallback policy "error", a ControlNet call no profile covers fails the generation (as a plain one
    does) instead of running on PyTorch."""
    host = host_for("sd1")
    unit = {"module": "controlnet", "weight": 1.0}
    with pytest.raises(Exception, match="no engine profile covers"):
        gen(host, alwayson_scripts=units(unit), width=256, height=256,
            override_settings={"sdtrt_fallback": "error"})
    _, d = run(host, alwayson_scripts=units(unit))  # the next generation is served as usual
    assert d == {"engine_calls": STEPS, "fallback_calls": 0}


@pytest.mark.parametrize(("module", "plain_engine", "served"), [
    ("controlnet", False, True), ("t2i_adapter", False, True), ("reference_only", False, False),
    ("ip_adapter", False, False), ("controlnet", True, False)])
def test_coverage_predicts_what_controlnet_units_run_on(host_for, engines, module, plain_engine, served) -> None:  # type: ignore[no-untyped-def]
    """POST /sdtrt/v1/coverage with the units of sd-webui-controlnet's API, against what the generation did."""
    from test_coverage import body, predict_and_run

    host = host_for("sd1", cache=engines[0] if plain_engine else None)
    answer, outcome = predict_and_run(host, body(alwayson_scripts=units({"module": module, "weight": 1.0})),
                                      same_words=False)
    assert answer["engine"] is served and (outcome["fallback_calls"] == 0) is served
    told = " ".join(outcome["fallback_reasons"])
    if plain_engine:
        assert "ControlNet inputs" in answer["message"] and "ControlNet inputs" in told
        assert answer["build"]["controlnet"] is True  # the one-click fix: an engine with ControlNet inputs
    elif not served:
        assert "changes the UNet's inside" in answer["message"] and "changes the UNet's inside" in told


def test_coverage_routes_controlnet_calls_to_engines_with_controlnet_inputs_only(host_for, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A plain engine covering 128 px does not serve a ControlNet generation at 128 px when the engine with
    ControlNet inputs covers 64 px only: predicted on PyTorch, as it runs."""
    from sdtrt.pipeline.build import build_engine
    from sdtrt.profiles import Profile
    from test_coverage import body, predict_and_run

    cache = tmp_path / "mixed"
    build_engine(tiny_checkpoint("sd1", 0), [Profile.parse(PROFILE)], cache, backend="onnxruntime")
    build_engine(tiny_checkpoint("sd1", 0), [Profile.parse("1x64x64x75")], cache, backend="onnxruntime",
                 controlnet=True)
    host = host_for("sd1", cache=cache)
    unit = units({"module": "controlnet", "weight": 1.0})
    answer, outcome = predict_and_run(host, body(alwayson_scripts=unit))
    assert answer["engine"] and outcome["fallback_calls"] == 0
    answer, outcome = predict_and_run(host, body(width=128, height=128, alwayson_scripts=unit))
    assert not answer["engine"] and answer["passes"][0]["kind"] == "uncovered" and outcome["engine_calls"] == 0
    assert answer["build"]["controlnet"] is True
    answer, outcome = predict_and_run(host, body(width=128, height=128))  # without units the plain engine serves
    assert answer["engine"] and outcome["fallback_calls"] == 0
