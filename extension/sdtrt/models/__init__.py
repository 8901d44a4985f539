"""Model contracts, one module per architecture (see base.py): its contract classes (plain, and with ControlNet
inputs), declared as input rows, and the families detection recognises as it. A new architecture (SD3's MMDiT) is
one module plus its entry in ARCHITECTURES."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdtrt.errors import SdtrtError
from sdtrt.models import ldm, sgm
from sdtrt.models.base import CallSize, FamilyDef, InputRow, ModelContract, NotServable, TensorIO, TensorSpec
from sdtrt.models.control import ControlledUNet
from sdtrt.models.convention import A1111, check_convention
from sdtrt.models.ldm import LdmUNet, LdmUNetControl
from sdtrt.models.sgm import SgmUNet, SgmUNetControl
from sdtrt.models.unet import ControlFeeds, UNetCall, split_unet_call, unet_host_call

#: Every architecture module: its contracts (named in engine keys) and its families.
ARCHITECTURES = (ldm, sgm)

CONTRACTS: dict[str, type[ModelContract]] = {c.name: c for c in (LdmUNet, LdmUNetControl, SgmUNet, SgmUNetControl)}
FAMILIES: tuple[FamilyDef, ...] = tuple(f for arch in ARCHITECTURES for f in arch.FAMILIES)

__all__ = ["ARCHITECTURES", "CONTRACTS", "FAMILIES", "CallSize", "ControlFeeds", "ControlledUNet", "FamilyDef",
           "InputRow", "LdmUNet", "LdmUNetControl", "ModelContract", "NotServable", "SgmUNet", "SgmUNetControl",
           "TensorIO", "TensorSpec", "UNetCall", "bind", "bind_record", "record_convention", "record_takes_control", "split_unet_call",
           "unet_host_call"]


def record_takes_control(record: Mapping[str, Any]) -> bool:
    """Whether the engine whose key records `record` has ControlNet inputs (False for unknown contracts)."""
    contract = CONTRACTS.get(str(record.get("contract")))
    return bool(contract is not None and contract.takes_control)


def record_convention(record: Mapping[str, Any], *, strict: bool = True) -> str:
    """The engine convention a key's io record names (A1111's when it names none: every engine built before
    conventions were recorded, and every A1111 one since). A name this version does not know: SdtrtError, or with
    `strict=False` the name as recorded (for listings; such an engine is reported stale when loaded)."""
    name = record.get("convention", A1111)
    return check_convention(name) if strict else str(name)


def bind(name: str, io: TensorIO) -> ModelContract:
    try:
        return CONTRACTS[name](io)
    except KeyError:
        raise SdtrtError(f"unknown model contract {name!r}; this version knows {', '.join(sorted(CONTRACTS))}") from None


def bind_record(record: Mapping[str, Any]) -> ModelContract:
    """The contract an engine key records (`ModelContract.record()`). Engines built before contracts were
    recorded carry only the dimensions: the UNet contract of their architecture, version 1, is theirs. A
    recorded version this code does not implement raises SdtrtError (the engine is then reported stale)."""
    y = record.get("y_dim")
    skips = tuple((int(c), int(level)) for c, level in record.get("skips") or ())
    io = TensorIO(int(record["in_channels"]), int(record["context_dim"]), None if y is None else int(y), skips,
                  record_convention(record))
    name = str(record.get("contract") or (SgmUNet.name if io.y_dim is not None else LdmUNet.name))
    contract = bind(name, io)
    version = int(record.get("contract_version", 1))
    if version != contract.version:
        raise SdtrtError(f"the engine was built for version {version} of the {name} contract; this version of "
                         f"sd-webui-trt implements version {contract.version}: rebuild the engine")
    return contract
