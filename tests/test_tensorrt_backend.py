"""TensorRT / TensorRT-RTX backend: ONNX parsing (no GPU needed with TensorRT-RTX), availability probes, the mypy
check against tensorrt-stubs, and GPU-only build / run / refit tests compared with ONNX Runtime.

Also a script: ``python tests/test_tensorrt_backend.py --write-stubs build/typings`` writes the parsable copy of
tensorrt-stubs that mypy.ini expects (see there why).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

_EXTENSION = Path(__file__).resolve().parents[1] / "extension"
if str(_EXTENSION) not in sys.path:
    sys.path.insert(0, str(_EXTENSION))

REPO = _EXTENSION.parent


# ---------------------------------------------------------------------------------------------------------------------
# tensorrt-stubs repair (used by the mypy test and by CI through __main__).


def _stub_sources() -> list[Path] | None:
    """The installed stub packages `tensorrt` and `tensorrt_bindings` (folders holding .pyi files), or None."""
    if importlib.util.find_spec("tensorrt_stubs") is None:
        return None
    folders = []
    for name in ("tensorrt", "tensorrt_bindings"):
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec else []
        found = [Path(p) for p in locations if (Path(p) / "__init__.pyi").is_file()]
        if not found:
            return None
        folders.append(found[0])
    return folders


def write_fixed_stubs(dest: Path) -> Path | None:
    """Copy tensorrt-stubs' .pyi files into `dest`, repaired so that they parse: parameters named `in` (a keyword)
    are renamed, and a parameter without default after defaulted ones gets `= ...`. Returns `dest`, or None when the
    stubs are missing or still do not parse (a newer stub release with other defects)."""
    import ast

    sources = _stub_sources()
    if sources is None:
        return None
    for folder in sources:
        target = dest / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for pyi in folder.glob("*.pyi"):
            text = pyi.read_text(encoding="utf-8")
            text = re.sub(r"(?<=[(,] )in: ", "in_: ", text)
            text = re.sub(r"(?<=\(self, )in: ", "in_: ", text)
            text = re.sub(r"^(\s*def [^\n]*)$", _default_after_default, text, flags=re.MULTILINE)
            try:
                ast.parse(text, filename=str(pyi))
            except SyntaxError:
                return None
            (target / pyi.name).write_text(text, encoding="utf-8")
    return dest


def _default_after_default(match: re.Match[str]) -> str:
    """On one `def` line: `a: T = x, b: U)` -> `a: T = x, b: U = ...)`."""
    line = match.group(1)
    head, sep, rest = line.partition("(")
    if not sep or ") ->" not in rest:
        return line
    params, arrow, tail = rest.rpartition(") ->")
    parts = params.split(", ")
    seen_default = False
    for i, part in enumerate(parts):
        if "=" in part:
            seen_default = True
        elif seen_default and ":" in part and not part.startswith("*"):
            parts[i] = part + " = ..."
    return f"{head}({', '.join(parts)}{arrow}{tail}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write-stubs":
        out = write_fixed_stubs(Path(sys.argv[2]))
        sys.exit(0 if out else "tensorrt-stubs missing, or they do not parse even after repair")
    sys.exit("usage: python tests/test_tensorrt_backend.py --write-stubs DIR")


# ---------------------------------------------------------------------------------------------------------------------
# Tests.

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
import torch

from conftest import FP16_RUNS
from sdtrt.backends import AUTO_ORDER, BACKENDS, CHOICES, backend_class, get_backend
from sdtrt.backends.base import Backend, BuildOptions
from sdtrt.backends.tensorrt import PLAN_FILE, TORCH_DTYPES, TensorRTBackend, TensorRTRTXBackend, parse_onnx
from sdtrt.errors import BackendUnavailable, BuildError, RefitError, RefitRejected, UnknownWeights
from sdtrt.pipeline.export import torchscript_exporter
from sdtrt.profiles import TensorRange


def _real_module(name: str) -> bool:
    """Importable and not just a stub namespace (tensorrt-stubs leaves an importable empty `tensorrt`)."""
    try:
        return hasattr(importlib.import_module(name), "Builder")
    except Exception:  # noqa: BLE001
        return False


HAS_RTX = _real_module("tensorrt_rtx")
HAS_TRT = _real_module("tensorrt")
HAS_CUDA = torch.cuda.is_available()
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu12)")
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

INPUTS = ("sample", "encoder_hidden_states")
OUTPUT = "latent"


class TinyUNet(torch.nn.Module):
    """Conv + GroupNorm + Linear + attention-like matmul/softmax: the op mix of an SD UNet block, tiny."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.to_q = torch.nn.Linear(8, 16)
        self.to_k = torch.nn.Linear(12, 16)
        self.to_v = torch.nn.Linear(12, 8)
        self.out = torch.nn.Conv2d(8, 4, 1)

    def forward(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(sample))
        b, c, hh, ww = h.shape
        q = self.to_q(h.flatten(2).transpose(1, 2))
        k = self.to_k(encoder_hidden_states)
        v = self.to_v(encoder_hidden_states)
        attn = torch.softmax(q @ k.transpose(1, 2) * 0.25, dim=-1)
        h = h + (attn @ v).transpose(1, 2).reshape(b, c, hh, ww)
        return self.out(h)


def export_tiny(path: Path, dtype: torch.dtype, model: TinyUNet | None = None) -> TinyUNet:
    """Export with names kept (no constant folding), dynamic batch/size/tokens; fp16 exports carry fp16 weights."""
    model = (model or TinyUNet()).eval().to(dtype)
    args = (torch.randn(1, 4, 8, 8, dtype=dtype), torch.randn(1, 6, 12, dtype=dtype))
    torch.onnx.export(
        model,
        args,
        str(path),
        **torchscript_exporter(),  # `dynamo=False` where torch has the choice (not torch 2.1, A1111's)
        opset_version=17,
        do_constant_folding=False,
        input_names=list(INPUTS),
        output_names=[OUTPUT],
        dynamic_axes={
            INPUTS[0]: {0: "n", 2: "h", 3: "w"},
            INPUTS[1]: {0: "n", 1: "t"},
            OUTPUT: {0: "n", 2: "h", 3: "w"},
        },
    )
    return model


@pytest.fixture(scope="module", params=[torch.float32, torch.float16], ids=["fp32", "fp16"])
def tiny_onnx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == torch.float16 and not FP16_RUNS:
        pytest.skip("this torch cannot trace float16 on the CPU (torch 2.1, A1111's) and there is no GPU")
    path = tmp_path_factory.mktemp("onnx") / f"tiny-{str(request.param).split('.')[-1]}.onnx"
    torch.manual_seed(0)
    export_tiny(path, request.param)
    return path


# --- (a) parsing ------------------------------------------------------------------------------------------------------


@needs_rtx
def test_parse_tiny_unet(tiny_onnx: Path) -> None:
    assert parse_onnx(tiny_onnx) == []


@needs_rtx
def test_parse_unknown_op_names_the_op(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example.sdtrt")
    graph = helper.make_graph(
        [node],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example.sdtrt", 1)]
    )
    path = tmp_path / "unknown-op.onnx"
    onnx.save(model, str(path))
    errors = parse_onnx(path)
    assert errors and any("Frobnicate" in e for e in errors), errors


@needs_rtx
def test_parse_truncated_file(tmp_path: Path, tiny_onnx: Path) -> None:
    data = tiny_onnx.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    errors = parse_onnx(path)
    assert errors and any("parse" in e.lower() for e in errors), errors


@needs_rtx
def test_parse_missing_file(tmp_path: Path) -> None:
    errors = parse_onnx(tmp_path / "nowhere.onnx")
    assert errors and any("nowhere.onnx" in e for e in errors), errors


def test_parse_without_library_raises_unavailable(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="pip install"):
        parse_onnx(tmp_path / "x.onnx", module_name="sdtrt_no_such_tensorrt")


# --- (b) probing, registry, no work at import ------------------------------------------------------------------------


def test_one_table_names_every_backend_and_the_choices_derive_from_it() -> None:
    from sdtrt.webui.host import BACKEND_CHOICES

    assert backend_class("tensorrt") is TensorRTBackend
    assert backend_class("tensorrt-rtx") is TensorRTRTXBackend
    assert all(issubclass(c, Backend) for c in (TensorRTBackend, TensorRTRTXBackend))
    assert AUTO_ORDER == tuple(BACKENDS) == ("tensorrt", "tensorrt-rtx", "onnxruntime")
    assert BACKEND_CHOICES == CHOICES == ("auto", *AUTO_ORDER)
    assert all(backend_class(name).name == name for name in BACKENDS)
    with pytest.raises(BackendUnavailable, match="choose one of: auto, tensorrt, tensorrt-rtx, onnxruntime"):
        backend_class("tensorrt-llm")


def test_capabilities_are_declared_on_the_classes() -> None:
    """Callers ask the class (pipeline.supports_stripping) or the runner (refit_is_atomic), never the name."""
    from sdtrt.backends.ort import OrtBackend, OrtRunner
    from sdtrt.backends.tensorrt.runner import TensorRTRunner
    from sdtrt.pipeline.build import supports_stripping

    for cls in (TensorRTBackend, TensorRTRTXBackend):
        caps = cls.capabilities
        assert caps.devices == ("cuda",) and caps.strips_weights and caps.refit and caps.cuda_graphs
        assert not caps.atomic_refit and caps.atomic_refit == TensorRTRunner.refit_is_atomic
        assert supports_stripping(cls())
    caps = OrtBackend.capabilities
    assert caps.refit and caps.atomic_refit and not caps.strips_weights and not caps.cuda_graphs
    assert caps.atomic_refit == OrtRunner.refit_is_atomic
    assert not supports_stripping(OrtBackend())


def test_unknown_weight_names_raise_one_error_type(tmp_path: Path) -> None:
    """ONNX Runtime here; TensorRT in test_build_run_refit_matches_onnxruntime (GPU). Both raise UnknownWeights, a
    RefitRejected: the engine still holds its previous weights."""
    import onnx
    from onnx import TensorProto, helper

    from sdtrt.backends.ort import OrtRunner

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])],
    )
    onnx_path = tmp_path / "add.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(onnx_path))
    runner = OrtRunner(onnx_path)
    try:
        with pytest.raises(UnknownWeights, match="no weights named") as info:
            runner.refit({"w": torch.zeros(2), "not.a.weight": torch.zeros(1)})
        assert isinstance(info.value, RefitRejected) and isinstance(info.value, RefitError)
        assert runner.infer({"x": torch.zeros(2)}, 0).tolist() == [1.0, 2.0]  # nothing changed
    finally:
        runner.close()


def test_atomic_write_takes_library_buffers_and_makes_the_cache_folder(tmp_path: Path) -> None:
    """The plan and the caches are written by fsutil.atomic_write_bytes from a buffer (IHostMemory) without a copy;
    a buffer of wider items is written byte for byte."""
    import array

    from sdtrt.fsutil import atomic_write_bytes

    floats = array.array("f", [1.0, 2.0, 3.0])
    path = tmp_path / "cache" / "deeper" / "timing.cache"
    atomic_write_bytes(path, memoryview(floats), make_parents=True)
    assert path.read_bytes() == floats.tobytes()
    assert [p.name for p in path.parent.iterdir()] == ["timing.cache"]  # no temp file left


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
@needs_rtx
def test_rtx_unavailable_without_gpu_mentions_gpu() -> None:
    reason = TensorRTRTXBackend.unavailable_reason()
    assert reason is not None and "GPU" in reason
    with pytest.raises(BackendUnavailable, match="GPU"):
        get_backend("tensorrt-rtx")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_tensorrt_unavailable_gives_pip_hint() -> None:
    reason = TensorRTBackend.unavailable_reason()
    assert reason is not None and "pip install tensorrt" in reason


def test_import_does_no_work() -> None:
    code = (
        "import sys; import sdtrt.backends.tensorrt as m; from sdtrt.backends import backend_class; "
        "backend_class('tensorrt-rtx').capabilities; "
        "bad = [n for n in ('tensorrt_rtx', 'tensorrt', 'torch') if n in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_EXTENSION)


def test_strip_without_refit_is_refused_before_any_work(tmp_path: Path) -> None:
    profile = {"sample": TensorRange("sample", (1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 8))}
    options = BuildOptions(refit=False, strip_weights=True)
    with pytest.raises(BuildError, match="strip_weights needs refit"):
        TensorRTRTXBackend().build(tmp_path / "x.onnx", [profile], tmp_path, options)
    with pytest.raises(BuildError, match="profile"):
        TensorRTRTXBackend().build(tmp_path / "x.onnx", [], tmp_path, BuildOptions())


@needs_rtx
def test_dtype_table_matches_library_and_torch() -> None:
    import tensorrt_rtx as trt

    for member, torch_name in TORCH_DTYPES.items():
        assert hasattr(trt.DataType, member), member
        assert isinstance(getattr(torch, torch_name), torch.dtype), torch_name


# --- (c) mypy against tensorrt-stubs ---------------------------------------------------------------------------------


def _mypy(stubs: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": str(stubs)}
    return subprocess.run(  # noqa: PLW1510 - the caller asserts on the exit status
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "mypy.ini"), *targets],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def fixed_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    stubs = write_fixed_stubs(tmp_path_factory.mktemp("typings"))
    if stubs is None:
        pytest.skip("tensorrt-stubs are not installed, or do not parse even after repair")
    return stubs


def test_mypy_passes(fixed_stubs: Path) -> None:
    result = _mypy(fixed_stubs)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("module", "call", "misspelt"), [
    ("build", "builder.create_network(", "builder.create_netwrk("),  # a call on an object the library made
    ("build", "trt.OnnxParser(", "trt.OnnxParsr("),  # a member of the library handle itself
    ("runner", "context.execute_async_v3(", "context.execute_async_v4("),
])
def test_mypy_really_checks_library_calls(fixed_stubs: Path, tmp_path: Path, module: str, call: str,
                                          misspelt: str) -> None:
    """Negative control: the same file with a misspelt library call must fail, so the stubs are in effect for
    calls made through a library handle."""
    source = (REPO / f"extension/sdtrt/backends/tensorrt/{module}.py").read_text(encoding="utf-8")
    broken = source.replace(call, misspelt, 1)
    assert broken != source
    probe = tmp_path / "probe_backend.py"
    probe.write_text(broken, encoding="utf-8")
    result = _mypy(fixed_stubs, str(probe))
    name = misspelt.split(".")[-1].rstrip("(")
    assert result.returncode != 0 and name in result.stdout, result.stdout + result.stderr


def test_mypy_config_checks_every_module_of_the_package() -> None:
    """mypy.ini names the package folder, so a module added to it is checked too (no stale single-file path)."""
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "mypy.ini")
    files = [f.strip() for f in config["mypy"]["files"].split(",")]
    assert "extension/sdtrt/backends/tensorrt" in files
    assert all((REPO / f).exists() for f in files), files


# --- (d) GPU: build two profiles, run, compare with ONNX Runtime, refit ------------------------------------------------

GPU_BACKENDS = [
    pytest.param("tensorrt", marks=pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed")),
    pytest.param("tensorrt-rtx", marks=needs_rtx),
]


def _profiles() -> list[dict[str, TensorRange]]:
    """Two profiles: small latents with one token chunk, larger latents with two."""

    def p(lo: tuple[int, int, int], hi: tuple[int, int, int]) -> dict[str, TensorRange]:
        (n0, s0, t0), (n1, s1, t1) = lo, hi
        return {
            "sample": TensorRange("sample", (n0, 4, s0, s0), (n1, 4, s1, s1), (n1, 4, s1, s1)),
            "encoder_hidden_states": TensorRange("encoder_hidden_states", (n0, t0, 12), (n1, t1, 12), (n1, t1, 12)),
        }

    return [p((1, 8, 6), (2, 8, 6)), p((1, 16, 6), (2, 32, 12))]


def _ort(path: Path, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {k: v.cpu().numpy() for k, v in feeds.items()})
    return torch.from_numpy(out)


def _onnx_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every named weight of an ONNX file (initializers and Constant-node outputs), as OnnxParserRefitter sees them:
    TensorRT's refittable names are these, which for SD UNets exported without constant folding include the
    state-dict keys."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    weights[node.output[0]] = torch.from_numpy(numpy_helper.to_array(attr.t).copy())
    return weights


def _feeds(n: int, size: int, tokens: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 1000 + size + tokens)
    return {
        "sample": torch.randn(n, 4, size, size, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(n, tokens, 12, generator=g).to(dtype),
    }


@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("strip", [False, True], ids=["embedded", "stripped"])
def test_build_run_refit_matches_onnxruntime(name: str, strip: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    onnx_path = tmp_path / "tiny.onnx"
    model = export_tiny(onnx_path, torch.float32)
    backend = backend_class(name)(cache_dir=tmp_path / "cache")  # type: ignore[call-arg]
    reason = backend.unavailable_reason()
    if reason:
        pytest.skip(reason)
    phases: list[tuple[str, float]] = []
    out_dir = tmp_path / "engine"
    out_dir.mkdir()
    options = BuildOptions(refit=True, strip_weights=strip, cache_dir=tmp_path / "cache")
    result = backend.build(onnx_path, _profiles(), out_dir, options, lambda p, f: phases.append((p, f)))
    assert result.files == [PLAN_FILE] and (out_dir / PLAN_FILE).stat().st_size > 0
    assert result.weights == ("stripped" if strip else "embedded") and result.refit_mode == "refit"
    assert phases and all(0.0 <= f <= 1.0 for _, f in phases)

    runner = backend.load(out_dir, result.files, _profiles())
    try:
        names = runner.weight_names()
        base = _onnx_weights(onnx_path)
        assert names and names <= set(base), names - set(base)
        assert set(model.state_dict()) <= names  # conv/linear/norm weights kept their state-dict names
        assert runner.needs_weights == strip
        if strip:
            runner.refit({k: base[k].cuda() for k in names})
            assert not runner.needs_weights
        for index, (n, size, tokens) in enumerate([(1, 8, 6), (2, 8, 6), (2, 24, 12), (1, 16, 6)]):
            feeds = _feeds(n, size, tokens, torch.float32)
            profile = 0 if size == 8 else 1
            got = runner.infer({k: v.cuda() for k, v in feeds.items()}, profile).float().cpu()
            torch.testing.assert_close(got, _ort(onnx_path, feeds), rtol=1e-2, atol=1e-2, msg=f"call {index}")

        # Refit with new weights: the engine must now match a model exported with those weights.
        torch.manual_seed(1)
        new_model = TinyUNet().eval()
        new_path = tmp_path / "tiny-new.onnx"
        export_tiny(new_path, torch.float32, new_model)
        new = _onnx_weights(new_path)
        runner.refit({k: new[k].cuda() for k in names})
        feeds = _feeds(2, 16, 12, torch.float32)
        got = runner.infer({k: v.cuda() for k, v in feeds.items()}, 1).float().cpu()
        torch.testing.assert_close(got, _ort(new_path, feeds), rtol=1e-2, atol=1e-2)

        # Partial refit, as a LoRA does: one Linear back to the first model's weights.
        partial = {k: base[k].cuda() for k in ("to_q.weight", "to_q.bias")}
        try:
            runner.refit(partial)
        except RefitError as exc:  # TensorRT may ask for weights it fused with these
            assert "also needs" in str(exc)
        else:
            mixed = TinyUNet().eval()
            mixed.load_state_dict({**new_model.state_dict(), **{k: v.cpu() for k, v in partial.items()}})
            mixed_path = tmp_path / "tiny-mixed.onnx"
            export_tiny(mixed_path, torch.float32, mixed)
            got = runner.infer({k: v.cuda() for k, v in feeds.items()}, 1).float().cpu()
            torch.testing.assert_close(got, _ort(mixed_path, feeds), rtol=1e-2, atol=1e-2)

        with pytest.raises(UnknownWeights, match="no weights named"):
            runner.refit({"not.a.weight": torch.zeros(1, device="cuda")})
    finally:
        runner.close()
        runner.close()  # safe twice


@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_cuda_graphs_match_plain_runs_and_recapture(name: str, tmp_path: Path) -> None:
    """The same engine loaded with and without CUDA graphs gives the same answers through repeated shapes, a
    shape change, a profile switch and a refit; with TensorRT the graphs are really captured and replayed, and
    captured again after the profile switch and the refit (TensorRT-RTX captures inside the library)."""
    torch.manual_seed(0)
    onnx_path = tmp_path / "tiny.onnx"
    export_tiny(onnx_path, torch.float32)
    backend = backend_class(name)(cache_dir=tmp_path / "cache")  # type: ignore[call-arg]
    if backend.unavailable_reason():
        pytest.skip(str(backend.unavailable_reason()))
    out_dir = tmp_path / "engine"
    out_dir.mkdir()
    result = backend.build(onnx_path, _profiles(), out_dir, BuildOptions(refit=True, strip_weights=False))
    graphs = backend_class(name)(cuda_graphs=True).load(out_dir, result.files, _profiles())  # type: ignore[call-arg]
    plain = backend_class(name)(cuda_graphs=False).load(out_dir, result.files, _profiles())  # type: ignore[call-arg]
    torch.manual_seed(1)
    new_path = tmp_path / "tiny-new.onnx"
    export_tiny(new_path, torch.float32, TinyUNet().eval())
    new = _onnx_weights(new_path)
    try:
        calls = [(1, 8, 6)] * 4 + [(2, 24, 12)] * 3 + [(1, 8, 6)] * 3 + ["refit"] + [(1, 8, 6)] * 3
        reference = onnx_path
        for index, c in enumerate(calls):
            if c == "refit":
                names = graphs.weight_names()
                for r in (graphs, plain):
                    r.refit({k: new[k].cuda() for k in names})
                reference = new_path
                continue
            n, size, tokens = c
            feeds = {k: v.cuda() for k, v in _feeds(n, size, tokens, torch.float32).items()}
            feeds["sample"] += index  # different inputs each call: a replay must read this call's inputs
            profile = 0 if size == 8 else 1
            got = graphs.infer(feeds, profile).float().cpu()
            want = plain.infer(feeds, profile).float().cpu()
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=f"call {index}")
            torch.testing.assert_close(got, _ort(reference, {k: v.cpu() for k, v in feeds.items()}),
                                       rtol=1e-2, atol=1e-2, msg=f"call {index} vs onnxruntime")
        stats = graphs.stats()["cuda_graphs"]
        assert plain.stats()["cuda_graphs"]["captures"] == 0
        if name == "tensorrt":
            # (1,8,6): capture on call 2; (2,24,12) after the profile switch; (1,8,6) again after switching back;
            # and once more after the refit.
            assert stats["captures"] == 4, stats
            assert stats["replays"] == len([c for c in calls if c != "refit"]) - 4, stats
            assert stats["invalidations"] >= 3, stats
    finally:
        graphs.close()
        plain.close()


@needs_rtx
@pytest.mark.parametrize("where", ["ours", "library"])
def test_build_cancelled_by_progress_callback(where: str, tmp_path: Path) -> None:
    """A callback that raises cancels the build: in our own phases directly, inside the library's phases through
    IProgressMonitor.step_complete returning False. TensorRT-RTX reports its first phases even without a GPU."""
    onnx_path = tmp_path / "tiny.onnx"
    export_tiny(onnx_path, torch.float16 if FP16_RUNS else torch.float32)  # torch 2.1 traces float16 on GPUs only
    seen: list[str] = []

    def cancel(phase: str, fraction: float) -> None:
        seen.append(phase)
        if (phase == "parse" and fraction == 1.0) if where == "ours" else phase not in ("parse", "build"):
            raise KeyboardInterrupt

    out_dir = tmp_path / "engine"
    out_dir.mkdir()
    with pytest.raises(BuildError) as info:
        TensorRTRTXBackend().build(onnx_path, _profiles(), out_dir, BuildOptions(), cancel)
    if "cancelled" not in str(info.value) and not set(seen) - {"parse", "build"}:
        pytest.skip(f"the library failed before reporting a phase: {info.value}")
    assert "cancelled" in str(info.value) and isinstance(info.value.__cause__, KeyboardInterrupt)
    assert not (out_dir / PLAN_FILE).exists()


def test_write_stubs_cli(tmp_path: Path) -> None:
    if _stub_sources() is None:
        pytest.skip("tensorrt-stubs are not installed")
    subprocess.run([sys.executable, __file__, "--write-stubs", str(tmp_path)], check=True)
    assert (tmp_path / "tensorrt" / "__init__.pyi").is_file()
    shutil.rmtree(tmp_path / "tensorrt")
