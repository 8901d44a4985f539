"""`python -m sdtrt bench latency` runs on a CPU with the tiny model and reports what a user compares (timings are
reported, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from sdtrt.tools.cli import main


def test_latency_bench_json_and_chart(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    chart = tmp_path / "latency.png"
    code = main(["bench", "latency", "--model", "tiny", "--batch", "1", "--batch", "2", "--repeats", "3",
                 "--backend", "onnxruntime", "--device", "cpu", "--chart", str(chart), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["latency"]
    assert [(r["model"], r["batch"]) for r in rows] == [("tiny", 1), ("tiny", 2)]
    for r in rows:
        assert r["ratio"] > 0 and r["engine"]["median_ms"] > 0 and r["torch"]["median_ms"] > 0
        assert abs(r["ratio"] - r["engine"]["median_ms"] / r["torch"]["median_ms"]) < 1e-9
        assert r["engine"]["p10_ms"] <= r["engine"]["median_ms"] <= r["engine"]["p90_ms"]
        assert 0 < r["host_overhead_ms"] < r["engine"]["median_ms"]
        assert r["build_s"] > 0 and r["refit_s"] > 0 and r["backend"] == "onnxruntime"
        assert r["engine_no_graphs"] is None and r["cuda_graphs"] == {}  # graphs exist on GPU backends only
    cn = data["controlnet"]
    assert [(r["model"], r["batch"]) for r in cn] == [("tiny", 1)]
    for r in cn:
        assert abs(r["ratio"] - r["engine"]["median_ms"] / r["torch"]["median_ms"]) < 1e-9
        assert abs(r["plain_call_cost"] - r["control_engine_plain_call"]["median_ms"]
                   / r["plain_engine"]["median_ms"]) < 1e-9
        assert r["plain_engine"]["median_ms"] > 0 and r["backend"] == "onnxruntime"
    with Image.open(chart) as img:
        assert img.size[0] == 900 and img.size[1] > 100


def test_unknown_model_is_an_error(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "latency", "--model", "sd9", "--device", "cpu"]) == 1
    assert "unknown model" in capsys.readouterr().err


def test_attention_swap_reaches_the_unet_and_is_undone() -> None:
    """The xformers row swaps the UNet's attention the way this helper does: prove the swap is really used (same
    numbers through a math attention, every attention layer called) and undone afterwards."""
    import torch

    from sdtrt.models.torch_unet import UNetModel
    from sdtrt.tools.bench import LATENCY_MODELS, _with_attention
    from sdtrt.tools.tiny import randomize_

    spec, _ = LATENCY_MODELS["tiny"]
    unet = UNetModel(spec).eval()
    randomize_(unet, seed=0)
    x, t, c = torch.randn(2, 4, 8, 8), torch.full((2,), 500.0), torch.randn(2, 77, spec.context_dim)
    calls = []

    def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a: object, **k2: object) -> torch.Tensor:
        calls.append(q.shape)
        w = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return w @ v

    original = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        want = unet(x, t, c)
        got = _with_attention(lambda: unet(x, t, c), math_attention)()
    assert calls and torch.nn.functional.scaled_dot_product_attention is original
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert want.abs().max() > 0
