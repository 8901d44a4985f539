"""Forge's built-in ControlNet through the engine in the real lllyasviel's Forge (main dfdcbab) and the real Forge Neo
(v3.5, docs/forge/NEO_SETUP.md), offline on CPU (each where SDTRT_FORGE_DIR / SDTRT_NEO_DIR names it).

A random ControlNet for the tiny SD1 checkpoint is written with Forge's own ControlNet class
(tests/integration/tiny_forge_controlnet.py; Forge's ControlNetPatcher loads it from models/ControlNet). An engine
with ControlNet inputs is built over POST /sdtrt/v1/engines; then txt2img with a ControlNet unit (preprocessor None,
a gradient as hint) at weight 1 and at 0.5 over the first half of the steps gives PyTorch's image (SD Unet None on
the same Forge) with every UNet call on the engine, and the unit's effect is really there (the image differs from
the one without it). Reference-only (which patches the UNet's inside) runs on PyTorch with the notice."""

from __future__ import annotations

import base64
import io
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from .forge_host import CHECKPOINT, FORGE, NEO, ROOT, STEPS, Forge, HostSpec, prepare_data, running_forge, sdtrt_errors

np = pytest.importorskip("numpy")
Image = pytest.importorskip("PIL.Image")

PROFILE = "1x64x64x75:1x64x64x75:1x128x128x75"
MEAN_LIMIT = 2.0
CONTROLNET = "tiny-forge-controlnet"

HOSTS = [pytest.param(spec, id=spec.name.replace(" ", "-").lower(), marks=pytest.mark.skipif(
    not spec.dir, reason=f"{spec.dir_env} is not set ({spec.name} set up as docs/forge/ says)")) for spec in (FORGE, NEO)]


@pytest.fixture(scope="module", params=HOSTS)
def forge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forge]:
    """lllyasviel's Forge, then Forge Neo (each where its folder is given), with the tiny ControlNet."""
    spec: HostSpec = request.param
    data = tmp_path_factory.mktemp("forge-cn-data")
    model = prepare_data(data, spec)
    out = data / "models" / "ControlNet" / f"{CONTROLNET}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([spec.python(), str(ROOT / "tests" / "integration" / "tiny_forge_controlnet.py"), str(model),
                    str(out), f"--cpu-flag={spec.cpu_flag}"], cwd=spec.dir, check=True, timeout=600,
                   capture_output=True)
    with running_forge(data, model, host=spec) as host:
        yield host


def hint_png() -> str:
    yy, xx = np.mgrid[0:64, 0:64]
    image = np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).clip(0, 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def controlnet_name(forge: Forge) -> str:
    names = forge.get("/controlnet/model_list")["model_list"]
    return next(n for n in names if n.startswith(CONTROLNET))


def with_unit(**unit: Any) -> dict[str, Any]:
    return {"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True, "image": hint_png(), "weight": 1.0,
                                                          "resize_mode": "Just Resize", **unit}]}}}


def predict(forge: Forge, fields: dict[str, Any]) -> dict[str, Any]:
    """POST /sdtrt/v1/coverage (the status line's question) for a 64x64 txt2img with these fields."""
    body = {"prompt": "a photo of a cat", "steps": STEPS, "width": 64, "height": 64, "sampler_name": "Euler",
            "override_settings": {"sd_unet": "Automatic"}, **fields}
    status, answer = forge.call("POST", "/sdtrt/v1/coverage?kind=txt2img", body)
    assert status == 200, answer
    return dict(answer)


def test_an_engine_with_controlnet_inputs_builds_over_the_api(forge: Forge) -> None:
    state = forge.build({"checkpoint": CHECKPOINT, "profiles": [PROFILE], "backend": "onnxruntime",
                         "controlnet": True})
    (row,) = forge.get("/sdtrt/v1/engines")["engines"]
    assert row["id"] == state["engine_id"] and row["ok"] is True, row


@pytest.mark.parametrize("unit", [{"weight": 1.0}, {"weight": 0.5, "guidance_end": 0.5}],
                         ids=["weight-1", "half-weight-first-half"])
def test_a_forge_controlnet_unit_runs_on_the_engine_with_pytorchs_image(forge: Forge, unit: dict[str, Any]) -> None:
    fields = with_unit(module="None", model=controlnet_name(forge), **unit)
    plain, _, _, _ = forge.generate("None")
    reference, calls, _, _ = forge.generate("None", **fields)
    assert calls == 0
    effect = float(np.abs(reference - plain).mean())
    assert effect > 1.0, f"the ControlNet changes the image by only {effect}/255"
    assert predict(forge, fields)["engine"] is True
    image, calls, fallback, params = forge.generate("Automatic", **fields)
    assert (calls, fallback) == (STEPS, 0), params
    mean = float(np.abs(image - reference).mean())
    print(f"\nFIGURE forge ControlNet {unit}: engine calls {calls}, mean |diff| {mean:.4f}/255 (max "
          f"{int(np.abs(image - reference).max())}); the unit's effect {effect:.2f}/255")
    assert mean <= MEAN_LIMIT and "TensorRT fallback" not in params
    back, calls, _, _ = forge.generate("Automatic")  # the unit leaves with its generation
    assert calls == STEPS and float(np.abs(back - plain).mean()) <= MEAN_LIMIT


def test_reference_only_runs_on_pytorch_with_the_notice(forge: Forge) -> None:
    fields = with_unit(module="reference_only", model="None")
    reference, _, _, _ = forge.generate("None", **fields)
    predicted = predict(forge, fields)
    assert predicted["engine"] is False and "changes the UNet's inside" in (predicted["reason"] or ""), predicted
    image, calls, fallback, params = forge.generate("Automatic", **fields)
    # (Forge's reference-only runs the UNet on the reference too: a second call per step, also on PyTorch)
    assert calls == 0 and fallback >= STEPS, params
    assert "patches the UNet's inside" in params.get("TensorRT fallback", ""), params
    assert np.array_equal(image, reference)


def test_forge_logged_no_error_of_the_extension(forge: Forge) -> None:
    assert sdtrt_errors(forge.log_text()) == []
