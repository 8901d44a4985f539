# ruff: noqa: F811  (the boot fixture is imported)
"""LoRA through the engine inside the fake A1111: every network type A1111's Lora supports, computed by the host's
own Lora code and refitted into the engine, against the same generation on PyTorch (where the host merges the
LoRA into the torch weights itself). Tolerance as in test_webui_a1111 (fp32 engine vs fp32 PyTorch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sdtrt.pipeline.checkpoint import read_unet_state_dict
from test_webui_a1111 import STEPS, assert_close, boot, counters, gen, svc  # noqa: F401  (boot is a fixture)

lora_files = pytest.importorskip("lora_files")
KINDS = tuple(getattr(lora_files, "KINDS", ("lora", "locon", "loha", "lokr", "ia3", "oft", "full", "norm")))


def add_lora(host: Any, name: str, checkpoint: Path, kind: str = "lora", seed: int = 0, **kw: Any) -> Path:
    path = host.data_dir / "models" / "Lora" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    return lora_files.write_lora(path, read_unet_state_dict(checkpoint), kind, seed=seed, **kw)


def run(host: Any, prompt: str, unet: str = "Automatic", **kw: Any) -> tuple[Any, dict[str, int]]:
    before = counters()
    result = gen(host, unet=unet, prompt=prompt, **kw)
    after = counters()
    return result, {k: after[k] - before[k] for k in ("engine_calls", "fallback_calls", "refits")}


@pytest.mark.parametrize("kind", KINDS)
def test_every_network_type_matches_pytorch(boot, tiny_checkpoint, kind: str) -> None:  # type: ignore[no-untyped-def]
    ckpt = tiny_checkpoint("sd1")
    host = boot(ckpt)
    add_lora(host, "net", ckpt, kind, seed=3)
    plain, _ = run(host, "a photo of a cat", unet="None")
    reference, _ = run(host, "a photo of a cat <lora:net:0.8>", unet="None")
    result, delta = run(host, "a photo of a cat <lora:net:0.8>")
    assert delta["engine_calls"] == STEPS and delta["fallback_calls"] == 0 and delta["refits"] >= 1
    assert_close(result.latents, reference.latents)
    effect = (reference.latents - plain.latents).abs().max().item()
    assert effect > 1e-2 * reference.latents.abs().max().item(), f"{kind}: LoRA effect {effect} too small to test"


def test_two_loras_and_a_b_a_and_no_needless_refit(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    ckpt = tiny_checkpoint("sd1")
    host = boot(ckpt)
    add_lora(host, "a", ckpt, "lora", seed=1)
    add_lora(host, "b", ckpt, "locon", seed=2)
    both = "a cat <lora:a:0.8> <lora:b:-0.5>"
    reference, _ = run(host, both, unet="None")
    result, delta = run(host, both)
    assert_close(result.latents, reference.latents)
    assert svc().status().active.networks == ["a:0.8", "b:-0.5"]
    again, delta = run(host, both)
    assert delta["refits"] == 0 and torch.equal(again.latents, result.latents)  # unchanged set: no refit
    first_a, _ = run(host, "a cat <lora:a:0.8>")
    run(host, "a cat <lora:b:0.8>")
    back_to_a, delta = run(host, "a cat <lora:a:0.8>")
    assert delta["refits"] == 1 and torch.equal(back_to_a.latents, first_a.latents)  # A -> B -> A: no drift
    none, _ = run(host, "a cat")
    none_ref, _ = run(host, "a cat", unet="None")
    assert_close(none.latents, none_ref.latents)  # LoRA removed: base weights again


def test_hires_pass_with_other_loras_and_checkpoint_switch(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    ckpt0, ckpt1 = tiny_checkpoint("sd1", 0), tiny_checkpoint("sd1", 1)
    host = boot(ckpt0, ckpt1, config={"sd_model_checkpoint": "sd1-s0.safetensors"})
    add_lora(host, "a", ckpt0, "lora", seed=1)
    add_lora(host, "b", ckpt0, "lora", seed=2)
    kw = {"enable_hr": True, "hr_scale": 2.0, "hr_second_pass_steps": 2, "denoising_strength": 0.5,
          "hr_prompt": "a cat <lora:b:1.0>"}
    reference, _ = run(host, "a cat <lora:a:0.8>", unet="None", **kw)
    result, delta = run(host, "a cat <lora:a:0.8>", **kw)
    assert delta["fallback_calls"] == 0 and delta["refits"] >= 2  # refitted again for the hires pass
    assert_close(result.latents, reference.latents)
    other = {"override_settings": {"sd_model_checkpoint": "sd1-s1"}}
    reference, _ = run(host, "a cat <lora:a:0.8>", unet="None", **other)
    result, delta = run(host, "a cat <lora:a:0.8>", **other)
    assert delta["engine_calls"] == STEPS and delta["fallback_calls"] == 0
    assert_close(result.latents, reference.latents)


def test_bad_loras_still_generate(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    ckpt = tiny_checkpoint("sd1")
    host = boot(ckpt)
    lora_dir = host.data_dir / "models" / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    for how in ("truncated", "wrong-family", "unknown-keys"):
        lora_files.write_broken_lora(lora_dir / f"bad-{how}.safetensors", how, read_unet_state_dict(ckpt))
        reference, _ = run(host, f"a cat <lora:bad-{how}:1>", unet="None")
        result, _ = run(host, f"a cat <lora:bad-{how}:1>")
        assert_close(result.latents, reference.latents)
