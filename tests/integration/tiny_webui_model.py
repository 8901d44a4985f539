"""Write a tiny, complete SD1 model that the real A1111 WebUI can load offline (run with the WebUI's Python).

    <webui python> tiny_webui_model.py OUT_DIR [--seed N] [--stem NAME] [--unet sd1|sd1-blocks|sd1-width]

It writes, in OUT_DIR:
- `<stem>.safetensors`: every tensor of an `ldm.models.diffusion.ddpm.LatentDiffusion` in A1111's key layout.
  The UNet (`--unet`) is either `sdtrt.tools.tiny`'s "sd1" UNet (the default: 3 levels, 1 res block per level; same
  weights as `write_tiny_checkpoint("sd1", ..., seed)`) or "sd1-blocks": SD1's block layout (4 levels, 2 res
  blocks per level, channel mult 1-2-4-4, transformers at the first three levels, so input blocks 2, 5, 8 and 11
  end the levels, where a T2I-Adapter adds its features) at a tiny width (`SD1_BLOCKS_CHANNELS`), or "sd1-width":
  SD1's block layout at SD1's full width (320 channels; a ControlNet proper is always that wide) without the
  levels' transformers (the middle block keeps its one), about half of SD1's parameters; the VAE
  (4 levels, so latents are 1/8 of the image, as A1111 assumes) and the CLIP text encoder (hidden size 768,
  2 layers) get random weights too, output layers and norms included: zero output layers would make every
  image constant, and untouched norms make A1111's emphasis rescaling divide 0 by 0 for short prompts.
  One metadata key, so the file (and A1111's hash of it) is the same on every run.
- `<stem>.yaml`: the model config A1111 reads beside the checkpoint. `cond_stage_config.params.version`
  points to `OUT_DIR/<stem>-clip`, a local folder with the text encoder's `config.json` and tokenizer files
  (the real 49,408-token CLIP BPE vocabulary, taken from the installed open_clip package), so nothing is
  downloaded.

Needs, on the module path, the repository's `extension/` folder (for `sdtrt.tools.tiny`) and A1111's
`repositories/stable-diffusion-stability-ai` (for `ldm`); the caller sets PYTHONPATH.

`write_t2i_adapter()` (plain torch + safetensors, callable from the test process) writes a random-weight
T2I-Adapter whose feature widths match an "sd1-blocks" UNet, in the key layout sd-webui-controlnet recognises.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from pathlib import Path
from typing import Any

VOCAB_SIZE = 49408
CONTEXT_DIM = 768

#: UNet layouts the writer knows (see the module docstring).
UNET_LAYOUTS = ("sd1", "sd1-blocks", "sd1-width")
#: model_channels of the "sd1-blocks" UNet (SD1 has 320); its levels have 32, 64, 128 and 128 channels.
SD1_BLOCKS_CHANNELS = 32
#: The T2I-Adapter's input: an RGB image pixel-unshuffled by 8 (3 * 8 * 8 channels, as SD1 adapters take).
T2I_ADAPTER_CIN = 192
SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-to-character table of GPT-2/CLIP BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe_file() -> Path:
    import importlib.util

    for pkg in ("open_clip", "clip"):
        spec = importlib.util.find_spec(pkg)
        if spec and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                p = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
                if p.is_file():
                    return p
    raise FileNotFoundError("bpe_simple_vocab_16e6.txt.gz not found (install open_clip_torch)")


def write_clip_folder(folder: Path) -> None:
    """A tiny CLIPTextModel config plus the real CLIP tokenizer (vocab.json, merges.txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(_bpe_file(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [SOT, EOT]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        **special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
        "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": VOCAB_SIZE, "hidden_size": CONTEXT_DIM, "intermediate_size": 256,
        "projection_dim": CONTEXT_DIM, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "initializer_range": 0.02, "initializer_factor": 1.0, "attention_dropout": 0.0, "dropout": 0.0,
        "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407, "torch_dtype": "float32"}, indent=1),
        encoding="utf-8")


def unet_spec(layout: str = "sd1") -> Any:
    """The `sdtrt.models.torch_unet.UNetSpec` of a UNet layout of UNET_LAYOUTS."""
    from sdtrt.tools.tiny import TINY, standard_spec

    if layout == "sd1":
        return TINY["sd1"][0]
    if layout == "sd1-blocks":
        return standard_spec(model_channels=SD1_BLOCKS_CHANNELS, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                             transformer_depth=(1, 1, 1, 0), num_heads=2)
    if layout == "sd1-width":
        return standard_spec(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                             transformer_depth=(0, 0, 0, 0), num_heads=8)
    raise ValueError(f"unknown UNet layout {layout!r}; known: {', '.join(UNET_LAYOUTS)}")


def model_yaml(clip_folder: Path, layout: str = "sd1") -> str:
    spec = unet_spec(layout)
    # Transformers sit at the levels whose depth is non-zero; LDM selects them by downsampling factor.
    attn = [2 ** i for i, d in enumerate(spec.transformer_depth) if d]
    assert set(spec.transformer_depth) <= {0, 1} and spec.transformer_depth_middle == 1, "LDM: depth 1 only"
    heads = (f"num_head_channels: {spec.num_head_channels}" if spec.num_head_channels > 0
             else f"num_heads: {spec.num_heads}")
    return f"""\
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 8
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: {spec.in_channels}
        out_channels: {spec.out_channels}
        model_channels: {spec.model_channels}
        attention_resolutions: {attn}
        num_res_blocks: {spec.num_res_blocks}
        channel_mult: {list(spec.channel_mult)}
        {heads}
        use_spatial_transformer: True
        use_linear_in_transformer: {spec.use_linear_in_transformer}
        transformer_depth: 1
        context_dim: {spec.context_dim}
        use_checkpoint: False
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 64
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 1, 1, 1]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: {json.dumps(str(clip_folder))}
"""


def randomize_(module: Any, seed: int) -> None:
    """Random weights of a sensible scale everywhere; norm weights near 1, biases near 0 but not 0."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(r / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.1 * r)


def t2i_adapter_state_dict(model_channels: int = SD1_BLOCKS_CHANNELS, seed: int = 0) -> dict[str, Any]:
    """Random weights of an SD1 T2I-Adapter (sd-webui-controlnet's `Adapter` with sk=True, ksize 1, no conv
    downsampling, 2 res blocks per level) in the key layout its model guess recognises (`conv_in.weight` present):
    features of model_channels * (1, 2, 4, 4) channels at 1/8, 1/16, 1/32, 1/64 of the image size, as the UNet's
    levels have them. Convolutions ~ 1/sqrt(fan_in), biases small, so every feature is of order one."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {}

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        sd[f"{name}.weight"] = torch.randn(c_out, c_in, k, k, generator=g) / math.sqrt(c_in * k * k)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c_out, generator=g)

    channels = [model_channels * m for m in (1, 2, 4, 4)]
    conv("conv_in", channels[0], T2I_ADAPTER_CIN, 3)
    for i, ch in enumerate(channels):
        for r in range(2):
            name = f"body.{i * 2 + r}"
            c_in = channels[i - 1] if i > 0 and r == 0 else ch  # the first block of levels 1-3 downsamples
            if c_in != ch:
                conv(f"{name}.in_conv", ch, c_in, 1)
            conv(f"{name}.block1", ch, ch, 3)
            conv(f"{name}.block2", ch, ch, 1)
    return {k: v.contiguous() for k, v in sd.items()}


def write_t2i_adapter(path: Path, model_channels: int = SD1_BLOCKS_CHANNELS, seed: int = 0) -> Path:
    """Write `t2i_adapter_state_dict()` as a .safetensors file (one metadata key: the same bytes every run)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(t2i_adapter_state_dict(model_channels, seed), str(path), metadata={"format": "pt"})
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stem", default="tiny-sd1")
    ap.add_argument("--unet", choices=UNET_LAYOUTS, default="sd1")
    args = ap.parse_args()

    import ldm.modules.encoders.modules as encoders
    import torch
    import transformers
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from safetensors.torch import load_file, save_file

    from sdtrt.tools.tiny import write_checkpoint, write_tiny_checkpoint

    out: Path = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    clip_folder = out / f"{args.stem}-clip"
    write_clip_folder(clip_folder)

    # The UNet: exactly sdtrt.tools.tiny's (same seed -> same weights), key layout checked strictly below.
    if args.unet == "sd1":
        ckpt = write_tiny_checkpoint("sd1", out, args.seed, stem=args.stem)
    else:
        ckpt = write_checkpoint(unet_spec(args.unet), out, args.stem, args.seed)
    unet_sd = load_file(str(ckpt))
    yaml_text = model_yaml(clip_folder, args.unet)
    ckpt.with_suffix(".yaml").write_text(yaml_text, encoding="utf-8")

    # Build the whole LatentDiffusion; the text encoder from the local config (no weights file exists).
    def clip_from_config(path: str, *a: Any, **k: Any) -> Any:
        return transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(path))

    encoders.CLIPTextModel.from_pretrained = clip_from_config
    config: Any = OmegaConf.create(yaml_text)
    model = instantiate_from_config(config.model).eval()

    randomize_(model.first_stage_model, args.seed + 1)
    randomize_(model.cond_stage_model, args.seed + 2)
    prefix = "model.diffusion_model."
    model.model.diffusion_model.load_state_dict({k[len(prefix):]: v for k, v in unet_sd.items()}, strict=True)

    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    save_file(sd, str(ckpt), metadata={"format": "pt"})
    print(json.dumps({"checkpoint": str(ckpt), "yaml": str(ckpt.with_suffix(".yaml")), "clip": str(clip_folder),
                      "unet": args.unet, "tensors": len(sd), "bytes": ckpt.stat().st_size}))


if __name__ == "__main__":
    main()
