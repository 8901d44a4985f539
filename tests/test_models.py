"""Model contracts (sdtrt.models): what a host call becomes for an engine, what an engine key records, how old
manifests are read, and that no other product module spells an engine input name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sdtrt.errors import SdtrtError, StaleEngine
from sdtrt.models import CONTRACTS, LdmUNet, NotServable, SgmUNet, TensorIO, bind_record
from sdtrt.profiles import Profile, Shape

SD1 = LdmUNet(TensorIO(4, 768, None))
SDXL = SgmUNet(TensorIO(4, 2048, 2816))
PRODUCT = Path(__file__).resolve().parents[1] / "extension" / "sdtrt"


def host_call(rows: int = 2, y: int | None = None) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    args = (torch.zeros(rows, 4, 8, 8), torch.zeros(rows), torch.zeros(rows, 77, 768 if y is None else 2048))
    return args, ({"y": torch.zeros(rows, y)} if y else {})


def test_a_plain_call_becomes_the_engine_feeds_and_back() -> None:
    for contract, y in ((SD1, None), (SDXL, 2816)):
        args, kwargs = host_call(y=y)
        feeds = contract.feeds(args, kwargs)
        assert list(feeds) == contract.input_names()
        back_args, back_kwargs = contract.host_args(feeds)
        assert all(a is b for a, b in zip(back_args, args)) and back_kwargs.keys() == kwargs.keys()
        dims = {k: tuple(v.shape) for k, v in feeds.items()}
        assert contract.describe(dims) == "2 rows, 64x64 px, 1 prompt chunk"


@pytest.mark.parametrize(("contract", "args_kwargs", "message"), [
    (SD1, lambda: (host_call()[0], {"control": [torch.zeros(1)]}), r"extra inputs the engine lacks \(control\)"),
    (SD1, lambda: ((*host_call()[0], torch.zeros(1)), {}), r"extra inputs the engine lacks \(positional\)"),
    (SD1, lambda: host_call(y=2816), "carries a `y` vector"),
    (SDXL, lambda: host_call(), "no `y` vector"),
    (SD1, lambda: (host_call()[0][:2], {}), "not x, timesteps and context"),
])
def test_calls_the_engine_cannot_take_are_refused_with_the_reason(contract, args_kwargs, message) -> None:  # type: ignore[no-untyped-def]
    args, kwargs = args_kwargs()
    with pytest.raises(NotServable, match=message):
        contract.feeds(args, kwargs)


def test_none_valued_extra_keywords_are_plain_calls() -> None:
    args, _ = host_call()
    assert list(SD1.feeds(args, {"control": None, "y": None})) == SD1.input_names()


def test_call_dims_fall_inside_the_ranges_of_their_own_profile() -> None:
    shape = Shape(2, 512, 768, 150)
    for contract in (SD1, SDXL):
        ranges = contract.engine_ranges(Profile.static(shape))
        for cfg in (True, False):
            dims = contract.call_dims(shape, cfg=cfg)
            assert set(dims) == set(ranges) == set(contract.input_names())
            assert all(ranges[n].contains(d) for n, d in dims.items()), (cfg, dims)
    assert SDXL.call_dims(shape)["y"] == (4, 2816)


def test_the_record_names_the_contract_and_reads_back() -> None:
    for contract in (SD1, SDXL):
        record = contract.record()
        assert record["contract"] == contract.name and record["contract_version"] == contract.version
        again = bind_record(record)
        assert type(again) is type(contract) and again.io == contract.io


def test_engines_built_before_contracts_get_the_contract_of_their_architecture() -> None:
    assert type(bind_record({"in_channels": 9, "context_dim": 768, "y_dim": None})) is LdmUNet
    assert type(bind_record({"in_channels": 4, "context_dim": 1280, "y_dim": 2560})) is SgmUNet


def test_an_unknown_contract_or_version_is_refused_naming_it() -> None:
    with pytest.raises(SdtrtError, match="unknown model contract 'mmdit'"):
        bind_record({**SD1.record(), "contract": "mmdit"})
    with pytest.raises(SdtrtError, match="version 7 of the ldm-unet contract.*rebuild"):
        bind_record({**SD1.record(), "contract_version": 7})


def test_a_built_engine_records_its_contract_and_serves_through_it(tiny_checkpoint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from sdtrt.pipeline.build import build_engine
    from sdtrt.serving.session import EngineSession
    from sdtrt.serving.spec import engine_contract
    from sdtrt.storage.registry import Registry

    out = build_engine(tiny_checkpoint("sdxl-base"), [Profile.parse("1x64x64x75")], tmp_path, backend="onnxruntime")
    io = out.manifest.key.io
    assert io["contract"] == "sgm-unet" and io["contract_version"] == 1 and io["y_dim"] == 2816
    assert isinstance(engine_contract(out.manifest), SgmUNet)
    session = EngineSession.open(Registry(tmp_path), out.manifest.id)
    try:
        g = torch.Generator().manual_seed(0)
        feeds = session.contract.random_feeds(session.contract.call_dims(Shape(1, 64, 64, 75)), "cpu",
                                              torch.float32, g)
        assert session(feeds).shape == (2, 4, 8, 8)
    finally:
        session.close()


def test_a_manifest_with_a_contract_version_this_code_lacks_is_stale(tiny_checkpoint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from sdtrt.pipeline.build import build_engine
    from sdtrt.serving.spec import engine_contract

    out = build_engine(tiny_checkpoint("sd1"), [Profile.parse("1x64x64x75")], tmp_path, backend="onnxruntime")
    key = dataclasses.replace(out.manifest.key, io={**out.manifest.key.io, "contract_version": 99})
    with pytest.raises(StaleEngine, match="version 99"):
        engine_contract(dataclasses.replace(out.manifest, key=key))


def test_no_product_module_outside_models_spells_an_engine_input_name() -> None:
    skips = ((32, 0), (32, 0), (32, 1), (64, 1), (64, 2), (64, 2), (64, 3), (64, 3), (64, 3), (64, 3), (64, 3),
             (64, 3), (64, 3))  # an SD1-like layout: every adapter injection point exists
    names = {n for c in CONTRACTS.values() for n in c(TensorIO(4, 768, 2816, skips)).input_names()}
    assert {"control_0", "control_12", "adapter_3"} <= names
    alternatives = "|".join(map(re.escape, sorted(names)))
    pattern = re.compile(rf"""["']({alternatives})["']""")
    offenders = []
    for path in [*PRODUCT.rglob("*.py"), *(PRODUCT.parents[1] / "scripts").glob("*.py")]:
        if path.is_relative_to(PRODUCT / "models"):
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line.split("#", 1)[0]):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert offenders == []
