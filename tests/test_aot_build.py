"""Ahead-of-time TensorRT-RTX engines built on this machine without a GPU: every family through
`sdtrt build --target`, published with a manifest that records targets and weights, listed by `sdtrt list`;
refused before deserialization on a GPU outside the targets; an engine without refit serves its own checkpoint
only (LoRA and other checkpoints run on PyTorch, saying why)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import FAMILIES, FP16_RUNS
from sdtrt.backends import get_backend
from sdtrt.backends.base import BuildOptions
from sdtrt.engine_types import BackendInfo
from sdtrt.errors import BackendUnavailable, RefitRejected, StaleEngine, TargetError
from sdtrt.pipeline.build import build_engine
from sdtrt.profiles import Profile
from sdtrt.serving.catalog import BackendProbe, engine_rows
from sdtrt.serving.session import EngineSession
from sdtrt.storage.key import EngineKey
from sdtrt.storage.manifest import stale_reason
from sdtrt.storage.registry import Registry
from sdtrt.targets import normalize_target, parse_targets, target_of
from sdtrt.tools.cli import main

try:
    import tensorrt_rtx

    HAS_RTX = hasattr(tensorrt_rtx, "Builder")
except Exception:  # noqa: BLE001 - not installed, or its libraries do not load
    HAS_RTX = False

needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed here (pip install tensorrt-rtx-cu12)")
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU builds")
needs_fp16 = pytest.mark.skipif(not FP16_RUNS, reason="this torch cannot trace a float16 UNet on the CPU (torch 2.1)")
PROFILE = "1x64x64x75:2x96x128x75:2x128x128x150"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def embedded_fraction(plan: bytes, checkpoint: Path) -> float:
    """Which share of the checkpoint's UNet tensors (of 32+ elements) has its first 64 fp16 bytes in `plan`."""
    from sdtrt.pipeline.checkpoint import read_unet_state_dict

    heads = [t.to(torch.float16).contiguous().numpy().tobytes()[:64]
             for t in read_unet_state_dict(checkpoint).values() if t.numel() >= 32]
    return sum(h in plan for h in heads) / len(heads)


# --- target names ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "name"), [("sm86", "sm86"), ("SM_89", "sm89"), ("8.6", "sm86"), ("120", "sm120"),
                                            ("12.0", "sm120"), (" sm75 ", "sm75")])
def test_targets_are_spelt_one_way(text: str, name: str) -> None:
    assert normalize_target(text) == name


def test_target_lists_sorted_without_repeats_and_current_alone() -> None:
    assert parse_targets("sm120,8.9, sm86,89") == ("sm86", "sm89", "sm120")
    assert parse_targets(["sm86", "sm80"]) == ("sm80", "sm86")
    assert parse_targets(None) == parse_targets("") == parse_targets("current") == ()
    assert target_of("9.0") == "sm90"
    for bad in ("sm8x", "ampere", "sm", "1.2.3"):
        with pytest.raises(TargetError, match="compute capability"):
            parse_targets(bad)
    with pytest.raises(TargetError, match="cannot be mixed"):
        parse_targets("current,sm89")
    assert parse_targets("Current") == parse_targets("current,CURRENT") == ()


def test_key_records_targets_only_when_set() -> None:
    base: dict[str, Any] = dict(family="sd1", arch_hash="ab" * 8, io={"contract": "ldm-unet"},
                                profiles=("1x512x512x75",), backend="tensorrt-rtx", backend_version="1.7.1",
                                device="ahead-of-time", compute_capability=None, refit_mode="none",
                                weights="embedded", export={"dtype": "float16"}, checkpoint_sha256="cd" * 32)
    plain = EngineKey(**base)
    assert "targets" not in plain.to_dict()  # ids of engines without targets are what they were
    aot = EngineKey(**base, targets=("sm86", "sm89"))
    assert aot.to_dict()["targets"] == ["sm86", "sm89"] and aot.engine_id() != plain.engine_id()
    assert EngineKey.from_dict(aot.to_dict()) == aot
    with pytest.raises(ValueError, match="sorted distinct"):
        EngineKey(**base, targets=("sm89", "sm86"))


def test_stale_by_target_and_library_version() -> None:
    key = EngineKey(family="sd1", arch_hash="ab" * 8, io={"contract": "ldm-unet"}, profiles=("1x512x512x75",),
                    backend="tensorrt-rtx", backend_version="1.7.1", device="ahead-of-time",
                    compute_capability=None, refit_mode="none", weights="embedded", export={"dtype": "float16"},
                    targets=("sm86", "sm89"))
    assert stale_reason(key, BackendInfo("tensorrt-rtx", "1.7.1", "NVIDIA L4 (sm89)", "8.9")) is None
    assert stale_reason(key, BackendInfo("tensorrt-rtx", "1.7.1", "NVIDIA A10 (sm86)", "8.6")) is None
    hopper = stale_reason(key, BackendInfo("tensorrt-rtx", "1.7.1", "NVIDIA H100 (sm90)", "9.0"))
    assert hopper is not None and "sm86, sm89" in hopper and "sm90" in hopper and "--target" in hopper
    newer = stale_reason(key, BackendInfo("tensorrt-rtx", "1.8.0", "NVIDIA L4 (sm89)", "8.9"))
    assert newer is not None and "1.7.1" in newer and "1.8.0" in newer


def test_backends_without_ahead_of_time_builds_refuse_targets(tiny_checkpoint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BackendUnavailable, match="only for the device it runs on.*tensorrt-rtx"):
        get_backend("onnxruntime", targets=("sm89",))
    with pytest.raises(BackendUnavailable, match="only for the device it runs on"):
        build_engine(tiny_checkpoint("sd1"), [Profile.parse("1x64x64x75")], tmp_path, backend="onnxruntime",
                     options=BuildOptions(targets=("sm89",)))
    assert not any(tmp_path.iterdir())


# --- real TensorRT-RTX builds without a GPU -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aot_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("aot-cache")


@needs_rtx
@needs_no_gpu
@needs_fp16
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_a_real_engine_without_a_gpu(family: str, tiny_checkpoint, aot_cache: Path,
                                                         capsys) -> None:  # type: ignore[no-untyped-def]
    """`sdtrt build --backend tensorrt-rtx --target sm89` (fp16) writes a real plan into the cache: verified
    manifest with targets, embedded weights and the checkpoint's hash; `sdtrt list` shows it as not stale."""
    checkpoint = tiny_checkpoint(family)
    code, out, err = cli(capsys, "build", str(checkpoint), "--backend", "tensorrt-rtx", "--target", "sm89",
                         "--dtype", "float16", "--profile", PROFILE, "--cache", str(aot_cache), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["built"] is True
    assert any("no GPU here" in note and "embeds its checkpoint's weights" in note for note in result["notes"])
    registry = Registry(aot_cache)
    manifest = registry.verify(result["id"])  # sizes and sha256 of the files on disk
    key = manifest.key
    assert (key.backend, key.targets, key.device) == ("tensorrt-rtx", ("sm89",), "ahead-of-time")
    assert (key.weights.value, key.refit_mode.value) == ("embedded", "none")
    assert key.family == family and key.export["dtype"] == "float16" and key.profiles == (PROFILE,)
    assert key.checkpoint_sha256 == manifest.source_checkpoint["sha256"] != ""
    assert manifest.extra["compute_capability"] == "sm89" and manifest.extra["library"] == "tensorrt_rtx"
    [plan] = manifest.files
    path = registry.engine_dir(manifest.id) / plan.name
    assert plan.name == "unet.plan" and path.stat().st_size == plan.size > 1_000_000  # kernels and weights
    # the plan carries this checkpoint's weights: many of its fp16 tensors appear verbatim (TensorRT reformats the
    # rest), those of another checkpoint of the family do not
    data = path.read_bytes()
    assert embedded_fraction(data, checkpoint) > 0.3
    assert embedded_fraction(data, tiny_checkpoint(family, 1)) < 0.02

    code, out, _ = cli(capsys, "list", "--cache", str(aot_cache), "--json")
    rows = {r["id"]: r for r in json.loads(out)["engines"]}
    row = rows[manifest.id]
    assert row["ok"] is True and row["reason"] is None
    assert (row["targets"], row["weights"], row["family"]) == (["sm89"], "embedded", family)
    code, text, _ = cli(capsys, "list", "--cache", str(aot_cache))
    assert f"{manifest.id}  {family}  a1111  tensorrt-rtx " in text and "for sm89" in text  # (the CLI's convention)
    assert row["convention"] == "a1111"


@needs_rtx
@needs_no_gpu
def test_several_targets_one_plan_and_unknown_targets_refused(tiny_checkpoint, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    checkpoint = str(tiny_checkpoint("sd1"))
    code, out, err = cli(capsys, "build", checkpoint, "--backend", "tensorrt-rtx", "--target", "sm120,8.6",
                         "--dtype", "float32", "--profile", "1x64x64x75", "--cache", str(tmp_path), "--json")
    assert code == 0, err
    manifest = json.loads(out)["manifest"]
    assert manifest["key"]["targets"] == ["sm86", "sm120"] and manifest["extra"]["compute_capability"] == "sm86,sm120"

    other = tmp_path / "other"
    code, out, err = cli(capsys, "build", checkpoint, "--backend", "tensorrt-rtx", "--target", "sm90",
                         "--profile", "1x64x64x75", "--cache", str(other))
    assert code != 0
    assert "cannot build for sm90" in err and "sm86" in err and "sm120" in err  # what it can build for
    assert not Registry(other).list()  # nothing published
    code, out, err = cli(capsys, "build", checkpoint, "--backend", "tensorrt-rtx", "--target", "ampere",
                         "--profile", "1x64x64x75", "--cache", str(other))
    assert code != 0 and "not a GPU compute capability" in err


@needs_rtx
@needs_no_gpu
def test_engine_for_other_targets_is_refused_before_deserialization(tiny_checkpoint, tmp_path: Path,
                                                                    monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A real plan built for sm89, opened on a (pretended) sm90 GPU: stale in the catalog with the reason, and
    EngineSession.open refuses it without ever calling the backend's load; on a (pretended) sm89 GPU it is loaded."""
    from sdtrt.backends.tensorrt import TensorRTRTXBackend
    from sdtrt.backends.tensorrt.library import TENSORRT_RTX, open_library

    out = build_engine(tiny_checkpoint("sd1"), [Profile.parse("1x64x64x75")], tmp_path, backend="tensorrt-rtx",
                       dtype="float32", options=BuildOptions(targets=("sm89",)))
    version = open_library(TENSORRT_RTX).version
    loads: list[Path] = []

    def pretend(device: str, cc: str) -> None:
        monkeypatch.setattr(TensorRTRTXBackend, "unavailable_reason", classmethod(lambda cls: None))
        monkeypatch.setattr(TensorRTRTXBackend, "info", lambda self: BackendInfo("tensorrt-rtx", version, device, cc))

    def load(self: Any, engine_dir: Path, *a: Any, **k: Any) -> Any:
        loads.append(engine_dir)
        raise RuntimeError("stop: the test only checks that load is reached")

    monkeypatch.setattr(TensorRTRTXBackend, "load", load)
    pretend("NVIDIA H100 80GB HBM3 (sm90)", "9.0")
    [row] = engine_rows(Registry(tmp_path), BackendProbe())
    assert row.stale is not None and "built ahead of time for sm89" in row.stale and "sm90" in row.stale
    with pytest.raises(StaleEngine, match="sm89.*sm90"):
        EngineSession.open(Registry(tmp_path), out.manifest.id)
    assert loads == []  # never deserialized

    pretend("NVIDIA L4 (sm89)", "8.9")
    [row] = engine_rows(Registry(tmp_path), BackendProbe())
    assert row.ok
    with pytest.raises(RuntimeError, match="stop"):
        EngineSession.open(Registry(tmp_path), out.manifest.id)
    assert loads == [tmp_path / out.manifest.id]


# --- an engine without refit serves its own checkpoint only ---------------------------------------------------------

def test_engine_without_refit_refuses_other_weights_and_lora(tiny_checkpoint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same rule an ahead-of-time engine follows, on an engine that runs here (onnxruntime, --no-refit): its key
    holds the checkpoint's hash (two checkpoints, two engines); other weights and LoRA are refused, nothing changes."""
    from sdtrt.pipeline.checkpoint import read_unet_state_dict

    options = BuildOptions(refit=False, strip_weights=False)
    own = build_engine(tiny_checkpoint("sd1", 0), [Profile.parse("1x64x64x75")], tmp_path, backend="onnxruntime",
                       options=options).manifest
    other = build_engine(tiny_checkpoint("sd1", 1), [Profile.parse("1x64x64x75")], tmp_path, backend="onnxruntime",
                         options=options).manifest
    assert own.id != other.id and own.key.checkpoint_sha256 == own.source_checkpoint["sha256"]
    session = EngineSession.open(Registry(tmp_path), own.id)
    try:
        sd1 = read_unet_state_dict(tiny_checkpoint("sd1", 1))
        assert session.load_weights({}, own.source_checkpoint["sha256"]) is False  # its own: nothing to do
        with pytest.raises(RefitRejected, match=f"cannot take another checkpoint's weights.*{own.source_checkpoint['name']}"):
            session.load_weights(sd1, other.source_checkpoint["sha256"])
        name = next(iter(session.runner.weight_names()))
        with pytest.raises(RefitRejected, match="cannot take LoRA weights.*built without refit"):
            session.apply_deltas("lora", {name: sd1[name]}, lambda names: {n: sd1[n] for n in names})
        assert session.weights_from == own.source_checkpoint["sha256"] and session.weights_unknown is None
    finally:
        session.close()

    # served: a LoRA set is refused before A1111's LoRA maths runs (it would be thrown away every generation)
    from sdtrt.serving.counters import Counters
    from sdtrt.serving.slot import EngineSlot, NetworkSet, NetworksFailed, WeightSource

    def maths(base: Any) -> Any:
        raise AssertionError("the LoRA maths ran for an engine that cannot take its result")

    registry = Registry(tmp_path)
    slot = EngineSlot(own, lambda engine_id: EngineSession.open(registry, engine_id), lambda *a: None)
    weights = WeightSource(own.source_checkpoint["sha256"], lambda names: {})
    with pytest.raises(NetworksFailed, match="cannot take LoRA weights"):
        slot.open(weights, Counters(), NetworkSet(("style", 0.8), maths))
    assert slot.open(weights, Counters()) is slot.session  # no LoRA: served
    slot.session.close()


@needs_rtx
@needs_no_gpu
@pytest.mark.parametrize(("refit", "strip"), [(True, False), (True, True)], ids=["refit", "refit+strip"])
def test_refittable_or_stripped_plans_need_a_gpu(tiny_checkpoint, tmp_path: Path, refit: bool, strip: bool) -> None:
    """Why CPU-built engines embed their weights: TensorRT-RTX fails such builds in its Myelin compiler without a
    GPU (REFIT_IDENTICAL and STRIP_PLAN alone too; REFIT_INDIVIDUAL builds only with no weight marked refittable, a
    plan of full size). Built through the backend directly, bypassing build_options. If a TensorRT-RTX release
    starts building these on a CPU, this test fails: then build_options can stop embedding."""
    from sdtrt.backends.tensorrt import TensorRTRTXBackend
    from sdtrt.errors import BuildError
    from sdtrt.pipeline.checkpoint import build_unet, open_checkpoint
    from sdtrt.pipeline.export import ExportSettings, export_unet

    ckpt, sd = open_checkpoint(tiny_checkpoint("sd1"))
    contract = ckpt.info.contract_for(False)
    onnx = export_unet(build_unet(ckpt.info, sd), contract, tmp_path / "onnx", ExportSettings(dtype="float32"))
    backend = TensorRTRTXBackend()
    options = BuildOptions(refit=refit, strip_weights=strip, targets=("sm89",))
    assert backend.build_options(options)[0] == BuildOptions(refit=False, strip_weights=False, targets=("sm89",))
    with pytest.raises(BuildError, match="could not build the engine.*(Myelin|CUDA)"):
        backend.build(onnx.onnx_path, [contract.engine_ranges(Profile.parse("1x64x64x75"))], tmp_path / "out",
                      options)
    (tmp_path / "plain").mkdir()
    built = backend.build(onnx.onnx_path, [contract.engine_ranges(Profile.parse("1x64x64x75"))], tmp_path / "plain",
                          BuildOptions(refit=False, strip_weights=False, targets=("sm89",)))
    assert (built.weights, built.refit_mode) == ("embedded", "none")
