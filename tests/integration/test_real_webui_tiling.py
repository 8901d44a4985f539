"""Tiling (`tiling: true`) with an engine active, in the real A1111 1.10.1.

A1111 implements tiling by switching every Conv2d of the model to circular padding for the generation
(`model_hijack.apply_circular`). An engine is the UNet as exported, with zero padding, so an engine serving a
tiling generation computes another image (26-31/255 mean difference). A tiling generation must give
PyTorch's tiling image: here the extension runs it on PyTorch and says so in the response; the next generation
without tiling (A1111 switches the padding back) runs on the engine again. Tolerance and counters as in
test_real_webui_sdtrt.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from .a1111_host import WebUIHost
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

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def host(webui_factory: Callable[..., WebUIHost], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebUIHost]:
    h = webui_factory(config=sdtrt_config(tmp_path_factory.mktemp("sdtrt-cache-tiling")))
    status, answer = h.request("POST", "/sdtrt/v1/engines", {
        "checkpoint": h.checkpoint.stem, "profiles": [PROFILE], "backend": "onnxruntime"})  # type: ignore[union-attr]
    assert status == 202, answer
    job = wait_job(h, answer["job_id"])
    assert job["state"] == "done", job
    yield h
    h.stop()


def test_tiling_with_the_engine_active_gives_pytorchs_tiling_image_and_says_so(host: WebUIHost) -> None:
    _, plain, _ = generate(host, "None")
    ref_out, reference, ref_delta = generate(host, "None", tiling=True)
    assert ref_delta["engine_calls"] == 0 and ref_delta["fallback_calls"] == 0, ref_delta
    assert "Tiling: True" in json.loads(ref_out["info"])["infotexts"][0]
    effect, _ = compare(plain, reference)
    assert effect > 10 * MAX_8BIT_DIFF, f"tiling barely changes the image ({effect}); nothing is tested"

    out, pixels, delta = generate(host, "Automatic", tiling=True)
    worst, frac = compare(reference, pixels)
    notices = fallback_notices(out)
    print(f"tiling, engine active vs SD Unet None: max 8-bit diff {worst}, differing values {frac:.5%}; "
          f"tiling vs plain: max diff {effect}; counters {delta}; notices {notices}")
    assert worst <= MAX_8BIT_DIFF and frac <= MAX_DIFFERING_FRACTION, (worst, frac)
    assert "Tiling: True" in json.loads(out["info"])["infotexts"][0]
    # every UNet call of the generation ran on PyTorch, none on the (zero-padding) engine, and the response says why
    assert delta["engine_calls"] == 0, delta
    assert delta["fallback_calls"] == STEPS, delta
    assert len(notices) == 1 and "tiling" in notices[0].lower(), notices
    assert [r for r in delta["fallback_reasons"] if "tiling" in r.lower()], delta
    assert counters(host)["last_error"] is None  # a fallback is not an error


def test_the_next_generation_without_tiling_runs_every_step_on_the_engine(host: WebUIHost) -> None:
    _, reference, _ = generate(host, "None")
    generate(host, "Automatic", tiling=True)
    out, pixels, delta = generate(host, "Automatic")
    worst, frac = compare(reference, pixels)
    print(f"after a tiling generation: engine vs PyTorch max 8-bit diff {worst}, differing {frac:.5%}; {delta}")
    assert delta["engine_calls"] == STEPS, delta
    assert delta["fallback_calls"] == 0 and delta["fallback_reasons"] == {}, delta
    assert fallback_notices(out) == [], out["info"][:500]
    assert "Tiling" not in json.loads(out["info"])["infotexts"][0]
    assert worst <= MAX_8BIT_DIFF and frac <= MAX_DIFFERING_FRACTION, (worst, frac)
    # and tiling again after that: PyTorch again (the check is made per generation, not once)
    out, _, delta = generate(host, "Automatic", tiling=True)
    assert delta["engine_calls"] == 0 and len(fallback_notices(out)) == 1, delta
    assert host.extension_errors() == [], host.log_tail(150)
