"""LoRA files for the headless path (`python -m sdtrt check --lora FILE:STRENGTH`): kohya/LyCORIS LoRA and LoCon
(`lora_up`/`lora_down` or `lora_A`/`lora_B`, optional `alpha`, `scale` and `lora_mid`), with A1111's key
mapping (compvis names, and diffusers-style names converted the way A1111 converts them).

Inside the WebUI no maths of ours is used: A1111's own Lora code computes every network type it supports
(LoHa, LoKr, IA3, OFT, full, norm, ...) and the extension refits the result (scripts/sdtrt_webui.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtrt.errors import SdtrtError
from sdtrt.pipeline.refit import BaseLoader, merge

UNET_KEY_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
#: weight-name suffixes of network types only A1111's code handles here
OTHER_TYPES = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "weight": "IA3", "oft_blocks": "OFT",
               "oft_diag": "OFT", "diff": "full", "w_norm": "norm", "a1.weight": "GLoRA"}


class LoraError(SdtrtError):
    """A LoRA file that cannot be applied to this UNet (damaged, another family, unknown layers or type)."""


#: Suffixes of pickle-based formats: loading one can run arbitrary code, so they are refused by name, unopened.
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


def require_safetensors(path: str | Path) -> Path:
    """Refuse a LoRA that is not a .safetensors file before anything opens it. Only safetensors is ever loaded:
    the file is never unpickled (a .pt/.ckpt can run code when unpickled); a pickle renamed to .safetensors is
    caught by the container check in `read_lora`."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        kind = "a pickle file, which can run code when loaded" if path.suffix.lower() in PICKLE_SUFFIXES else \
            "not a .safetensors file"
        raise LoraError(f"LoRA {path.name} is {kind}: only .safetensors LoRA files are used, and nothing is ever "
                        "unpickled. Convert it to safetensors (e.g. `safetensors.torch.save_file` on a state dict "
                        "you trust) or use a .safetensors release of it")
    return path


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """FILE or FILE:STRENGTH (the last ':' separates, so Windows drive letters work)."""
        head, sep, tail = text.rpartition(":")
        if sep and head and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail.strip()):
            return cls(Path(head), float(tail))
        return cls(Path(text))

    def __str__(self) -> str:
        return f"{self.path.name}:{self.strength:g}"


_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _resnet_suffix(rest: str) -> str:
    for a, b in _RESNET.items():
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest


def diffusers_to_compvis(name: str) -> str:
    """A diffusers-style UNet layer name (without `lora_unet_`) in A1111's compvis form (without `diffusion_model_`)."""
    if m := re.fullmatch(r"conv_in(.*)", name):
        return f"input_blocks_0_0{m[1]}"
    if m := re.fullmatch(r"conv_out(.*)", name):
        return f"out_2{m[1]}"
    if m := re.fullmatch(r"time_embedding_linear_(\d+)(.*)", name):
        return f"time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.fullmatch(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        suffix = _resnet_suffix(m[4]) if m[2] == "resnets" else m[4]
        return f"input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.fullmatch(r"mid_block_(attentions|resnets)_(\d+)_(.+)", name):
        suffix = _resnet_suffix(m[3]) if m[1] == "resnets" else m[3]
        return f"middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix}"
    if m := re.fullmatch(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        suffix = _resnet_suffix(m[4]) if m[2] == "resnets" else m[4]
        return f"output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.fullmatch(r"down_blocks_(\d+)_downsamplers_0_conv", name):
        return f"input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.fullmatch(r"up_blocks_(\d+)_upsamplers_0_conv", name):
        i = int(m[1])
        return f"output_blocks_{2 + i * 3}_{2 if i > 0 else 1}_conv"
    return name


def layer_map(weight_names: Iterable[str]) -> dict[str, str]:
    """{compvis layer name (dots as '_'): module path} for every module with a weight."""
    out = {}
    for name in weight_names:
        if name.endswith(".weight"):
            path = name[: -len(".weight")]
            out[path.replace(".", "_")] = path
    return out


def read_lora(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module key: {part: tensor}} of a LoRA safetensors file, e.g. {'lora_unet_x': {'lora_up.weight': ...}}."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from sdtrt.pipeline.checkpoint import check_safetensors

    path = require_safetensors(path)
    try:
        check_safetensors(path)
        tensors = load_file(str(path))
    except SdtrtError as e:
        raise LoraError(f"LoRA {path.name}: {e}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"LoRA {path.name} could not be read: {e}") from None
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, part = key.partition(".")
        groups.setdefault(module, {})[part] = tensor
    return groups


def _updown(parts: Mapping[str, torch.Tensor], shape: torch.Size, where: str) -> torch.Tensor:
    up = parts.get("lora_up.weight", parts.get("lora_B.weight"))
    down = parts.get("lora_down.weight", parts.get("lora_A.weight"))
    if up is None or down is None:
        kind = next((OTHER_TYPES[p] for p in parts if p in OTHER_TYPES), None)
        if kind is not None:
            raise LoraError(f"{where} is a {kind} network: the headless check handles LoRA/LoCon; the WebUI applies "
                            "every type through A1111's own Lora code")
        raise LoraError(f"{where} has no lora_up/lora_down weights (parts: {sorted(parts)})")
    up, down = up.float(), down.float()
    rank = down.shape[0]
    mid = parts.get("lora_mid.weight")
    if mid is not None:  # LoCon with CP decomposition: down (r,in,1,1), mid (r,r,k,k), up (out,r,1,1)
        updown = torch.einsum("or,rskl,si->oikl", up.flatten(1), mid.float(), down.flatten(1))
    elif down.dim() == 4 and down.shape[2:] != (1, 1):  # LoCon: k x k down, 1 x 1 up
        updown = torch.einsum("or,rikl->oikl", up.flatten(1), down)
    else:
        updown = up.flatten(1) @ down.flatten(1)
    if updown.numel() != torch.Size(shape).numel():
        raise LoraError(f"{where} makes an update of shape {tuple(updown.shape)} for a weight of shape "
                        f"{tuple(shape)}: the LoRA is for another model family")
    updown = updown.reshape(shape)
    if "scale" in parts:
        updown = updown * parts["scale"].float().item()
    elif "alpha" in parts:
        updown = updown * (parts["alpha"].float().item() / rank)
    return updown


def lora_weights(loras: Sequence[tuple[LoraSpec, Mapping[str, Mapping[str, torch.Tensor]]]],
                 weight_names: Iterable[str], base: BaseLoader) -> dict[str, torch.Tensor]:
    """New values of every UNet weight the LoRAs change (applied in order, each at its strength)."""
    layers = layer_map(weight_names)
    plan: list[tuple[str, LoraSpec, Mapping[str, torch.Tensor]]] = []
    for spec, groups in loras:
        unet_keys = [k for k in groups if k.startswith(UNET_KEY_PREFIX)]
        unknown = []
        for key in unet_keys:
            name = key[len(UNET_KEY_PREFIX):]
            path = layers.get(name) or layers.get(diffusers_to_compvis(name))
            if path is None:
                unknown.append(key)
            else:
                plan.append((path, spec, groups[key]))
        if unknown:
            raise LoraError(f"LoRA {spec.path.name}: {len(unknown)} of its {len(unet_keys)} UNet layers are not in "
                            f"this UNet (another model family?), e.g. {unknown[:3]}")
        if not unet_keys and not any(k.startswith(TEXT_ENCODER_PREFIXES) for k in groups):
            raise LoraError(f"LoRA {spec.path.name} has no lora_unet_/lora_te_ keys: is it a LoRA?")
    current = dict(base(sorted({f"{path}.weight" for path, _, _ in plan})))
    for path, spec, parts in plan:
        name = f"{path}.weight"
        weight = current[name]
        updown = _updown(parts, weight.shape, f"LoRA {spec.path.name} layer {path}") * spec.strength
        current[name] = merge(weight, updown)
    return current
