"""LoRA through the engine in the real A1111 1.10.1: its built-in Lora computes the weight updates (every
network type below, with A1111's own code), the extension refits them into the engine, and the image matches the
same request with SD Unet None (where A1111 merges the LoRA into the torch weights itself). Tolerance as in
test_real_webui_sdtrt (fp32 engine vs fp32 torch, 8-bit rounding)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from sdtrt.pipeline.checkpoint import read_unet_state_dict

from .a1111_host import WebUIHost
from .test_real_webui_sdtrt import (
    MAX_8BIT_DIFF,
    MAX_DIFFERING_FRACTION,
    PROFILE,
    compare,
    counters,
    generate,
    sdtrt_config,
    wait_job,
)

pytestmark = pytest.mark.integration
lora_files = pytest.importorskip("lora_files")
KINDS = ("lora", "locon", "loha", "lokr", "ia3", "oft", "full", "norm")


@pytest.fixture(scope="module")
def host(webui_factory: Callable[..., WebUIHost], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebUIHost]:
    h = webui_factory(config=sdtrt_config(tmp_path_factory.mktemp("sdtrt-cache")))
    status, answer = h.request("POST", "/sdtrt/v1/engines", {
        "checkpoint": h.checkpoint.stem, "profiles": [PROFILE], "backend": "onnxruntime"})  # type: ignore[union-attr]
    assert status == 202, answer
    assert wait_job(h, answer["job_id"])["state"] == "done"
    yield h
    h.stop()


def add_lora(host: WebUIHost, name: str, kind: str, seed: int) -> None:
    lora_dir = host.data_dir / "models" / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    sd = read_unet_state_dict(host.checkpoint)  # type: ignore[arg-type]
    lora_files.write_lora(lora_dir / f"{name}.safetensors", sd, kind, seed=seed)
    status, answer = host.request("POST", "/sdapi/v1/refresh-loras")
    assert status == 200, answer


@pytest.mark.parametrize("kind", KINDS)
def test_lora_kind_through_the_engine_matches_pytorch(host: WebUIHost, kind: str) -> None:
    add_lora(host, f"net-{kind}", kind, seed=KINDS.index(kind) + 1)
    prompt = {"prompt": f"a photo of a cat <lora:net-{kind}:0.8>"}
    _, plain, _ = generate(host, "None")
    _, reference, _ = generate(host, "None", **prompt)
    out, pixels, delta = generate(host, "Automatic", **prompt)
    assert delta["engine_calls"] > 0 and delta["fallback_calls"] == 0, (delta, counters(host)["last_error"])
    assert delta["refits"] >= 1, delta
    assert "Lora hashes" in out["info"], out["info"][:300]
    worst, frac = compare(reference, pixels)
    assert worst <= MAX_8BIT_DIFF and frac <= MAX_DIFFERING_FRACTION, (kind, worst, frac)
    effect, _ = compare(plain, reference)
    assert effect > 10 * MAX_8BIT_DIFF, f"{kind}: the LoRA barely changes the image ({effect}); nothing is tested"
    _, _, again = generate(host, "Automatic", **prompt)
    assert again["refits"] == 0, again  # unchanged set: no refit


def test_a_b_a_gives_a_again(host: WebUIHost) -> None:
    add_lora(host, "aba-a", "lora", seed=11)
    add_lora(host, "aba-b", "lora", seed=12)
    _, first, _ = generate(host, "Automatic", prompt="a cat <lora:aba-a:0.8>")
    generate(host, "Automatic", prompt="a cat <lora:aba-b:-0.5> <lora:aba-a:0.3>")
    _, again, delta = generate(host, "Automatic", prompt="a cat <lora:aba-a:0.8>")
    assert delta["refits"] == 1 and again == first
