"""Engines with ControlNet inputs (models/control.py) against the PyTorch UNet with the same residuals added the way
sd-webui-controlnet's hook adds them, at several sizes in steps of 8 px, batch layouts and families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdtrt.errors import SdtrtError
from sdtrt.models import (
    CallSize,
    ControlFeeds,
    LdmUNet,
    LdmUNetControl,
    NotServable,
    SgmUNetControl,
    TensorIO,
    bind_record,
)
from sdtrt.models.torch_unet import UNetModel, skip_cat, timestep_embedding
from sdtrt.pipeline.build import build_engine
from sdtrt.pipeline.checkpoint import build_unet, open_checkpoint
from sdtrt.profiles import Profile
from sdtrt.serving.session import EngineSession
from sdtrt.storage.manifest import Manifest
from sdtrt.storage.registry import Registry

PROFILE = "1x64x64x75:1x96x96x75:2x128x128x150"
#: (rows, height px, width px, tokens): sizes in steps of 8 px (latents not divisible by the UNet's downsampling)
CALLS = [(2, 64, 64, 77), (1, 72, 104, 77), (4, 120, 88, 154), (3, 128, 128, 77)]


def hook_style_forward(unet: UNetModel, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, y: torch.Tensor | None,
                       controls: list[torch.Tensor], adapters: list[torch.Tensor], after: tuple[int, ...]
                       ) -> torch.Tensor:
    """The block loop as sd-webui-controlnet's hook runs it (written from its description, independently of the
    engine's): adapter features are added to h after the injection blocks (so the kept skip carries them), the
    ControlNet residuals to the skips as the decoder takes them and after the middle block."""
    controls, adapters = list(controls), list(adapters)
    emb = unet.time_embed(timestep_embedding(t, unet.model_channels))
    if y is not None:
        emb = emb + unet.label_emb(y)
    h, hs = x, []
    for i, block in enumerate(unet.input_blocks):
        h = block(h, emb, ctx)
        if i in after:
            h = h + adapters.pop(0)
        hs.append(h)
    h = unet.middle_block(h, emb, ctx) + controls.pop()
    for block in unet.output_blocks:
        h = block(skip_cat(h, hs.pop() + controls.pop()), emb, ctx)
    return unet.out(h)


@pytest.fixture(scope="module")
def control_engines(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache = tmp_path_factory.mktemp("control-engines")
    made: dict[str, tuple[Manifest, torch.nn.Module, Path]] = {}

    def get(family: str) -> tuple[Manifest, torch.nn.Module, Path]:
        if family not in made:
            path = tiny_checkpoint(family, 3)
            out = build_engine(path, [Profile.parse(PROFILE)], cache, backend="onnxruntime", controlnet=True)
            ckpt, sd = open_checkpoint(path)
            made[family] = (out.manifest, build_unet(ckpt.info, sd), cache)
        return made[family]

    return get


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl-base", "sdxl-refiner", "sd1-inpaint"])
def test_engine_with_control_inputs_matches_the_hooks_block_loop(family: str, control_engines) -> None:
    manifest, unet, cache = control_engines(family)
    contract = bind_record(manifest.key.io)
    assert contract.takes_control and manifest.key.io["contract"].endswith("-unet-control")
    session = EngineSession.open(Registry(cache), manifest.id)
    g = torch.Generator().manual_seed(11)
    try:
        for rows, hpx, wpx, tokens in CALLS:
            h, w = hpx // 8, wpx // 8
            x = torch.randn(rows, unet.in_channels, h, w, generator=g)
            t = torch.rand(rows, generator=g) * 999
            ctx = torch.randn(rows, tokens, contract.io.context_dim, generator=g)
            y = torch.randn(rows, contract.io.y_dim, generator=g) if contract.io.y_dim else None
            dims = contract.control_dims(CallSize(rows, h, w, 77))
            controls = [torch.randn(d, generator=g) for name, d in dims if name.startswith("control_")]
            adapters = [torch.randn(d, generator=g) for name, d in dims if name.startswith("adapter_")]
            assert adapters, "the tiny UNet has at least one adapter injection point"
            with torch.no_grad():
                ref = hook_style_forward(unet, x, t, ctx, y, controls, adapters, contract.adapters)
                plain_ref = unet(x, t, ctx, y=y) if y is not None else unet(x, t, ctx)
            # what serving passes: everything the hook added to each skip, and the features added to h
            skips = list(controls)
            for j, i in enumerate(contract.adapters):
                skips[i] = skips[i] + adapters[j]
            kwargs = {"y": y} if y is not None else {}
            feeds = contract.feeds((x, t, ctx), kwargs, ControlFeeds(skips, adapters))
            index = session.spec.profile_for({k: tuple(v.shape) for k, v in feeds.items()})
            assert index is not None, (rows, hpx, wpx)
            out = session(feeds)
            assert ref.abs().mean() > 1e-3 and (ref - plain_ref).abs().mean() > 1e-3  # the residuals matter
            torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
            # the same engine serves plain calls: no ControlFeeds means zeros
            plain = session(contract.feeds((x, t, ctx), {"y": y} if y is not None else {}))
            torch.testing.assert_close(plain, plain_ref, atol=2e-4, rtol=2e-4)
    finally:
        session.close()


def test_control_engine_key_records_the_skip_layout_and_reads_back(control_engines) -> None:
    manifest, unet, _ = control_engines("sd1")
    io = manifest.key.io
    assert len(io["skips"]) == len(unet.input_blocks) + 1
    x = torch.zeros(1, unet.in_channels, 9, 13)
    emb, ctx = torch.zeros(1, unet.model_channels * 4), torch.zeros(1, 77, io["context_dim"])
    for block, (channels, level) in zip(unet.input_blocks, io["skips"]):  # the layout is what the blocks output
        x = block(x, emb, ctx)
        assert tuple(x.shape[1:]) == (channels, -(-9 // 2**level), -(-13 // 2**level))
    contract = bind_record(io)
    assert isinstance(contract, LdmUNetControl)
    assert contract.io.skips == tuple(tuple(s) for s in io["skips"])
    # a plain engine's record is unchanged by the variant (no skips, same contract name as before)
    plain = LdmUNet(contract.io).record()
    assert "skips" not in plain and plain["contract"] == "ldm-unet"


def test_residuals_of_the_wrong_shape_or_count_are_refused() -> None:
    io = TensorIO(4, 768, None, ((32, 0), (32, 0), (32, 1), (64, 1), (64, 1)))
    contract = LdmUNetControl(io)
    x, t, ctx = torch.zeros(2, 4, 9, 11), torch.zeros(2), torch.zeros(2, 77, 768)
    good = [torch.zeros(2, c, -(-9 // 2**lv), -(-11 // 2**lv)) for c, lv in io.skips]
    feeds = contract.feeds((x, t, ctx), {}, ControlFeeds(good))
    assert tuple(feeds["control_2"].shape) == (2, 32, 5, 6)
    with pytest.raises(NotServable, match="control_1 has shape"):
        contract.feeds((x, t, ctx), {}, ControlFeeds([good[0], torch.zeros(2, 32, 8, 8), *good[2:]]))
    with pytest.raises(NotServable, match="sent 4 residuals"):
        contract.feeds((x, t, ctx), {}, ControlFeeds(good[:4]))
    with pytest.raises(NotServable, match="no ControlNet inputs"):
        LdmUNet(io).feeds((x, t, ctx), {}, ControlFeeds(good))
    with pytest.raises(SdtrtError, match="skip layout"):
        SgmUNetControl(TensorIO(4, 2048, 2816))


def test_skip_layout_of_sd1_and_sdxl_matches_the_hooks_residual_counts() -> None:
    from sdtrt.models.torch_unet import UNetSpec

    sd1 = UNetSpec(4, 4, 320, (1, 2, 4, 4), 2, (1, 1, 1, 0), (0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1), 1, 768, False, 8)
    sdxl = UNetSpec(4, 4, 320, (1, 2, 4), 2, (0, 2, 10), (10, 10, 10, 2, 2, 2, 0, 0, 0), 10, 2048, True, -1, 64, 2816)
    assert len(sd1.skip_layout()) == 13 and len(sdxl.skip_layout()) == 10
    assert [c for c, _ in sd1.skip_layout()] == [320] * 4 + [640] * 3 + [1280] * 6
    assert [lv for _, lv in sd1.skip_layout()] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert LdmUNetControl(TensorIO(4, 768, None, sd1.skip_layout())).adapters == (2, 5, 8, 11)
    assert SgmUNetControl(TensorIO(4, 2048, 2816, sdxl.skip_layout())).adapters == (3, 5, 8)


def test_cli_builds_and_lists_an_engine_with_controlnet_inputs(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    import json

    from sdtrt.tools.cli import main

    cache = tmp_path / "cache"
    assert main(["build", str(tiny_checkpoint("sd1", 3)), "--backend", "onnxruntime", "--profile", "1x64x64x75",
                 "--cache", str(cache), "--controlnet", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["manifest"]["key"]["io"]["contract"] == "ldm-unet-control"
    assert main(["build", str(tiny_checkpoint("sd1", 3)), "--backend", "onnxruntime", "--profile", "1x64x64x75",
                 "--cache", str(cache), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["id"] != built["id"]  # both variants coexist in the cache
    assert main(["list", "--cache", str(cache), "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)["engines"]}
    assert rows[built["id"]]["controlnet"] is True and rows[plain["id"]]["controlnet"] is False
