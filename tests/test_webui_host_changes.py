"""What the WebUI and other extensions do to the live UNet, and how the engine stays right (fake A1111 1.10.1):
tiling (circular padding), a model load in progress while a build starts (torch patched process-wide), a
ControlNet-style hook that is live or was restored, and a reference pass that calls the UNet's class forward.

Each case compares final latents with the engine active against SD Unet None (PyTorch), as test_webui_a1111 does.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fakehost import FakeHost
from test_webui_a1111 import ROOT, assert_close, counters, gen
from test_webui_a1111 import boot as boot  # noqa: PLC0414 (the `boot` fixture, used by name)
from webui_support import close_webuis

pytest.importorskip("fastapi")

CONTROLNET = Path(__file__).resolve().parent / "fake_controlnet"


def units(*specs: dict[str, Any]) -> dict[str, Any]:
    return {"controlnet": {"args": list(specs)}}


def deltas(before: dict[str, Any]) -> dict[str, int]:
    after = counters()
    return {k: after[k] - before[k] for k in ("engine_calls", "fallback_calls")}


def run(host: FakeHost, **kw: Any) -> tuple[Any, dict[str, int]]:
    before = counters()
    result = gen(host, **kw)
    return result, deltas(before)


def differs(a: Any, b: Any) -> float:
    return (a.latents - b.latents).abs().max().item() / b.latents.abs().max().item()


# ---- tiling ------------------------------------------------------------------------------------------------
def test_tiling_generation_gives_pytorchs_tiling_image(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    plain = gen(host, unet="None")
    reference = gen(host, unet="None", tiling=True)
    assert differs(reference, plain) > 0.01  # circular padding really changes the image
    result, d = run(host, tiling=True)
    assert_close(result.latents, reference.latents)
    assert d["engine_calls"] == 0 and d["fallback_calls"] > 0
    assert "tiling" in result.info and "TensorRT fallback" in result.info
    # the next generation without tiling runs on the engine again, without a notice
    result, d = run(host)
    assert_close(result.latents, plain.latents)
    assert d == {"engine_calls": 3, "fallback_calls": 0}
    assert "TensorRT fallback" not in result.info


# ---- builds while the model loads -------------------------------------------------------------------------
def test_build_requested_while_the_model_loads_waits_and_succeeds(boot, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    gate = threading.Event()
    host = boot(tiny_checkpoint("sd1", 3), threaded_load=True, load_gate=gate,
                config={"sdtrt_cache_dir": str(tmp_path / "cache")})
    trace = host.ext_module("fake_trace")
    assert trace.loading.wait(30), "the fake's model load did not reach its gate"
    client = host.client()
    r = client.post("/sdtrt/v1/engines", json={"checkpoint": "sd1-s3", "profiles": ["1x64x64x75"],
                                                "backend": "onnxruntime"})
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    deadline = time.monotonic() + 30
    phase = None
    while time.monotonic() < deadline:
        body = client.get(f"/sdtrt/v1/jobs/{job}").json()
        phase = body["phase"]
        assert body["state"] in ("queued", "running"), body  # nothing may fail while the load holds torch
        if "loading the model" in phase:
            break
        time.sleep(0.05)
    assert phase == "waiting for the WebUI to finish loading the model"
    time.sleep(0.5)  # still waiting: it must not run with torch patched
    assert client.get(f"/sdtrt/v1/jobs/{job}").json()["state"] == "running"
    gate.set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = client.get(f"/sdtrt/v1/jobs/{job}").json()
        if body["state"] not in ("queued", "running"):
            break
        time.sleep(0.1)
    assert body["state"] == "done", body
    assert body["engine_id"]
    # and the engine it built is right
    deadline = time.monotonic() + 30
    while host.sd_models.model_data.sd_model is None and time.monotonic() < deadline:
        time.sleep(0.05)
    reference = gen(host, unet="None")
    result, d = run(host)
    assert_close(result.latents, reference.latents)
    assert d == {"engine_calls": 3, "fallback_calls": 0}


def test_a_build_waits_for_a_generation_in_progress(boot, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The build's export never overlaps a generation (A1111's queue lock), and says so while it waits."""
    host = boot(tiny_checkpoint("sd1", 4), config={"sdtrt_cache_dir": str(tmp_path / "cache")})
    from modules import call_queue

    client = host.client()
    with call_queue.queue_lock:  # a generation in progress
        r = client.post("/sdtrt/v1/engines", json={"checkpoint": "sd1-s4", "profiles": ["1x64x64x75"],
                                                    "backend": "onnxruntime"})
        job = r.json()["job_id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            body = client.get(f"/sdtrt/v1/jobs/{job}").json()
            if body["phase"].startswith("waiting for the generation"):
                break
            time.sleep(0.05)
        assert body["phase"] == "waiting for the generation in progress to finish", body
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and client.get(f"/sdtrt/v1/jobs/{job}").json()["state"] == "running":
        time.sleep(0.1)
    assert client.get(f"/sdtrt/v1/jobs/{job}").json()["state"] == "done"


# ---- ControlNet-style hooks ---------------------------------------------------------------------------------
@pytest.fixture
def with_controlnet(tmp_path, engines, tiny_checkpoint):  # type: ignore[no-untyped-def]
    import sdtrt.webui.service as service_module

    service_module._SERVICE = None
    cfg = {"sd_unet": "Automatic", "sdtrt_enabled": True, "sdtrt_fallback": "pytorch",
           "sdtrt_cache_dir": str(engines[0])}
    host = FakeHost.boot(tmp_path / "cn-host", [tiny_checkpoint("sd1")], config=cfg, args=["--no-half"],
                         extensions={"sd-webui-trt": ROOT, "sd-webui-controlnet": CONTROLNET})
    yield host
    close_webuis([host])


@pytest.mark.parametrize("module", ["controlnet", "t2i_adapter"])
def test_controlnet_unit_runs_on_pytorch_and_the_next_generation_on_the_engine(with_controlnet, module) -> None:  # type: ignore[no-untyped-def]
    host = with_controlnet
    unit = {"module": module, "weight": 1.0}
    plain = gen(host, unet="None")
    reference = gen(host, unet="None", alwayson_scripts=units(unit))
    assert differs(reference, plain) > 0.01  # the unit has an effect
    result, d = run(host, alwayson_scripts=units(unit))
    assert_close(result.latents, reference.latents)
    assert "TensorRT fallback" in result.info
    # ControlNet restored its hook: the instance attribute stays behind, bound to the class forward ...
    unet = host.sd_model.model.diffusion_model
    assert "forward" in vars(unet)
    # ... and must not send later generations to PyTorch
    result, d = run(host)
    assert_close(result.latents, plain.latents)
    assert d == {"engine_calls": 3, "fallback_calls": 0}
    assert "TensorRT fallback" not in result.info
    assert next(unet.parameters()).device.type == "cpu"  # the engine serves; the PyTorch UNet stays offloaded


def test_reference_only_unit_is_not_lost_with_the_engine_active(with_controlnet) -> None:  # type: ignore[no-untyped-def]
    host = with_controlnet
    unit = {"module": "reference_only", "weight": 1.0}
    plain = gen(host, unet="None")
    reference = gen(host, unet="None", alwayson_scripts=units(unit))
    assert differs(reference, plain) > 0.01  # the reference pass has an effect under PyTorch
    result, d = run(host, alwayson_scripts=units(unit))
    assert_close(result.latents, reference.latents)  # the write pass ran on PyTorch, the banks were filled
    assert d == {"engine_calls": 0, "fallback_calls": 6}  # per step: the write pass and the hook's own pass
    assert "TensorRT fallback" in result.info and "ControlNet" in result.info
    result, d = run(host)
    assert_close(result.latents, plain.latents)
    assert d == {"engine_calls": 3, "fallback_calls": 0}


def test_restored_hook_is_told_from_a_live_one() -> None:
    import torch

    from sdtrt.webui.foreign import live_forward_hook

    class Net(torch.nn.Module):
        def forward(self, x):  # type: ignore[no-untyped-def]
            return x

    net = Net()
    assert not live_forward_hook(net)
    net._original_forward = net.forward
    net.forward = (lambda self, x: x * 2).__get__(net, Net)
    assert live_forward_hook(net)
    net.forward = net._original_forward  # ControlNet's restore
    del net._original_forward
    assert "forward" in vars(net) and not live_forward_hook(net)
    other = Net()
    net.forward = other.forward  # bound to another instance: not the UNet's own forward
    assert live_forward_hook(net)
