"""The extension in the real lllyasviel's Forge (main dfdcbab), offline on CPU: the same clone as in A1111.

Runs where SDTRT_FORGE_DIR names a Forge checkout set up as docs/forge/SETUP.md says (its venv at
$SDTRT_FORGE_DIR/venv, or SDTRT_FORGE_PYTHON); skipped elsewhere. The model is a tiny random SD1 checkpoint Forge
recognises (tests/integration/tiny_forge_model.py, written once per session with Forge's Python; or
SDTRT_FORGE_MODEL names one already written). Forge starts API-only with this repository linked into its
extensions folder; an engine is built over POST /sdtrt/v1/engines (onnxruntime) and every image is compared with
SD Unet None (PyTorch) on the same Forge."""

from __future__ import annotations

import base64
import io
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from .forge_host import CHECKPOINT, STEPS, Forge, needs_forge, prepare_data, running_forge, sdtrt_errors

np = pytest.importorskip("numpy")
Image = pytest.importorskip("PIL.Image")

PROFILE = "1x64x64x75:1x64x64x75:1x128x128x75"
#: the issue's bar for "PyTorch's image": mean absolute difference in 8-bit values
MEAN_LIMIT = 2.0

pytestmark = needs_forge


@pytest.fixture(scope="module")
def forge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forge]:
    data = tmp_path_factory.mktemp("forge-data")
    with running_forge(data, prepare_data(data)) as host:
        yield host


def test_an_engine_builds_over_the_api_in_forge(forge: Forge) -> None:
    assert forge.get("/sdtrt/v1/engines") == {"engines": []}
    state = forge.build({"checkpoint": CHECKPOINT, "profiles": [PROFILE], "backend": "onnxruntime"})
    (row,) = forge.get("/sdtrt/v1/engines")["engines"]
    assert row["id"] == state["engine_id"] and row["ok"] is True, row


def test_txt2img_runs_on_the_engine_with_pytorchs_image(forge: Forge) -> None:
    reference, calls, _, _ = forge.generate("None")
    assert calls == 0
    image, calls, fallback, params = forge.generate("Automatic")
    assert (calls, fallback) == (STEPS, 0), params
    mean = float(np.abs(image - reference).mean())
    print(f"\nFIGURE forge txt2img: engine calls {calls}, mean |diff| {mean:.4f}/255, max "
          f"{int(np.abs(image - reference).max())}")
    assert mean <= MEAN_LIMIT and "TensorRT fallback" not in params
    again, calls, _, _ = forge.generate("None")  # the engine's patch is gone after its generation
    assert calls == 0 and np.array_equal(again, reference)


def test_off_grid_sizes_follow_the_engine_convention(forge: Forge) -> None:
    """Builds in Forge default to Forge's convention (upsampling to the skip's size): that engine serves 72x64 with
    PyTorch's image. An engine built with "convention": "a1111" (same checkpoint and profile: another id, both in the
    cache) runs 72x64 on PyTorch with the notice naming the option, and still serves 64x64."""
    (row,) = forge.get("/sdtrt/v1/engines")["engines"]  # the first test's build, with the default convention
    assert row["convention"] == "forge", row
    reference, _, _, _ = forge.generate("None", width=72)
    image, calls, fallback, params = forge.generate("Automatic", width=72)
    assert (calls, fallback) == (STEPS, 0), params
    mean = float(np.abs(image - reference).mean())
    print(f"\nFIGURE forge 72x64 on the Forge-convention engine: engine calls {calls}, mean |diff| {mean:.4f}/255, max "
          f"{int(np.abs(image - reference).max())}")
    assert mean <= MEAN_LIMIT and "TensorRT fallback" not in params

    state = forge.build({"checkpoint": CHECKPOINT, "profiles": [PROFILE], "backend": "onnxruntime",
                         "convention": "a1111"})
    a1111 = state["engine_id"]
    rows = {r["id"]: r["convention"] for r in forge.get("/sdtrt/v1/engines")["engines"]}
    assert rows == {row["id"]: "forge", a1111: "a1111"}, rows
    image, calls, fallback, params = forge.generate(f"[TRT] {a1111}", width=72)
    assert (calls, fallback) == (0, STEPS), params
    note = params.get("TensorRT fallback", "")
    assert "follows A1111's upsampling" in note and "build an engine with the Forge convention" in note, params
    assert np.array_equal(image, reference)
    on_grid, _, _, _ = forge.generate("None")
    image, calls, fallback, params = forge.generate(f"[TRT] {a1111}")  # 64x64: both conventions agree
    assert (calls, fallback) == (STEPS, 0), params
    assert float(np.abs(image - on_grid).mean()) <= MEAN_LIMIT


def test_hires_fix_and_img2img_run_on_the_engine(forge: Forge) -> None:
    # (Forge's API needs its own hr_additional_modules field with hires fix, or it fails on None)
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
             "denoising_strength": 0.6, "hr_additional_modules": ["Use same choices"]}
    reference, _, _, _ = forge.generate("None", **hires)
    image, calls, fallback, params = forge.generate("Automatic", **hires)
    assert fallback == 0 and calls == STEPS + 2, params
    assert float(np.abs(image - reference).mean()) <= MEAN_LIMIT
    init = base64.b64encode(_png(reference)).decode()
    i2i = {"init_images": [init], "denoising_strength": 0.6, "width": 128, "height": 128}
    reference, _, _, _ = forge.generate("None", "img2img", **i2i)
    image, calls, fallback, params = forge.generate("Automatic", "img2img", **i2i)
    assert calls > 0 and fallback == 0, params
    assert float(np.abs(image - reference).mean()) <= MEAN_LIMIT


def test_a_lora_runs_on_the_engine_with_pytorchs_image_and_later_generations_are_not_affected(forge: Forge) -> None:
    plain, _, _, _ = forge.generate("None")
    lora = {"prompt": "a photo of a cat <lora:tinylora:1>"}
    reference, _, _, _ = forge.generate("None", **lora)
    assert float(np.abs(reference - plain).mean()) > 1.0  # the LoRA changes the image
    before = forge.counters()["refits"]
    image, calls, fallback, params = forge.generate("Automatic", **lora)
    assert (calls, fallback) == (STEPS, 0), params
    assert forge.counters()["refits"] > before  # Forge's LoRA weights went into the engine by refit
    mean = float(np.abs(image - reference).mean())
    print(f"\nFIGURE forge LoRA: engine calls {calls}, mean |diff| to PyTorch+LoRA {mean:.4f}/255")
    assert mean <= MEAN_LIMIT
    half, calls, _, _ = forge.generate("Automatic", prompt="a photo of a cat <lora:tinylora:0.5>")
    assert calls == STEPS and float(np.abs(half - forge.generate("None", prompt="a photo of a cat "
                                                                  "<lora:tinylora:0.5>")[0]).mean()) <= MEAN_LIMIT
    back, calls, _, _ = forge.generate("Automatic")
    assert calls == STEPS and float(np.abs(back - plain).mean()) <= MEAN_LIMIT  # the LoRA is out of the engine
    again, _, _, _ = forge.generate("None", **lora)  # Forge still merges the LoRA after engine generations
    assert np.array_equal(again, reference)


def test_the_coverage_prediction_says_what_forge_generations_run_on(forge: Forge) -> None:
    """POST /sdtrt/v1/coverage (the status line) predicts the engine (with a LoRA too, and at 72x64 on the
    Forge-convention engine) and the A1111-convention engine's refusal of 72x64 with a Forge-convention build to fix
    it, and each generation then does what was predicted."""
    base = {"prompt": "a photo of a cat", "steps": STEPS, "width": 64, "height": 64, "sampler_name": "Euler"}
    a1111 = next(r["id"] for r in forge.get("/sdtrt/v1/engines")["engines"] if r["convention"] == "a1111")
    for unet, fields, engine in (("Automatic", {}, True), ("Automatic", {"width": 72}, True),
                                 (f"[TRT] {a1111}", {"width": 72}, False),
                                 ("Automatic", {"prompt": "a cat <lora:tinylora:1>"}, True)):
        body = {**base, **fields, "override_settings": {"sd_unet": unet}}
        status, answer = forge.call("POST", "/sdtrt/v1/coverage?kind=txt2img", body)
        assert status == 200, answer
        assert answer["engine"] is engine, (fields, answer)
        if not engine:
            assert "multiples of 64 px" in (answer["reason"] or ""), answer
            assert answer["build"]["convention"] == "forge", answer
        _, calls, _, _ = forge.generate(unet, **fields)
        assert (calls == STEPS) is engine, (fields, calls)


def test_forge_logged_no_error_of_the_extension(forge: Forge) -> None:
    assert sdtrt_errors(forge.log_text()) == []


def _png(image: Any) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image.astype("uint8")).save(out, format="PNG")
    return out.getvalue()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
