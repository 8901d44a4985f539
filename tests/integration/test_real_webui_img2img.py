"""img2img and inpainting served by engines in the real A1111 1.10.1 (API only, CPU, ONNX Runtime backend).

Two tiny SD1 models in one checkpoint folder: the session's "sd1" model (4-channel UNet) and an inpainting model
(tiny_webui_model.py "sd1-inpaint": a 9-channel UNet, 4 latent + 4 masked-image latent + 1 mask channels, in an LDM
LatentInpaintDiffusion with conditioning_key hybrid, as A1111's v1-inpainting-inference.yaml has it). One server,
started on the plain model; the inpainting requests switch to the inpainting model with `override_settings`
(A1111 loads it for the request and the plain one back after it). Each model gets its engine over
POST /sdtrt/v1/engines; the inpainting model's is of family "sd1-inpaint" and takes the 9-channel input.

Every image is compared with SD Unet "None" (PyTorch) for the same request, with test_real_webui_sdtrt's tolerance,
and every UNet call must run on the engine: with Euler, an img2img of `steps` steps at denoising strength s makes
int(s * steps) + 1 UNet calls (A1111's setup_img2img_steps: t_enc = int(s * steps), then t_enc + 1 sigma steps),
each with cond and uncond batched.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .a1111_host import A1111Install, WebUIHost, encode_png, gradient_png, png_pixels, write_tiny_model
from .test_real_webui_sdtrt import MAX_8BIT_DIFF, PROFILE, compare, sdtrt_config
from .test_real_webui_sdxl import assert_same_image, build_engine, request_with_counters

pytestmark = pytest.mark.integration

PLAIN, INPAINT = "tiny-sd1", "tiny-sd1-inpaint"
SIZE = 64
STEPS = 5
PROMPT = "a photo of a cat"
INIT_IMAGE = base64.b64encode(gradient_png(SIZE, SIZE)).decode()
#: The region to repaint: a 32x32 square in the middle (white), the rest kept (black).
MASK_BOX = (16, 16, 48, 48)


def mask_png(size: int = SIZE, box: tuple[int, int, int, int] = MASK_BOX) -> bytes:
    x0, y0, x1, y1 = box
    return encode_png(size, size, bytes(255 if x0 <= x < x1 and y0 <= y < y1 else 0
                                        for y in range(size) for x in range(size)), channels=1)


def expected_calls(strength: float, steps: int = STEPS) -> int:
    """UNet calls of an Euler img2img (see the module docstring)."""
    return int(min(strength, 0.999) * steps) + 1


def img2img(strength: float, checkpoint: str | None = None, **extra: Any) -> dict[str, Any]:
    body = {"prompt": PROMPT, "negative_prompt": "blurry", "init_images": [INIT_IMAGE], "width": SIZE,
            "height": SIZE, "steps": STEPS, "denoising_strength": strength, "resize_mode": 0, **extra}
    if checkpoint is not None:
        body["override_settings"] = {"sd_model_checkpoint": checkpoint}
    return body


@pytest.fixture(scope="module")
def checkpoints(a1111_install: A1111Install, tiny_webui_checkpoint: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the session's tiny SD1 model (linked, with its yaml) and the tiny inpainting model."""
    folder = tmp_path_factory.mktemp("a1111-models-img2img")
    for suffix in (".safetensors", ".yaml"):
        (folder / f"{PLAIN}{suffix}").symlink_to(tiny_webui_checkpoint.with_suffix(suffix))
    write_tiny_model(a1111_install, folder, stem=INPAINT, unet="sd1-inpaint")
    return folder


@pytest.fixture(scope="module")
def host(checkpoints: Path, webui_factory: Callable[..., WebUIHost],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebUIHost]:
    h = webui_factory(checkpoint=checkpoints / f"{PLAIN}.safetensors",
                      config=sdtrt_config(tmp_path_factory.mktemp("sdtrt-cache-img2img")))
    yield h
    h.stop()


@pytest.fixture(scope="module")
def engines(host: WebUIHost) -> dict[str, str]:
    rows = {stem: build_engine(host, stem, PROFILE) for stem in (PLAIN, INPAINT)}
    assert rows[PLAIN]["family"] == "sd1", rows[PLAIN]
    assert rows[INPAINT]["family"] == "sd1-inpaint", rows[INPAINT]  # the 9-channel UNet, detected by its weights
    return {stem: str(row["id"]) for stem, row in rows.items()}


def check_on_the_engine(host: WebUIHost, body: dict[str, Any], engine_id: str, calls: int, what: str) -> bytes:
    """Run `body` with SD Unet None and Automatic: the same image, every call on `engine_id`; the image."""
    _, reference, ref_delta = request_with_counters(host, "img2img", body, "None")
    assert ref_delta["engine_calls"] == 0 and ref_delta["fallback_calls"] == 0, ref_delta
    assert len(set(reference)) > 8, "constant image"
    out, pixels, delta = request_with_counters(host, "img2img", body, "Automatic")
    print(f"{what}: {delta} (PyTorch {ref_delta['seconds']}s)")
    assert delta["engine_calls"] == calls, delta
    assert delta["fallback_calls"] == 0 and delta["fallback_reasons"] == {}, delta
    status = host.get("/sdtrt/v1/status")
    assert status["active"]["engines"] == [engine_id], status["active"]
    assert status["counters"]["last_error"] is None, status["counters"]
    assert "some UNet calls ran on PyTorch" not in out["info"]
    assert_same_image(reference, pixels, what)
    return pixels


# ---- tests ----------------------------------------------------------------------------------------------------------
def test_img2img_runs_every_step_on_the_engine_and_matches_pytorch(host: WebUIHost, engines: dict[str, str]) -> None:
    strength = 0.6
    pixels = check_on_the_engine(host, img2img(strength), engines[PLAIN], expected_calls(strength),
                                 f"img2img, denoising {strength}")
    init = png_pixels(gradient_png(SIZE, SIZE))[3]
    assert compare(init, pixels)[0] > 10 * MAX_8BIT_DIFF, "img2img returned its init image"


@pytest.mark.parametrize("checkpoint", [INPAINT, PLAIN], ids=["inpainting-model", "plain-model"])
def test_inpainting_with_a_mask_runs_on_the_engine_and_matches_pytorch(host: WebUIHost, engines: dict[str, str],
                                                                       checkpoint: str) -> None:
    """The inpainting model gets the masked image and the mask as UNet input channels (its engine must take them);
    a plain model inpaints by blending latents between steps. Outside the mask (and its blur) A1111 pastes the init
    image back, inside it repaints."""
    strength = 0.8
    body = img2img(strength, checkpoint, mask=base64.b64encode(mask_png()).decode(), mask_blur=2,
                   inpainting_fill=1, inpaint_full_res=False, inpainting_mask_invert=0)
    pixels = check_on_the_engine(host, body, engines[checkpoint], expected_calls(strength),
                                 f"inpainting with {checkpoint}, denoising {strength}")
    init = png_pixels(gradient_png(SIZE, SIZE))[3]
    x0, y0, x1, y1 = MASK_BOX

    def region(px: bytes, inside: bool) -> bytes:
        m = 6  # beyond the mask's blur (mask_blur 2: a Gaussian kernel of 11 px)
        keep = (lambda x, y: x0 + m <= x < x1 - m and y0 + m <= y < y1 - m) if inside else \
               (lambda x, y: not (x0 - m <= x < x1 + m and y0 - m <= y < y1 + m))
        return bytes(px[(y * SIZE + x) * 3 + c] for y in range(SIZE) for x in range(SIZE) if keep(x, y)
                     for c in range(3))

    assert compare(region(init, True), region(pixels, True))[0] > 10 * MAX_8BIT_DIFF, "nothing repainted"
    assert region(init, False) == region(pixels, False), "repainted outside the mask"
    # the request's checkpoint is undone after it, and the plain model's engine serves the next generation again
    assert host.get("/sdapi/v1/options")["sd_model_checkpoint"].startswith(PLAIN)
    if checkpoint != PLAIN:
        strength = 0.6
        _, _, delta = request_with_counters(host, "img2img", img2img(strength), "Automatic")
        assert delta["engine_calls"] == expected_calls(strength) and delta["fallback_calls"] == 0, delta
        assert host.get("/sdtrt/v1/status")["active"]["engines"] == [engines[PLAIN]]
    assert host.extension_errors() == [], host.log_tail(150)
