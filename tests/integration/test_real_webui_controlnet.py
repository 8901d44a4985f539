"""sd-webui-controlnet v1.1.455 beside sd-webui-trt in the real A1111 1.10.1.

First with a plain engine (no ControlNet inputs): units run on PyTorch with the notice. Then an engine with
ControlNet inputs is built through the API, and T2I-Adapter units (weights, the three control modes, a guidance
window, two units, hires fix) run every UNet call on it, each image within 2/255 of SD Unet None's with the same
units; reference-only still runs on PyTorch with the notice.

ControlNet runs the UNet's blocks itself while a unit is active (its hook replaces the UNet's `forward` on the
instance, and leaves that attribute behind, bound to the class forward, when it restores), so the engine cannot
serve such a generation: it must run on PyTorch, say so, and give the image SD Unet None gives with the same unit.
Then the next generation without a unit must run every step on the engine again (before the fix, every later
generation said it ran on PyTorch). Reference-only's "write" pass calls the UNet's class forward, which A1111
routes to the engine; served by the engine, the attention banks are never written and the unit silently does
nothing, so it too must give PyTorch's image.

Models. A ControlNet proper is always built at SD1's full width by sd-webui-controlnet, so it cannot match a tiny
UNet; a T2I-Adapter is sized from its file (features of c, 2c, 4c, 4c channels added after input blocks 2, 5, 8 and
11), so the module uses a tiny UNet with SD1's block layout (tiny_webui_model.py `--unet sd1-blocks`: 4 levels, 2
res blocks each, channel mult 1-2-4-4, 32 channels) and a random-weight adapter of matching widths
(`write_tiny_model`/`write_t2i_adapter`). Units get a 64x64 gradient as input with preprocessor "none"
(T2I-Adapter) or "reference_only" (no model file), so nothing is downloaded. ControlNet appends its detected map to
`images`; the generated image is `images[0]`.

ControlNet comes from SDTRT_CONTROLNET_DIR, default `$SDTRT_A1111_DIR/extensions/sd-webui-controlnet`, linked into
the data dir's extensions/ (A1111 reads extensions from `--data-dir`); it needs `controlnet_aux` in the WebUI's
venv (see README.md). Skipped when that checkout is absent.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .a1111_host import A1111Install, WebUIHost, clean_env, gradient_png, write_tiny_model
from .test_real_webui_sdtrt import (
    MAX_8BIT_DIFF,
    MAX_DIFFERING_FRACTION,
    PROFILE,
    STEPS,
    compare,
    counters,
    fallback_notices,
    generate,
    sdtrt_config,
    wait_job,
)
from .tiny_webui_model import SD1_BLOCKS_CHANNELS, write_t2i_adapter

pytestmark = pytest.mark.integration

CONTROLNET = "sd-webui-controlnet"
#: The always-on script's title (A1111 matches alwayson_scripts keys case-insensitively).
CONTROLNET_SCRIPT = "controlnet"
ADAPTER_STEM = "t2iadapter_tiny_sd15"
GRADIENT = base64.b64encode(gradient_png(64, 64)).decode()
#: The ControlNet API version of v1.1.455 (GET /controlnet/version).
CONTROLNET_API_VERSION = 3

#: Runs in the WebUI's Python: argv = controlnet dir, adapter file. Builds sd-webui-controlnet's own `Adapter` from
#: the file the way its model guess does for a file with `conv_in.weight` (cin and width from conv_in, kernel size
#: from body.0.block2, conv downsampling iff down_opt weights exist), loads it strictly and runs a 64x64 image.
ADAPTER_CHECK = r'''
import json, sys, types
import torch
from safetensors.torch import load_file

cn_dir, path = sys.argv[1:3]
modules = types.ModuleType("modules")
modules.__path__ = []
devices = types.ModuleType("modules.devices")
modules.devices = devices
sys.modules.update({"modules": modules, "modules.devices": devices})
sys.path.insert(0, cn_dir)
from scripts.adapter import Adapter

sd = load_file(path)
cin, c = sd["conv_in.weight"].shape[1], sd["conv_in.weight"].shape[0]
adapter = Adapter(cin=cin, channels=[c, c * 2, c * 4, c * 4], nums_rb=2, ksize=sd["body.0.block2.weight"].shape[2],
                  sk=True, use_conv=any(k.endswith("down_opt.op.weight") for k in sd), is_sdxl=cin in (256, 768))
adapter.load_state_dict(sd, strict=True)
with torch.no_grad():
    features = adapter(torch.rand(1, 3, 64, 64))
print(json.dumps({"shapes": [list(f.shape) for f in features], "std": [float(f.std()) for f in features]}))
'''


@pytest.fixture(scope="module")
def controlnet_dir(a1111_install: A1111Install) -> Path:
    path = a1111_install.controlnet_dir()
    if not (path / "scripts" / "controlnet.py").is_file():
        pytest.skip(f"no sd-webui-controlnet checkout at {path} (set SDTRT_CONTROLNET_DIR; see "
                    f"tests/integration/README.md)")
    return path


@pytest.fixture(scope="module")
def blocks_checkpoint(a1111_install: A1111Install, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with SD1's block layout (see the module docstring)."""
    return write_tiny_model(a1111_install, tmp_path_factory.mktemp("a1111-models-blocks"), stem="tiny-sd1-blocks",
                            unet="sd1-blocks")


@pytest.fixture(scope="module")
def host(controlnet_dir: Path, blocks_checkpoint: Path, webui_factory: Callable[..., WebUIHost],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebUIHost]:
    data_dir = tmp_path_factory.mktemp("a1111-controlnet")
    write_t2i_adapter(data_dir / "models" / "ControlNet" / f"{ADAPTER_STEM}.safetensors", SD1_BLOCKS_CHANNELS, seed=5)
    h = webui_factory(data_dir=data_dir, checkpoint=blocks_checkpoint, extensions={CONTROLNET: controlnet_dir},
                      config=sdtrt_config(tmp_path_factory.mktemp("sdtrt-cache-controlnet")))
    job = build_through_api(h)
    print(f"engine for {blocks_checkpoint.name} built in {job['finished'] - job['started']:.1f}s")
    yield h
    h.stop()


def build_through_api(host: WebUIHost, controlnet: bool = False) -> dict[str, Any]:
    """Build an onnxruntime engine (with ControlNet inputs or not) for the loaded checkpoint; the finished job."""
    status, answer = host.request("POST", "/sdtrt/v1/engines", {
        "checkpoint": host.checkpoint.stem, "profiles": [PROFILE], "backend": "onnxruntime",  # type: ignore[union-attr]
        "controlnet": controlnet})
    assert status == 202, answer
    job = wait_job(host, answer["job_id"])
    assert job["state"] == "done", job
    return job


def listed_model(host: WebUIHost, stem: str) -> str:
    """A control model's name as ControlNet lists it ("<stem> [<hash>]")."""
    models = host.get("/controlnet/model_list")["model_list"]
    names = [m for m in models if m.startswith(stem)]
    assert len(names) == 1, models
    return str(names[0])


@pytest.fixture(scope="module")
def adapter_model(host: WebUIHost) -> str:
    return listed_model(host, ADAPTER_STEM)


def unit(module: str, model: str = "None", **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "module": module, "model": model, "image": GRADIENT, "weight": 1.0,
            "resize_mode": "Crop and Resize", "guidance_start": 0.0, "guidance_end": 1.0, "pixel_perfect": False,
            "control_mode": "Balanced", **extra}


def with_units(*units: dict[str, Any]) -> dict[str, Any]:
    return {"alwayson_scripts": {CONTROLNET_SCRIPT: {"args": list(units)}}}


def controlnet_params(out: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in json.loads(out["info"])["extra_generation_params"].items() if k.startswith("ControlNet")}


# ---- tests, in order ----------------------------------------------------------------------------------------------
def test_the_adapter_file_is_a_t2i_adapter_that_fits_the_tiny_unet(a1111_install: A1111Install,
                                                                     controlnet_dir: Path,
                                                                     tmp_path: Path) -> None:
    """sd-webui-controlnet's own Adapter class takes every tensor of the file (strict) and yields features of the
    widths and sizes of the UNet's four levels for a 64x64 image (8x8 latents)."""
    path = write_t2i_adapter(tmp_path / f"{ADAPTER_STEM}.safetensors", SD1_BLOCKS_CHANNELS, seed=5)
    proc = subprocess.run([str(a1111_install.python), "-c", ADAPTER_CHECK, str(controlnet_dir), str(path)],
                          env=clean_env({"PYTHONDONTWRITEBYTECODE": "1"}), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    c = SD1_BLOCKS_CHANNELS
    assert result["shapes"] == [[1, c, 8, 8], [1, 2 * c, 4, 4], [1, 4 * c, 2, 2], [1, 4 * c, 1, 1]], result
    assert all(0.05 < s < 50 for s in result["std"]), result  # features of order one: the adapter has an effect


def test_controlnet_loads_beside_the_extension(host: WebUIHost, adapter_model: str) -> None:
    assert host.get("/controlnet/version") == {"version": CONTROLNET_API_VERSION}
    modules = host.get("/controlnet/module_list")["module_list"]
    assert "none" in modules and "reference_only" in modules, modules
    assert "ControlNet v1.1.455" in host.log_text_since_start()
    assert host.extension_errors() == [], host.log_tail(150)
    print(f"ControlNet model: {adapter_model}")


def test_engine_alone_matches_pytorch_on_the_sd1_blocks_model(host: WebUIHost) -> None:
    """The baseline for this module's model: without units every step runs on the engine, PyTorch's image."""
    _, reference, _ = generate(host, "None")
    assert len(set(reference)) > 8, "constant image"
    out, pixels, delta = generate(host, "Automatic")
    worst, frac = compare(reference, pixels)
    print(f"sd1-blocks engine vs PyTorch: max 8-bit diff {worst}, differing {frac:.5%}; {delta}")
    assert delta["engine_calls"] == STEPS and delta["fallback_calls"] == 0, delta
    assert fallback_notices(out) == []
    assert worst <= MAX_8BIT_DIFF and frac <= MAX_DIFFERING_FRACTION, (worst, frac)


def check_unit_runs_on_pytorch(host: WebUIHost, the_unit: dict[str, Any], what: str) -> None:
    """A generation with `the_unit` and the engine active gives SD Unet None's image with the same unit, runs no
    UNet call on the engine and says so; the unit has a visible effect (else nothing would be tested)."""
    _, plain, _ = generate(host, "None")
    ref_out, reference, ref_delta = generate(host, "None", **with_units(the_unit))
    assert ref_delta["engine_calls"] == 0 and ref_delta["fallback_calls"] == 0, ref_delta
    assert "ControlNet 0" in controlnet_params(ref_out), ref_out["info"][:800]
    effect, effect_frac = compare(plain, reference)
    assert effect > 10 * MAX_8BIT_DIFF, f"{what}: the unit barely changes the image ({effect}); nothing is tested"

    out, pixels, delta = generate(host, "Automatic", **with_units(the_unit))
    worst, frac = compare(reference, pixels)
    notices = fallback_notices(out)
    print(f"{what}, engine active vs SD Unet None: max 8-bit diff {worst}, differing {frac:.5%}; effect of the "
          f"unit: max {effect}, {effect_frac:.1%} of values; counters {delta}; notices {notices}; "
          f"{len(out['images'])} images")
    assert controlnet_params(out) == controlnet_params(ref_out)
    assert worst <= MAX_8BIT_DIFF and frac <= MAX_DIFFERING_FRACTION, (what, worst, frac)
    assert delta["engine_calls"] == 0, delta
    assert len(notices) == 1, (notices, out["info"][:800])
    assert "ControlNet" in notices[0], notices
    assert counters(host)["last_error"] is None


def check_next_generation_runs_on_the_engine(host: WebUIHost, what: str) -> None:
    """Issue 11 item 4: after a ControlNet generation (whose restored hook leaves `forward` on the UNet instance),
    a generation without units runs every step on the engine, with no notice, and gives PyTorch's image."""
    out, pixels, delta = generate(host, "Automatic")
    _, reference, _ = generate(host, "None")
    worst, frac = compare(reference, pixels)
    print(f"after {what}: {delta}; engine vs PyTorch max 8-bit diff {worst}, differing {frac:.5%}")
    assert delta["engine_calls"] == STEPS, delta
    assert delta["fallback_calls"] == 0 and delta["fallback_reasons"] == {}, delta
    assert fallback_notices(out) == [], out["info"][:800]
    assert controlnet_params(out) == {}
    assert worst <= MAX_8BIT_DIFF and frac <= MAX_DIFFERING_FRACTION, (worst, frac)


def test_t2i_adapter_unit_gives_pytorchs_image_with_the_notice(host: WebUIHost, adapter_model: str) -> None:
    check_unit_runs_on_pytorch(host, unit("none", adapter_model), "T2I-Adapter")


def test_after_a_t2i_adapter_generation_the_next_one_runs_on_the_engine(host: WebUIHost, adapter_model: str) -> None:
    generate(host, "Automatic", **with_units(unit("none", adapter_model)))
    check_next_generation_runs_on_the_engine(host, "a T2I-Adapter generation")


def test_reference_only_unit_gives_pytorchs_image_with_the_notice(host: WebUIHost) -> None:
    check_unit_runs_on_pytorch(host, unit("reference_only"), "reference-only")


def test_after_a_reference_only_generation_the_next_one_runs_on_the_engine(host: WebUIHost) -> None:
    generate(host, "Automatic", **with_units(unit("reference_only")))
    check_next_generation_runs_on_the_engine(host, "a reference-only generation")
    assert host.extension_errors() == [], host.log_tail(150)


# ---- an engine with ControlNet inputs -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def control_engine(host: WebUIHost) -> str:
    job = build_through_api(host, controlnet=True)
    rows = host.get("/sdtrt/v1/engines")["engines"]
    assert sorted(r["controlnet"] for r in rows) == [False, True], rows  # both variants, side by side
    print(f"engine with ControlNet inputs built in {job['finished'] - job['started']:.1f}s")
    return str(job["result"]["engine_id"])


def check_units_run_on_the_engine(host: WebUIHost, units: list[dict[str, Any]], what: str, **kw: Any) -> None:
    """With `units` and the engine active: SD Unet None's image with the same units, every UNet call on the engine
    (as many as the same generation without units makes), no notice; the units have a visible effect."""
    _, _, plain_delta = generate(host, "Automatic", **kw)
    assert plain_delta["fallback_calls"] == 0, plain_delta
    _, plain_torch, _ = generate(host, "None", **kw)
    ref_out, reference, _ = generate(host, "None", **with_units(*units), **kw)
    effect, _ = compare(plain_torch, reference)
    assert effect > 10 * MAX_8BIT_DIFF, f"{what}: the units barely change the image ({effect}); nothing is tested"
    out, pixels, delta = generate(host, "Automatic", **with_units(*units), **kw)
    worst, frac = compare(reference, pixels)
    print(f"{what} on the engine vs SD Unet None: max 8-bit diff {worst}, differing {frac:.5%}; effect {effect}; "
          f"counters {delta}")
    assert controlnet_params(out) == controlnet_params(ref_out)
    assert fallback_notices(out) == [], out["info"][:800]
    assert delta["engine_calls"] == plain_delta["engine_calls"] and delta["fallback_calls"] == 0, delta
    assert worst <= MAX_8BIT_DIFF and frac <= MAX_DIFFERING_FRACTION, (what, worst, frac)


@pytest.mark.parametrize(("extra", "what"), [
    ({}, "T2I-Adapter, weight 1"),
    ({"weight": 0.5, "control_mode": "My prompt is more important"}, "T2I-Adapter, weight 0.5, prompt mode"),
    ({"control_mode": "ControlNet is more important"}, "T2I-Adapter, ControlNet mode"),
    ({"guidance_start": 0.0, "guidance_end": 0.5}, "T2I-Adapter, guidance window (first half)"),
])
def test_t2i_adapter_runs_on_the_engine(host: WebUIHost, adapter_model: str, control_engine: str,
                                        extra: dict[str, Any], what: str) -> None:
    check_units_run_on_the_engine(host, [unit("none", adapter_model, **extra)], what)


def test_two_units_run_on_the_engine(host: WebUIHost, adapter_model: str, control_engine: str) -> None:
    check_units_run_on_the_engine(host, [unit("none", adapter_model, weight=0.6),
                                         unit("none", adapter_model, weight=0.4,
                                              control_mode="My prompt is more important")], "two units")


def test_hires_fix_with_a_unit_runs_on_the_engine(host: WebUIHost, adapter_model: str, control_engine: str) -> None:
    check_units_run_on_the_engine(host, [unit("none", adapter_model)], "T2I-Adapter with hires fix",
                                  enable_hr=True, hr_scale=2, hr_second_pass_steps=2, denoising_strength=0.5,
                                  hr_upscaler="Latent")


def test_reference_only_still_runs_on_pytorch_with_a_control_engine(host: WebUIHost, control_engine: str) -> None:
    check_unit_runs_on_pytorch(host, unit("reference_only"), "reference-only (engine with ControlNet inputs)")
    check_next_generation_runs_on_the_engine(host, "a reference-only generation")
    assert host.extension_errors() == [], host.log_tail(150)
