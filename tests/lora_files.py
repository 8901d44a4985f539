"""Tiny LoRA/LyCORIS files of every network type A1111 v1.10.1's built-in Lora loads, for the tests.

    write_lora(path, unet_state_dict, kind, *, rank=4, seed=0, scale=1.0, layers="attn+conv",
               diffusers_names=False, te_dim=None) -> Path
    write_broken_lora(path, how, unet_state_dict=None, *, seed=0) -> Path
    target_layers(unet_state_dict, kind, layers="attn+conv") -> [compvis module path, ...]
    network_key(path, kind="lora", diffusers_names=False) -> the file's key prefix for that layer
    sd_key(path) -> A1111's `network_layer_mapping` name ("diffusion_model_" + path with "." -> "_")

`unet_state_dict` is a UNet state dict with keys like `input_blocks.1.1.proj_in.weight` (a `model.diffusion_model.`
prefix is stripped if present); only shapes (and, for DoRA, the weights) are read. Random weights are sized so that
every targeted layer changes by roughly `0.3 * scale` of its own RMS at multiplier 1 (clearly visible in UNet
outputs, nowhere near absurd).

Kinds and what they write (key parts as A1111 reads them):
- "lora": `lora_down.weight`/`lora_up.weight` + `alpha` (= rank/2, so calc_scale 0.5) on Linear and 1x1 convs;
- "locon": as "lora", plus 3x3 resblock convs (down (r, I, 3, 3), up (O, r, 1, 1)); its first module also has
  `scale` (0.75, wins over alpha) and a weight-shaped `bias` (added to up @ down before scaling);
- "lora-cp": as "locon" but 3x3 convs as a CP decomposition (`lora_mid.weight` (r, r, 3, 3), 1x1 down);
- "lora-ab": `lora_A.weight`/`lora_B.weight` (PEFT names) + `alpha`, which A1111 drops with every other key of
  the module when it renames A/B to down/up (so calc_scale is 1);
- "dora": "locon" plus `dora_scale` ((1, I) / (1, I, 1, 1): per-input-column norms, as A1111 1.9+ expects);
- "loha": `hada_w1_a/b`, `hada_w2_a/b`, `alpha`; 3x3 convs with Tucker cores `hada_t1`/`hada_t2`;
- "lokr": `lokr_w1` full or `lokr_w1_a/b`, `lokr_w2` full (4-D on convs) or `lokr_w2_a/b`, `lokr_t2` on the first
  3x3 conv, `alpha`;
- "ia3": `weight` + `on_input` (True on ff.net.2), Linear layers only (A1111 fails ia3 on convs);
- "glora": `a1.weight`, `a2.weight`, `b1.weight`, `b2.weight`, `alpha`, Linear layers only (ditto);
- "oft": kohya-ss OFT: `oft_unet_<compvis>` prefix, `oft_blocks` (num_blocks, b, b), `alpha` chosen so the norm
  constraint clamps; b = rank;
- "oft-lycoris": new LyCORIS diag-OFT (`lora_unet_` prefix, `oft_blocks`, no constraint, `rescale` on one layer);
- "oft-diag": old LyCORIS OFT (`oft_diag`, used by A1111 as the rotation as-is);
- "boft": LyCORIS BOFT (4-D `oft_blocks` (m=2, num_blocks, b, b), `alpha` constraint);
- "full": `diff` (+ `diff_b` where the layer has a bias);
- "norm": `w_norm`/`b_norm` on GroupNorm/LayerNorm layers (ignores `layers`).

`layers`: "+"-joined of "attn" (attention/ff Linear layers, Linear proj_in/out), "conv" (resblock in_layers.2 /
out_layers.3 3x3 convs and 1x1 proj_in/out), "conv_in" (input_blocks.0.0 - an inpaint UNet pads its 4->9 channel
update), "norm" (GroupNorm/LayerNorm, for "full"); "all" = attn+conv+norm.
`diffusers_names=True` writes kohya diffusers-style names (`lora_unet_down_blocks_0_attentions_0_...`), which
A1111 converts back with convert_diffusers_name_to_compvis; layers without a round-tripping diffusers name keep the
compvis-style name (A1111's `lora_unet` -> `diffusion_model` fallback). Not allowed for "oft" (A1111 only maps
`oft_unet_` keys that are already compvis-style).
`te_dim`: also write a text-encoder LoRA (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`, width te_dim),
which must never reach the UNet.

Broken files (`write_broken_lora`): "truncated" (cut in half: safetensors cannot read it), "wrong-family" (valid
keys, shapes of a UNet twice as wide: every layer fails in calc_updown/merge), "unknown-keys" (nothing matches a
layer: loads with no modules).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."

KINDS = ("lora", "locon", "lora-cp", "lora-ab", "dora", "loha", "lokr", "ia3", "glora", "oft", "oft-lycoris",
         "oft-diag", "boft", "full", "norm")
#: kinds A1111 can only apply to Linear layers (it raises, and counts an error, on convs)
LINEAR_ONLY = ("ia3", "glora")
#: how big the per-layer update is, relative to the layer's weight RMS, at scale=1 and multiplier 1
TARGET = 0.3

_ATTN_PARTS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_k", "attn2.to_v",
               "ff.net.0.proj", "ff.net.2")
_MAX_TRANSFORMERS = 3
_MAX_RESBLOCKS = 3


def _strip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k.removeprefix(UNET_PREFIX)): v for k, v in sd.items()}


def sd_key(path: str) -> str:
    return "diffusion_model_" + path.replace(".", "_")


# ---- layer choice ---------------------------------------------------------------------------------------------------


def target_layers(unet_state_dict: Mapping[str, torch.Tensor], kind: str, layers: str = "attn+conv") -> list[str]:
    """The module paths (no '.weight') a file of this kind targets, in state-dict order."""
    sd = _strip(unet_state_dict)
    want = set(("attn+conv+norm" if layers == "all" else layers).split("+"))
    unknown = want - {"attn", "conv", "conv_in", "norm"}
    if unknown:
        raise ValueError(f"unknown layer groups {sorted(unknown)}")
    shapes = {k[:-len(".weight")]: v.shape for k, v in sd.items() if k.endswith(".weight")}
    if kind == "norm":
        want = {"norm"}
    elif kind != "full":
        want.discard("norm")
    out: list[str] = []
    transformers: list[str] = []
    resblocks: list[str] = []
    for path, shape in shapes.items():
        m = re.match(r"(.*)\.transformer_blocks\.0\.attn1\.to_q$", path)
        if m and len(transformers) < _MAX_TRANSFORMERS:
            transformers.append(m.group(1))
        m = re.match(r"(.*)\.in_layers\.2$", path)
        if m and len(resblocks) < _MAX_RESBLOCKS:
            resblocks.append(m.group(1))
    for t in transformers:
        for part in ("proj_in", *(f"transformer_blocks.0.{p}" for p in _ATTN_PARTS), "proj_out"):
            path = f"{t}.{part}"
            shape = shapes.get(path)
            if shape is None:
                continue
            if len(shape) == 2 and "attn" in want or len(shape) == 4 and "conv" in want:
                out.append(path)
        if "norm" in want:
            out += [p for p in (f"{t}.norm", f"{t}.transformer_blocks.0.norm1", f"{t}.transformer_blocks.0.norm3")
                    if p in shapes]
    for r in resblocks:
        if "conv" in want:
            out += [p for p in (f"{r}.in_layers.2", f"{r}.out_layers.3") if p in shapes]
        if "norm" in want:
            out += [p for p in (f"{r}.in_layers.0", f"{r}.out_layers.0") if p in shapes]
    if "conv_in" in want and "input_blocks.0.0" in shapes:
        out.insert(0, "input_blocks.0.0")
    if kind in LINEAR_ONLY:
        out = [p for p in out if len(shapes[p]) == 2]
    elif kind in ("lora", "lora-ab"):  # LoRA-LierLa: Linear and 1x1 convs only
        out = [p for p in out if len(shapes[p]) == 2 or tuple(shapes[p][2:]) == (1, 1)]
    order = {p: i for i, p in enumerate(shapes)}
    out = sorted(dict.fromkeys(out), key=order.__getitem__)
    if not out:
        raise ValueError(f"no {layers} layers of kind {kind} in this state dict")
    return out


# ---- names ----------------------------------------------------------------------------------------------------------

_RESNET_SUFFIX = {"in_layers_2": "conv1", "out_layers_3": "conv2", "in_layers_0": "norm1", "out_layers_0": "norm2",
                  "emb_layers_1": "time_emb_proj", "skip_connection": "conv_shortcut"}
_RESNET_SUFFIX_BACK = {v: k for k, v in _RESNET_SUFFIX.items()}


def _to_compvis(key: str) -> str | None:
    """A1111's convert_diffusers_name_to_compvis for UNet names (lora_unet_...), None when nothing matches."""
    def suffix(kind: str, s: str) -> str:
        return _RESNET_SUFFIX_BACK.get(s, s) if kind == "resnets" else s

    if m := re.match(r"lora_unet_conv_in(.*)", key):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.match(r"lora_unet_conv_out(.*)", key):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        i, kind, j, s = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_input_blocks_{1 + i * 3 + j}_{1 if kind == 'attentions' else 0}_{suffix(kind, s)}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, j, s = m[1], int(m[2]), m[3]
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else j * 2}_{suffix(kind, s)}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        i, kind, j, s = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_output_blocks_{i * 3 + j}_{1 if kind == 'attentions' else 0}_{suffix(kind, s)}"
    return None


def _diffusers_name(path: str) -> str | None:
    parts = path.split(".")
    head, rest = parts[0], parts[1:]
    name: str | None = None
    if head == "input_blocks" and len(rest) >= 2:
        n, sub, tail = int(rest[0]), int(rest[1]), "_".join(rest[2:])
        if n == 0 and not tail:
            name = "lora_unet_conv_in"
        elif n > 0 and sub in (0, 1) and tail:
            i, j = divmod(n - 1, 3)
            kind = "attentions" if sub == 1 else "resnets"
            s = _RESNET_SUFFIX.get(tail, tail) if kind == "resnets" else tail
            name = f"lora_unet_down_blocks_{i}_{kind}_{j}_{s}"
    elif head == "middle_block" and len(rest) >= 2:
        n, tail = int(rest[0]), "_".join(rest[1:])
        if n == 1:
            name = f"lora_unet_mid_block_attentions_0_{tail}"
        elif n % 2 == 0:
            name = f"lora_unet_mid_block_resnets_{n // 2}_{_RESNET_SUFFIX.get(tail, tail)}"
    elif head == "output_blocks" and len(rest) >= 3:
        n, sub, tail = int(rest[0]), int(rest[1]), "_".join(rest[2:])
        if sub in (0, 1):
            i, j = divmod(n, 3)
            kind = "attentions" if sub == 1 else "resnets"
            s = _RESNET_SUFFIX.get(tail, tail) if kind == "resnets" else tail
            name = f"lora_unet_up_blocks_{i}_{kind}_{j}_{s}"
    if name is not None and _to_compvis(name) == sd_key(path):
        return name
    return None


def network_key(path: str, kind: str = "lora", diffusers_names: bool = False) -> str:
    """The key prefix (before the first '.') this module writes for layer `path`."""
    compvis = path.replace(".", "_")
    if kind == "oft":
        if diffusers_names:
            raise ValueError("A1111 maps kohya OFT (oft_unet_) keys only when they are compvis-style")
        return f"oft_unet_{compvis}"
    if diffusers_names:
        name = _diffusers_name(path)
        if name is not None:
            return name
    return f"lora_unet_{compvis}"


# ---- weights ----------------------------------------------------------------------------------------------------------


def _factor(n: int) -> tuple[int, int]:
    """(a, b), a * b == n, a <= b, as square as possible (LyCORIS' factorization(n, -1))."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def _module(kind: str, path: str, weight: torch.Tensor, bias: torch.Tensor | None, rank: int, t: float,
            g: torch.Generator, index: int, conv_index: int) -> dict[str, torch.Tensor]:
    """The key parts (after the first '.') of one module."""
    def rn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    shape = tuple(weight.shape)
    out_dim = shape[0]
    fan_in = int(weight[0].numel())
    w_rms = float(weight.float().pow(2).mean().sqrt())
    want = t * w_rms  # the target RMS of one update entry
    is_conv = len(shape) == 4
    k = shape[2] if is_conv else 1
    in_dim = shape[1] if len(shape) > 1 else 1
    r = min(rank, out_dim, in_dim * k * k)
    w: dict[str, torch.Tensor] = {}

    if kind in ("lora", "locon", "lora-cp", "lora-ab", "dora"):
        # updown = up @ down * calc_scale; entries std = sqrt(r) * s_up * s_down * scale
        cp = kind == "lora-cp" and is_conv and k > 1
        down_shape = (r, in_dim, 1, 1) if cp else ((r, in_dim, k, k) if is_conv else (r, in_dim))
        s_down = 1 / math.sqrt(in_dim if cp else fan_in)
        # lora_A/lora_B: A1111 keeps only up/down when it renames them (alpha, scale, bias are dropped): scale 1.
        # The first locon module has `scale` (wins over alpha) and a weight-shaped `bias`.
        with_scale = kind == "locon" and index == 0
        calc_scale = 1.0 if kind == "lora-ab" else 0.75 if with_scale else 0.5
        if cp:
            mid = rn(r, r, k, k, std=1 / math.sqrt(r))
            w["lora_mid.weight"] = mid
        s_up = want / (calc_scale * math.sqrt(r) * s_down)  # with mid: the sum over n, m of r * r * (1 / r) terms
        down = rn(*down_shape, std=s_down)
        up = rn(out_dim, r, 1, 1, std=s_up) if is_conv else rn(out_dim, r, std=s_up)
        if kind == "lora-ab":
            w["lora_A.weight"], w["lora_B.weight"] = down, up
        else:
            w["lora_down.weight"], w["lora_up.weight"] = down, up
        w["alpha"] = torch.tensor(float(r) / 2)
        if with_scale:
            w["scale"] = torch.tensor(calc_scale)
            w["bias"] = rn(*shape, std=0.3 * want / calc_scale)
        if kind == "dora":
            wf = weight.float()
            col = wf.transpose(0, 1).reshape(shape[1], -1).norm(dim=1, keepdim=True)
            col = col.reshape(shape[1], *[1] * (len(shape) - 1)).transpose(0, 1)
            w["dora_scale"] = col * (1 + t * rn(*col.shape, std=0.5))
    elif kind == "loha":
        # updown = (w1a @ w1b) * (w2a @ w2b) * alpha / r; first product entries std 1, second std `want`
        w["alpha"] = torch.tensor(float(r))
        if is_conv and k > 1:
            w["hada_t1"] = rn(r, r, k, k, std=1 / r)
            w["hada_w1_a"], w["hada_w1_b"] = rn(r, out_dim), rn(r, in_dim)
            w["hada_t2"] = rn(r, r, k, k, std=want / r)
            w["hada_w2_a"], w["hada_w2_b"] = rn(r, out_dim), rn(r, in_dim)
        else:
            s = r ** -0.25
            w["hada_w1_a"], w["hada_w1_b"] = rn(out_dim, r, std=s), rn(r, fan_in, std=s)
            w["hada_w2_a"], w["hada_w2_b"] = rn(out_dim, r), rn(r, fan_in, std=want / math.sqrt(r))
    elif kind == "lokr":
        a, b = _factor(out_dim)
        c, d = _factor(in_dim)
        rr = min(r, b, d * k * k)
        w["alpha"] = torch.tensor(float(rr))
        if is_conv:
            w["lokr_w1_a"], w["lokr_w1_b"] = rn(a, rr, std=rr ** -0.25), rn(rr, c, std=rr ** -0.25)
            if conv_index == 0 and k > 1:
                w["lokr_t2"] = rn(rr, rr, k, k, std=want / rr)
                w["lokr_w2_a"], w["lokr_w2_b"] = rn(rr, b), rn(rr, d)
            else:
                w["lokr_w2"] = rn(b, d, k, k, std=want)
        elif index % 2 == 0:
            w["lokr_w1"] = rn(a, c)
            w["lokr_w2_a"], w["lokr_w2_b"] = rn(b, rr), rn(rr, d, std=want / math.sqrt(rr))
        else:
            w["lokr_w1_a"], w["lokr_w1_b"] = rn(a, rr, std=rr ** -0.25), rn(rr, c, std=rr ** -0.25)
            w["lokr_w2"] = rn(b, d, std=want)
    elif kind == "ia3":
        on_input = path.endswith("ff.net.2")
        w["weight"] = rn(in_dim if on_input else out_dim, std=t)
        w["on_input"] = torch.tensor(on_input)
    elif kind == "glora":
        # updown = b2 @ b1 + (W @ a2) @ a1
        w["alpha"] = torch.tensor(float(r))
        w["b1.weight"], w["b2.weight"] = rn(r, in_dim, std=1 / math.sqrt(in_dim)), rn(out_dim, r, std=want * math.sqrt(
            in_dim / r))
        w["a2.weight"], w["a1.weight"] = rn(in_dim, r, std=1 / math.sqrt(in_dim)), rn(r, in_dim, std=t / math.sqrt(r))
    elif kind in ("oft", "oft-lycoris", "oft-diag", "boft"):
        bsz = rank if out_dim % rank == 0 else next(s for s in (4, 2, 1) if out_dim % s == 0)
        nb = out_dim // bsz
        if kind == "oft-diag":
            w["oft_diag"] = torch.eye(bsz).expand(nb, bsz, bsz) + rn(nb, bsz, bsz, std=t / math.sqrt(bsz))
        elif kind == "boft":
            m = 2
            blocks = rn(m, nb, bsz, bsz, std=t / (2 * math.sqrt(2 * bsz * m)))
            w["oft_blocks"] = blocks
            q = blocks - blocks.transpose(-1, -2)
            w["alpha"] = torch.tensor(2.0 * float(q.norm()) / out_dim)  # loose: no clamp
        else:
            clamp = kind == "oft"
            blocks = rn(nb, bsz, bsz, std=t / (2 * math.sqrt(2 * bsz)) * (2 if clamp else 1))
            w["oft_blocks"] = blocks
            if clamp:  # the constraint halves the norm of Q
                q = blocks - blocks.transpose(-1, -2)
                w["alpha"] = torch.tensor(0.5 * float(q.norm()) / out_dim)
            if kind == "oft-lycoris" and index == 0:
                w["rescale"] = 1 + rn(out_dim, *[1] * (len(shape) - 1), std=t)
    elif kind == "full":
        w["diff"] = rn(*shape, std=want)
        if bias is not None:
            w["diff_b"] = rn(*bias.shape, std=t * max(float(bias.float().pow(2).mean().sqrt()), 0.1))
    elif kind == "norm":
        w["w_norm"] = rn(*shape, std=want)
        w["b_norm"] = rn(*shape, std=t * max(float(bias.float().pow(2).mean().sqrt()), 0.1) if bias is not None
                         else want)
    else:
        raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    return {key: v.contiguous().float() if v.is_floating_point() else v for key, v in w.items()}


def lora_state_dict(unet_state_dict: Mapping[str, torch.Tensor], kind: str, *, rank: int = 4, seed: int = 0,
                    scale: float = 1.0, layers: str = "attn+conv", diffusers_names: bool = False,
                    te_dim: int | None = None) -> dict[str, torch.Tensor]:
    """What write_lora saves."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    sd = _strip(unet_state_dict)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    conv_index = 0
    for index, path in enumerate(target_layers(sd, kind, layers)):
        weight = sd[f"{path}.weight"]
        module = _module(kind, path, weight, sd.get(f"{path}.bias"), rank, TARGET * scale, g, index, conv_index)
        conv_index += weight.ndim == 4 and weight.shape[2] > 1
        prefix = network_key(path, kind, diffusers_names)
        out.update({f"{prefix}.{part}": v for part, v in module.items()})
    if te_dim is not None:
        prefix = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        out[f"{prefix}.lora_down.weight"] = torch.randn(rank, te_dim, generator=g) / math.sqrt(te_dim)
        out[f"{prefix}.lora_up.weight"] = torch.randn(te_dim, rank, generator=g)
        out[f"{prefix}.alpha"] = torch.tensor(float(rank))
    return out


def write_lora(path: str | Path, unet_state_dict: Mapping[str, torch.Tensor], kind: str, *, rank: int = 4,
               seed: int = 0, scale: float = 1.0, layers: str = "attn+conv", diffusers_names: bool = False,
               te_dim: int | None = None) -> Path:
    """Write a tiny `.safetensors` network of `kind` for the UNet whose state dict is given; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = lora_state_dict(unet_state_dict, kind, rank=rank, seed=seed, scale=scale, layers=layers,
                              diffusers_names=diffusers_names, te_dim=te_dim)
    save_file(tensors, str(path), metadata={"ss_network_module": f"sdtrt-test.{kind}", "ss_output_name": path.stem})
    return path


def write_broken_lora(path: str | Path, how: str, unet_state_dict: Mapping[str, torch.Tensor] | None = None, *,
                      seed: int = 0) -> Path:
    """"truncated" | "wrong-family" (needs unet_state_dict) | "unknown-keys"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    if how == "truncated":
        tensors = (lora_state_dict(unet_state_dict, "lora", seed=seed) if unet_state_dict is not None else
                   {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.randn(4, 32, generator=g),
                    "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.randn(32, 4, generator=g)})
        save_file(tensors, str(path))
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif how == "wrong-family":
        if unet_state_dict is None:
            raise ValueError("wrong-family needs the UNet state dict it must not fit")
        wide = {k: torch.randn(*(2 * s if i < 2 else s for i, s in enumerate(v.shape)), generator=g) * 0.1
                for k, v in _strip(unet_state_dict).items() if k.endswith(".weight") and v.ndim in (2, 4)}
        save_file(lora_state_dict(wide, "locon", seed=seed), str(path))
    elif how == "unknown-keys":
        save_file({"lora_unet_no_such_block_0_attn1_to_q.lora_down.weight": torch.randn(4, 32, generator=g),
                   "lora_unet_no_such_block_0_attn1_to_q.lora_up.weight": torch.randn(32, 4, generator=g),
                   "lora_unet_no_such_block_0_attn1_to_q.alpha": torch.tensor(4.0),
                   "something_else.weight": torch.randn(3, generator=g)}, str(path))
    else:
        raise ValueError(f"unknown breakage {how!r}: truncated, wrong-family, unknown-keys")
    return path
