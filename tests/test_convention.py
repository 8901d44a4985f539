"""The engine convention (`sdtrt.models.convention`): `UNetModel(spec, FORGE)` computes exactly as Forge's UNet
(upsampling to the next skip connection's size) - the fake Forge's UNet class here, and the real Forge's
`IntegratedUNet2DConditionModel` when SDTRT_FORGE_DIR names a Forge installation with its venv - while
`UNetModel(spec)` keeps A1111's numerics (tests/test_export.py and the fake-A1111 suites hold those); the export
of a Forge-convention UNet sizes every upsampling from the skip tensor's shape (one engine serves every size: an
onnxruntime engine traced at one size equals PyTorch at others), with and without ControlNet inputs; the convention
goes into the engine key only when it is Forge's (A1111 engines keep their ids)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdtrt.errors import SdtrtError
from sdtrt.models import LdmUNet, SgmUNet, bind_record
from sdtrt.models.base import TensorIO
from sdtrt.models.convention import A1111, FORGE, check_convention, is_mismatch, mismatch
from sdtrt.models.torch_unet import UNetModel
from sdtrt.tools.tiny import TINY, randomize_, standard_spec

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
#: latent sizes (h, w): off the 8-grid, where the conventions differ, and on it, where they agree
OFF_GRID = [(9, 9), (10, 12), (13, 7), (11, 6)]
ON_GRID = [(8, 8), (16, 8)]
#: four levels (three downsamplings) as SD1/SD2's UNets, channels multiples of 32 (Forge's GroupNorm has 32 groups)
SPEC = standard_spec(model_channels=32, channel_mult=(1, 2, 2, 2), transformer_depth=(1, 1, 1, 0), num_heads=2)


def fake_forge_unet_class() -> type:
    """The fake Forge's IntegratedUNet2DConditionModel, imported with tests/fake_forge on sys.path just for this (the
    fake's top-level modules are taken out of sys.modules again, so a FakeForge boot later starts clean)."""
    import fakeforge

    saved_path, before = list(sys.path), set(sys.modules)
    sys.path.insert(0, str(fakeforge.FAKE_ROOT))
    try:
        from backend.nn.unet import IntegratedUNet2DConditionModel
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - before:
            if fakeforge._is_fake_name(name):
                del sys.modules[name]
    return IntegratedUNet2DConditionModel  # type: ignore[no-any-return]


def inputs(h: int, w: int, seed: int, spec=SPEC) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, spec.in_channels, h, w, generator=g), torch.tensor([999.0, 321.5]),
            torch.randn(2, 77, spec.context_dim, generator=g))


@pytest.fixture(scope="module")
def unets() -> dict[str, torch.nn.Module]:
    ours = randomize_(UNetModel(SPEC, FORGE).eval().requires_grad_(False), 7)
    a1111 = UNetModel(SPEC).eval().requires_grad_(False)
    a1111.load_state_dict(ours.state_dict())
    fake = fake_forge_unet_class()(SPEC).eval().requires_grad_(False)
    fake.load_state_dict(ours.state_dict(), strict=True)
    assert ours.state_dict()["out.2.weight"].abs().max() > 0  # no zero-initialised output conv
    return {"forge": ours, "a1111": a1111, "fake": fake}


# ---- numerics ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", OFF_GRID + ON_GRID)
def test_forge_convention_equals_fakes_forge_unet(unets, hw: tuple[int, int]) -> None:
    x, t, c = inputs(*hw, seed=hw[0] * 100 + hw[1])
    with torch.no_grad():
        ref = unets["fake"](x, t, context=c, transformer_options={})
        got = unets["forge"](x, t, c)
        a1111 = unets["a1111"](x, t, c)
    scale = ref.abs().max().item()
    assert scale > 0.5
    assert (got - ref).abs().max().item() <= 1e-5 * scale
    if hw in ON_GRID:  # the conventions agree on the 8-grid ...
        assert (a1111 - ref).abs().max().item() <= 1e-5 * scale
    else:  # ... and differ off it by the output's own size
        assert (a1111 - ref).abs().max().item() > 1e-2 * scale


def test_a1111_convention_is_the_default_and_names_are_checked() -> None:
    assert UNetModel(SPEC).convention == A1111
    assert check_convention("forge") == FORGE
    for bad in ("Forge", "", None, 1):
        with pytest.raises(SdtrtError, match="convention must be 'a1111' or 'forge'"):
            check_convention(bad)
    with pytest.raises(SdtrtError):
        UNetModel(SPEC, "comfy")
    assert mismatch(A1111, FORGE, 8, 16) is None and mismatch(FORGE, FORGE, 9, 9) is None
    why = mismatch(A1111, FORGE, 9, 8, "sd1-x")
    assert why is not None and is_mismatch(why) and "engine sd1-x follows A1111's upsampling" in why
    assert "build an engine with the Forge convention" in why and "--convention forge" in why
    assert not is_mismatch("no engine profile covers this call")


# ---- export -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,controlnet", [("sd1", False), ("sdxl-refiner", False), ("sd1", True)])
def test_forge_convention_export_sizes_upsampling_from_the_skip(tmp_path: Path, family: str,
                                                                controlnet: bool) -> None:
    """Traced at one size (the contract's example, 16x24), the onnxruntime engine equals the PyTorch Forge-convention
    module at off-grid sizes, so the graph takes every upsampling's size from the skip tensor's shape."""
    import onnxruntime as ort

    from sdtrt.pipeline.export import ExportSettings, export_unet

    spec, _ = TINY[family]
    unet = randomize_(UNetModel(spec, FORGE).eval().requires_grad_(False), 3)
    family_contract = SgmUNet if spec.adm_in_channels is not None else LdmUNet
    io = TensorIO(spec.in_channels, spec.context_dim, spec.adm_in_channels, spec.skip_layout(), FORGE)
    contract = family_contract.variant(controlnet)(io)
    result = export_unet(unet, contract, tmp_path, ExportSettings("float32"))
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(5)
    for h, w in [(9, 9), (13, 7), (10, 12), (8, 8)]:
        dims = contract.call_dims(_shape(h, w), rows=2)
        feeds = contract.random_feeds(dims, "cpu", torch.float32, g)
        with torch.no_grad():
            expected = contract.torch_call(unet, feeds)
        full = contract.feeds(*contract.host_call(feeds)) if controlnet else feeds
        got = session.run(None, {k: v.numpy() for k, v in full.items()})[0]
        scale = expected.abs().max().item()
        assert scale > 0.5
        assert np.abs(got - expected.numpy()).max() <= 1e-4 * scale, (family, h, w)


def _shape(h: int, w: int):  # type: ignore[no-untyped-def]
    from sdtrt.profiles import Shape

    return Shape(1, h * 8, w * 8, 75)


def test_export_refuses_a_module_of_the_other_convention(tmp_path: Path) -> None:
    from sdtrt.pipeline.export import export_unet

    spec, _ = TINY["sd1"]
    forge = LdmUNet(TensorIO(spec.in_channels, spec.context_dim, None, (), FORGE))
    with pytest.raises(SdtrtError, match="upsamples as A1111 does"):
        export_unet(UNetModel(spec).eval(), forge, tmp_path)


# ---- the record ---------------------------------------------------------------------------------------------------
def test_the_record_names_forge_only_and_binds_back() -> None:
    io = TensorIO(4, 768, None, SPEC.skip_layout())
    plain = LdmUNet(io).record()
    assert "convention" not in plain  # A1111's record (and so the key and id) as before conventions existed
    forge = LdmUNet.variant(True)(TensorIO(4, 768, None, SPEC.skip_layout(), FORGE)).record()
    assert forge["convention"] == FORGE
    assert bind_record(plain).io.convention == A1111
    assert bind_record(forge).io.convention == FORGE and bind_record(forge).takes_control
    with pytest.raises(SdtrtError, match="convention must be"):
        bind_record({**plain, "convention": "comfy"})


# ---- the real Forge's UNet class ----------------------------------------------------------------------------------
FORGE_DIR = os.environ.get("SDTRT_FORGE_DIR")
REAL_FORGE_SCRIPT = r'''
import json, os, sys
sys.argv = sys.argv[:1] + ["--always-cpu", "--attention-pytorch"]  # backend.args is parsed at import
forge, extension = os.getcwd(), os.environ["SDTRT_EXTENSION"]
sys.path[:0] = [forge, os.path.join(forge, "packages_3rdparty"), extension]
import torch
from backend.nn.unet import IntegratedUNet2DConditionModel
from sdtrt.models.convention import FORGE
from sdtrt.models.torch_unet import UNetModel
from sdtrt.tools.tiny import randomize_, standard_spec

spec = standard_spec(model_channels=32, channel_mult=(1, 2, 2, 2), transformer_depth=(1, 1, 1, 0), num_heads=2)
ours = randomize_(UNetModel(spec, FORGE).eval().requires_grad_(False), 11)
a1111 = UNetModel(spec).eval().requires_grad_(False)
a1111.load_state_dict(ours.state_dict())
real = IntegratedUNet2DConditionModel(
    in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1, channel_mult=(1, 2, 2, 2), num_heads=2,
    use_spatial_transformer=True, transformer_depth=list(spec.transformer_depth),
    transformer_depth_output=list(reversed(spec.transformer_depth_output)), transformer_depth_middle=1, context_dim=768,
    use_linear_in_transformer=False).eval()
real.load_state_dict(ours.state_dict(), strict=True)
out = {}
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for h, w in json.loads(os.environ["SDTRT_SIZES"]):
        x, t = torch.randn(2, 4, h, w, generator=g), torch.tensor([999.0, 321.5])
        c = torch.randn(2, 77, 768, generator=g)
        ref = real(x, t, context=c, transformer_options={})
        out[f"{h}x{w}"] = {"forge": float((ours(x, t, c) - ref).abs().max()),
                           "a1111": float((a1111(x, t, c) - ref).abs().max()), "scale": float(ref.abs().max())}
print("RESULT " + json.dumps(out))
'''


@pytest.mark.skipif(not FORGE_DIR, reason="SDTRT_FORGE_DIR (a Forge installation with its venv) is not set")
def test_forge_convention_equals_the_real_forge_unet() -> None:
    """In Forge's own venv (its torch, its UNet class): our Forge-convention UNet equals Forge's to ~1e-5."""
    forge = Path(str(FORGE_DIR))
    python = forge / "venv" / "bin" / "python"
    if not (forge / "backend" / "nn" / "unet.py").is_file() or not python.is_file():
        pytest.skip(f"{forge} has no backend/nn/unet.py or venv/bin/python")
    sizes = OFF_GRID + ON_GRID
    env = {**os.environ, "SDTRT_EXTENSION": str(ROOT / "extension"), "SDTRT_SIZES": json.dumps(sizes)}
    proc = subprocess.run([str(python), "-c", REAL_FORGE_SCRIPT], cwd=forge, env=env, capture_output=True, text=True,
                          check=False, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(line[len("RESULT "):])
    print(json.dumps(result, indent=1))
    for h, w in sizes:
        r = result[f"{h}x{w}"]
        assert r["scale"] > 0.5 and r["forge"] <= 1e-5 * r["scale"], (h, w, r)
        if (h, w) in OFF_GRID:
            assert r["a1111"] > 1e-2 * r["scale"], (h, w, r)


# ---- engine ids, the cache, the CLI and the pre-build plan ---------------------------------------------------------
#: ids of fixed A1111-convention keys as sd-webui-trt computed them before conventions existed (commit 34a4b94)
IDS_BEFORE_CONVENTIONS = {("sd1", False): "sd1-tensorrt-82681250fc78ec01",
                          ("sd1", True): "sd1-tensorrt-8a9fdb2989933e27",
                          ("sdxl-base", False): "sdxl-base-tensorrt-73af2abe92e2d0b0",
                          ("sdxl-base", True): "sdxl-base-tensorrt-3b7702b7dae772c4"}


def _fixed_key(family: str, controlnet: bool, convention: str):  # type: ignore[no-untyped-def]
    from sdtrt.storage.key import EngineKey

    spec, _ = TINY[family]
    contract = (SgmUNet if spec.adm_in_channels else LdmUNet).variant(controlnet)
    io = TensorIO(spec.in_channels, spec.context_dim, spec.adm_in_channels, spec.skip_layout(), convention)
    return EngineKey(family=family, arch_hash="0123456789abcdef", io=contract(io).record(), profiles=("1x512x512x75",),
                     backend="tensorrt", backend_version="10.13.0", device="NVIDIA GeForce RTX 4090",
                     compute_capability="8.9", refit_mode="refit", weights="stripped",
                     export={"dtype": "float16", "opset": 17, "exporter": "torchscript/torch-2.1.2"})


@pytest.mark.parametrize("family,controlnet", sorted(IDS_BEFORE_CONVENTIONS))
def test_a1111_engines_keep_their_ids_and_forge_ones_get_others(family: str, controlnet: bool) -> None:
    assert _fixed_key(family, controlnet, A1111).engine_id() == IDS_BEFORE_CONVENTIONS[(family, controlnet)]
    forge = _fixed_key(family, controlnet, FORGE)
    assert forge.engine_id() != IDS_BEFORE_CONVENTIONS[(family, controlnet)]
    assert forge.io["convention"] == FORGE


CLI_PROFILE = "1x64x64x75:1x96x96x75:1x128x128x75"


def test_both_conventions_live_in_one_cache_and_check_against_their_own_numerics(tiny_checkpoint, capsys,  # type: ignore[no-untyped-def]
                                                                                 tmp_path: Path) -> None:
    from sdtrt.storage.registry import Registry
    from sdtrt.tools.cli import main

    ckpt, cache = str(tiny_checkpoint("sd1")), str(tmp_path / "cache")
    ids = {}
    for convention in (None, "forge"):
        capsys.readouterr()
        extra = ["--convention", convention] if convention else []
        assert main(["build", ckpt, "--backend", "onnxruntime", "--profile", CLI_PROFILE, "--cache", cache,
                     "--json", *extra]) == 0
        ids[convention] = json.loads(capsys.readouterr().out)["id"]
    assert ids[None] != ids["forge"] and len(Registry(Path(cache)).list()) == 2
    io = {i: Registry(Path(cache)).get(i).key.io for i in ids.values()}
    assert "convention" not in io[ids[None]] and io[ids["forge"]]["convention"] == "forge"
    assert {k: v for k, v in io[ids["forge"]].items() if k != "convention"} == io[ids[None]]
    capsys.readouterr()
    assert main(["list", "--cache", cache, "--json"]) == 0
    listed = {r["id"]: r["convention"] for r in json.loads(capsys.readouterr().out)["engines"]}
    assert listed == {ids[None]: "a1111", ids["forge"]: "forge"}
    for engine_id in ids.values():  # each engine equals PyTorch computing in its own convention, off the 8-grid
        capsys.readouterr()
        assert main(["check", engine_id, "--checkpoint", ckpt, "--cache", cache, "--shape", "1x72x104x75",
                     "--json"]) == 0
        [row] = json.loads(capsys.readouterr().out)["rows"]
        assert row["max_abs_out"] > 0.1 and row["max_abs_diff"] <= 1e-4 * row["max_abs_out"], row
    capsys.readouterr()
    assert main(["build", ckpt, "--backend", "onnxruntime", "--profile", CLI_PROFILE, "--cache", cache,
                 "--convention", "comfy"]) != 0
    assert "convention must be 'a1111' or 'forge'" in capsys.readouterr().err


def test_a_prebuild_plan_takes_the_convention() -> None:
    from sdtrt.backends import NAMES
    from sdtrt.tools.prebuild import PlanError, parse_plan

    entry = {"checkpoint": "a.safetensors", "profiles": ["1x64x64x75"]}
    (plain, forge) = parse_plan({"builds": [entry, {**entry, "convention": "forge"}]}, NAMES)
    assert (plain.convention, forge.convention) == (None, FORGE)
    with pytest.raises(PlanError, match=r"builds\[0\]\.convention: convention must be"):
        parse_plan({"builds": [{**entry, "convention": "A1111"}]}, NAMES)
