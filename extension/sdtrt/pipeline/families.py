"""Model families, detected from the UNet state dict (never from file names), and the architecture spec.

Everything structural is read off tensor shapes; only what weights cannot tell (attention head layout,
eps or v prediction) comes from an A1111-style config yaml when one is given, else from the family's defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtrt.constants import (
    INPAINT_IN_CHANNELS,
    LATENT_CHANNELS,
)
from sdtrt.errors import CheckpointError, UnknownArchitecture
from sdtrt.models import FAMILIES as MODEL_FAMILIES
from sdtrt.models import FamilyDef, ModelContract, TensorIO
from sdtrt.models.convention import A1111
from sdtrt.models.torch_unet import UNetSpec

#: The supported families, keyed by what the state dict shows: (context width, y width). Each architecture module
#: of sdtrt.models declares its own.
FAMILIES: dict[tuple[int, int | None], FamilyDef] = {(f.context_dim, f.y_dim): f for f in MODEL_FAMILIES}


@dataclass(frozen=True)
class ModelInfo:
    """A detected UNet: family, variant flags and full architecture."""

    family: FamilyDef
    spec: UNetSpec
    inpaint: bool
    parameterization: str  # "eps" or "v"

    @property
    def family_id(self) -> str:
        """Family plus variants, e.g. "sd1", "sd2-v", "sd1-inpaint", "sdxl-base"."""
        name = self.family.name
        if self.parameterization == "v":
            name += "-v"
        if self.inpaint:
            name += "-inpaint"
        return name

    @property
    def io(self) -> TensorIO:
        return TensorIO(self.spec.in_channels, self.spec.context_dim, self.spec.adm_in_channels,
                        self.spec.skip_layout())

    @property
    def contract(self) -> ModelContract:
        """The model contract of this UNet's plain engines, bound to its dimensions."""
        return self.family.contract(self.io)

    def contract_for(self, controlnet: bool, convention: str = A1111) -> ModelContract:
        """The plain contract, or its variant with ControlNet inputs, for an engine following `convention`."""
        return self.family.contract.variant(controlnet)(dataclasses.replace(self.io, convention=convention))

    @property
    def arch_hash(self) -> str:
        return arch_hash(self.spec)

    def describe(self) -> str:
        s = self.spec
        extra = f", {self.parameterization}-prediction" if self.parameterization == "v" else ""
        extra += ", inpainting" if self.inpaint else ""
        return (
            f"{self.family.label}{extra} (model_channels {s.model_channels}, mult {list(s.channel_mult)}, "
            f"context {s.context_dim}" + (f", y {s.adm_in_channels}" if s.adm_in_channels else "") + ")"
        )


def arch_hash(spec: UNetSpec) -> str:
    blob = json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_BLOCK_RE = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.")


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    t = sd.get(key)
    if t is None:
        raise UnknownArchitecture(f"UNet weight {key!r} is missing; this is not an SD1/SD2/SDXL UNet")
    return tuple(t.shape)


def _depth(sd: Mapping[str, Any], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.transformer_blocks\.(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def spec_from_state_dict(sd: Mapping[str, Any], num_heads: int = -1, num_head_channels: int = -1) -> UNetSpec:
    """Read a UNetSpec off the shapes of a UNet state dict (keys without the `model.diffusion_model.` prefix)."""
    if "input_blocks.0.0.weight" not in sd:
        hint = ""
        if any(k.startswith(("joint_blocks.", "double_blocks.", "transformer_blocks.")) for k in sd):
            hint = " It looks like an MMDiT (SD3/Flux), which A1111's UNet hook cannot serve."
        raise UnknownArchitecture("no LDM UNet weights (input_blocks.0.0.weight) in this checkpoint." + hint)
    in_ch, mc = _shape(sd, "input_blocks.0.0.weight")[1], _shape(sd, "input_blocks.0.0.weight")[0]
    out_ch = _shape(sd, "out.2.weight")[0]
    n_in = 1 + max(int(m.group(2)) for k in sd if (m := _BLOCK_RE.match(k)) and m.group(1) == "input_blocks")
    n_out = 1 + max(int(m.group(2)) for k in sd if (m := _BLOCK_RE.match(k)) and m.group(1) == "output_blocks")
    downs = [k for k in sd if re.match(r"^input_blocks\.\d+\.0\.op\.weight$", k)]
    levels = len(downs) + 1
    nrb, rem = divmod(n_in - 1 - (levels - 1), levels)
    if rem or nrb < 1 or n_out != levels * (nrb + 1):
        raise UnknownArchitecture(
            f"UNet block layout not understood ({n_in} input blocks, {n_out} output blocks, {levels} levels)"
        )
    mult, depth = [], []
    for level in range(levels):
        first = 1 + level * (nrb + 1)
        mult.append(_shape(sd, f"input_blocks.{first}.0.in_layers.2.weight")[0] // mc)
        depth.append(max(_depth(sd, f"input_blocks.{first + i}.1") for i in range(nrb)))
    depth_out = [_depth(sd, f"output_blocks.{j}.1") for j in range(n_out)]
    ctx_keys = [k for k in sd if k.endswith("attn2.to_k.weight")]
    if not ctx_keys:
        raise UnknownArchitecture("the UNet has no cross-attention (attn2) layers; not a text-conditioned SD UNet")
    context_dim = _shape(sd, ctx_keys[0])[1]
    proj = [k for k in sd if k.endswith("proj_in.weight")]
    use_linear = len(_shape(sd, proj[0])) == 2
    adm = _shape(sd, "label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in sd else None
    return UNetSpec(
        in_channels=in_ch,
        out_channels=out_ch,
        model_channels=mc,
        channel_mult=tuple(mult),
        num_res_blocks=nrb,
        transformer_depth=tuple(depth),
        transformer_depth_output=tuple(depth_out),
        transformer_depth_middle=_depth(sd, "middle_block.1"),
        context_dim=context_dim,
        use_linear_in_transformer=use_linear,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        adm_in_channels=adm,
    )


@dataclass(frozen=True)
class ConfigHints:
    """What an A1111-style yaml tells beyond the weights."""

    num_heads: int = -1
    num_head_channels: int = -1
    parameterization: str | None = None
    context_dim: int | None = None
    in_channels: int | None = None


def read_config(path: Path) -> ConfigHints:
    """Read the UNet parameters of an LDM (`unet_config`) or SGM (`network_config`) config yaml."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"config yaml {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"config yaml {path} is not valid YAML: {e}") from None
    params = (doc or {}).get("model", {}).get("params", {}) if isinstance(doc, dict) else {}
    net = params.get("unet_config") or params.get("network_config") or {}
    unet = net.get("params", {}) if isinstance(net, dict) else {}
    if not unet:
        raise CheckpointError(
            f"config yaml {path} has no model.params.unet_config (LDM) or model.params.network_config (SGM)"
        )
    param = params.get("parameterization")
    scaling = str(params.get("denoiser_config", {}).get("params", {}).get("scaling_config", {}).get("target", ""))
    if "VScaling" in scaling:
        param = "v"
    ctx = unet.get("context_dim")
    return ConfigHints(
        num_heads=int(unet.get("num_heads", -1)),
        num_head_channels=int(unet.get("num_head_channels", -1)),
        parameterization=str(param) if param else None,
        context_dim=int(ctx) if isinstance(ctx, int) else None,
        in_channels=int(unet["in_channels"]) if "in_channels" in unet else None,
    )


def detect(sd: Mapping[str, Any], hints: ConfigHints | None = None) -> ModelInfo:
    """Detect family and architecture of a UNet state dict (keys without the checkpoint prefix)."""
    hints = hints or ConfigHints()
    probe = spec_from_state_dict(sd)
    family = FAMILIES.get((probe.context_dim, probe.adm_in_channels))
    if family is None:
        known = ", ".join(f"{f.label} (context {f.context_dim}" + (f", y {f.y_dim})" if f.y_dim else ")")
                          for f in FAMILIES.values())
        raise UnknownArchitecture(
            f"unknown UNet: context width {probe.context_dim}, y width {probe.adm_in_channels}. Supported: {known}"
        )
    if probe.in_channels not in (LATENT_CHANNELS, INPAINT_IN_CHANNELS):
        raise UnknownArchitecture(
            f"UNet takes {probe.in_channels} input channels; supported are {LATENT_CHANNELS} (txt2img/img2img) "
            f"and {INPAINT_IN_CHANNELS} (inpainting). instruct-pix2pix (8) is not supported"
        )
    for name, hinted, actual in (("context_dim", hints.context_dim, probe.context_dim),
                                 ("in_channels", hints.in_channels, probe.in_channels)):
        if hinted is not None and hinted != actual:
            raise CheckpointError(f"the config yaml says {name} {hinted}, but the weights have {actual}")
    heads, head_ch = hints.num_heads, hints.num_head_channels
    if heads <= 0 and head_ch <= 0:
        heads, head_ch = family.num_heads, family.num_head_channels
    spec = spec_from_state_dict(sd, num_heads=heads if head_ch <= 0 else -1, num_head_channels=head_ch)
    for ch in {spec.model_channels * m for m in spec.channel_mult}:
        n, d = spec.heads_for(ch)
        if n < 1 or d < 1 or n * d != ch:
            raise UnknownArchitecture(
                f"attention heads do not divide {ch} channels (heads {spec.num_heads}, head channels "
                f"{spec.num_head_channels}); give the model's config yaml (--config) with num_heads/num_head_channels"
            )
    return ModelInfo(family, spec, probe.in_channels == INPAINT_IN_CHANNELS, hints.parameterization or "eps")
