"""ONNX export: names, dynamic shapes, parity with PyTorch in ONNX Runtime, TensorRT-RTX parsing, clean state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import FAMILIES, FP16_RUNS, needs_fp16
from sdtrt.errors import ExportError
from sdtrt.pipeline.checkpoint import build_unet, open_checkpoint
from sdtrt.pipeline.export import ExportSettings, export_unet

SHAPES = [  # (batch rows, latent h, latent w, chunks): batches differ, sizes not multiples of 64 px, 75 and 150 tokens
    (1, 8, 8, 1),
    (2, 17, 25, 2),
    (4, 12, 20, 1),
]


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache: dict[tuple[str, str], tuple] = {}

    def get(family: str, dtype: str = "float32"):  # type: ignore[no-untyped-def]
        if (family, dtype) not in cache:
            ckpt, sd = open_checkpoint(tiny_checkpoint(family))
            unet = build_unet(ckpt.info, sd)
            out = tmp_path_factory.mktemp(f"onnx-{family}-{dtype}")
            result = export_unet(unet, ckpt.info.contract, out, ExportSettings(dtype=dtype), state_dict_keys=set(sd))
            cache[(family, dtype)] = (ckpt, sd, unet, result)
        return cache[(family, dtype)]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_every_initializer_is_a_state_dict_key(family: str, exported) -> None:
    ckpt, sd, _, result = exported(family)
    model = onnx.load(str(result.onnx_path))
    names = [i.name for i in model.graph.initializer]
    assert names and set(names) <= set(sd)
    assert not [n for n in names if n.startswith("onnx::")]
    # every weight that shapes the output is in the graph under its own name (nothing folded away)
    assert {k for k in sd if k.endswith(("attn2.to_k.weight", "proj_in.weight", "out.2.weight"))} <= set(names)
    assert model.opset_import[0].version >= 17


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_matches_pytorch_at_three_shapes(family: str, exported) -> None:
    import onnxruntime as ort

    ckpt, sd, unet, result = exported(family)
    spec = ckpt.info.spec
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    for n, h, w, k in SHAPES:
        x = torch.randn(n, spec.in_channels, h, w, generator=g)
        t = torch.rand(n, generator=g) * 999
        c = torch.randn(n, 77 * k, spec.context_dim, generator=g)
        feeds = {"sample": x, "timesteps": t, "encoder_hidden_states": c}
        y = None
        if spec.adm_in_channels:
            y = torch.randn(n, spec.adm_in_channels, generator=g)
            feeds["y"] = y
        with torch.no_grad():
            expected = unet(x, t, c, y=y)
        got = session.run(None, {k2: v.numpy() for k2, v in feeds.items()})[0]
        scale = expected.abs().max().item()
        assert scale > 0.5, "random weights must give a non-trivial output"
        err = np.abs(got - expected.numpy()).max()
        assert err <= 1e-4 * scale, f"{family} {n}x{h}x{w}x{k}: max |diff| {err} vs scale {scale}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", pytest.param("float16", marks=needs_fp16)])
def test_tensorrt_rtx_parses_every_graph(family: str, dtype: str, exported) -> None:
    pytest.importorskip("tensorrt_rtx")
    from sdtrt.backends.tensorrt import parse_onnx

    _, _, _, result = exported(family, dtype)
    assert parse_onnx(result.onnx_path, "tensorrt_rtx") == []


@needs_fp16
def test_fp16_graph_carries_its_precision(exported) -> None:
    _, sd, _, result = exported("sdxl-base", "float16")
    model = onnx.load(str(result.onnx_path))
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert types["sample"] == onnx.TensorProto.FLOAT16
    assert types["timesteps"] == onnx.TensorProto.FLOAT  # embedded in fp32 as A1111 does
    assert {i.data_type for i in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert any(n.op_type == "Cast" for n in model.graph.node)  # fp32 GroupNorm inside an fp16 graph


def test_skip_concats_resize_whatever_the_trace_size(exported) -> None:
    _, _, _, result = exported("sd1")
    model = onnx.load(str(result.onnx_path))
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    # one nearest-neighbour upsample per Upsample layer plus one resize in front of every skip concat
    assert len(resizes) >= 6


def test_fp16_export_without_float16_kernels_or_gpu_says_why(tiny_checkpoint, tmp_path: Path, monkeypatch) -> None:
    """torch 2.1 (A1111 1.10.1's) has no float16 CPU kernels: a float16 export traces on the GPU, and without one it
    fails up front with a message naming the ways out (not a kernel error from inside the trace)."""
    import sdtrt.pipeline.export as export

    ckpt, sd = open_checkpoint(tiny_checkpoint("sd1"))
    unet = build_unet(ckpt.info, sd)
    if FP16_RUNS:  # make this machine look like a CPU-only one with torch 2.1
        monkeypatch.setattr(export, "cpu_computes", lambda dtype: dtype == torch.float32)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExportError, match=r"cannot compute float16 on the CPU.*export float32 instead"):
        export_unet(unet, ckpt.info.contract, tmp_path / "out", ExportSettings(dtype="float16"), state_dict_keys=set(sd))
    assert not any((tmp_path / "out").glob("*.onnx"))
    assert export.trace_device(torch.float32).type == "cpu"  # float32 always traces on the CPU


class Boom(RuntimeError):
    pass


def test_failed_export_restores_global_state(tiny_checkpoint, tmp_path: Path) -> None:
    ckpt, sd = open_checkpoint(tiny_checkpoint("sd1"))
    unet = build_unet(ckpt.info, sd).train()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    entered, exited = [], []

    import contextlib

    @contextlib.contextmanager
    def host_hook():  # type: ignore[no-untyped-def]
        entered.append(True)
        try:
            yield
        finally:
            exited.append(True)

    def broken_forward(*a, **k):  # type: ignore[no-untyped-def]
        assert torch.nn.functional.scaled_dot_product_attention is not sdpa  # swapped while tracing
        raise Boom("injected failure")

    unet.forward = broken_forward  # type: ignore[method-assign]
    with pytest.raises(ExportError, match="injected failure"):
        export_unet(unet, ckpt.info.contract, tmp_path / "out", ExportSettings(dtype="float16" if FP16_RUNS else "float32"),
                    hooks=[host_hook])
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    assert entered and exited
    assert unet.training
    after = unet.state_dict()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    assert not any((tmp_path / "out").glob("*.onnx"))


def test_export_settings_are_validated() -> None:
    with pytest.raises(ExportError, match="opset 13"):
        ExportSettings(opset=13)
    with pytest.raises(ExportError, match="bfloat"):
        ExportSettings(dtype="bfloat8")


def test_large_models_use_one_external_data_file(tiny_checkpoint, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the threshold (2 GB for real models; lowered here) weights go to one `unet.onnx.data` file that
    ONNX Runtime and the TensorRT-RTX parser both find."""
    import onnxruntime as ort

    import sdtrt.pipeline.export as export

    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", 0)
    ckpt, sd = open_checkpoint(tiny_checkpoint("sd1"))
    unet = build_unet(ckpt.info, sd)
    result = export_unet(unet, ckpt.info.contract, tmp_path, ExportSettings(), state_dict_keys=set(sd))
    data = tmp_path / "unet.onnx.data"
    assert result.external_data and data.is_file()
    assert data.stat().st_size > 4 * sum(v.numel() for v in sd.values()) * 0.9
    assert result.onnx_path.stat().st_size < data.stat().st_size / 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data", "weights.json"]
    x, t, c = torch.randn(2, 4, 9, 13), torch.tensor([1.0, 900.0]), torch.randn(2, 77, 768)
    got = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"sample": x.numpy(), "timesteps": t.numpy(), "encoder_hidden_states": c.numpy()})[0]
    with torch.no_grad():
        expected = unet(x, t, c).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    if pytest.importorskip("tensorrt_rtx"):
        from sdtrt.backends.tensorrt import parse_onnx

        assert parse_onnx(result.onnx_path, "tensorrt_rtx") == []
