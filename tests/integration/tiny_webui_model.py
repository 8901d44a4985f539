"""Write a tiny, complete SD1 model that the real A1111 WebUI can load offline (run with the WebUI's Python).

    <webui python> tiny_webui_model.py OUT_DIR [--seed N] [--stem NAME]
                   [--unet sd1|sd1-blocks|sd1-width|sd1-inpaint|sdxl-base|sdxl-refiner]

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
  image constant, and untouched norms make A1111's emphasis rescaling divide 0 by 0 for short prompts. The VAE
  encoder's posterior is a point (`narrow_vae_posterior_`), so img2img does not depend on torch's global RNG.
  One metadata key, so the file (and A1111's hash of it) is the same on every run.
  "sd1-inpaint": `sdtrt.tools.tiny`'s 9-channel "sd1-inpaint" UNet (4 latent + 4 masked-image latent + 1 mask
  channels) in an `ldm.models.diffusion.ddpm.LatentInpaintDiffusion` (conditioning_key hybrid), as A1111's
  configs/v1-inpainting-inference.yaml has it; the VAE and text encoder as for "sd1".
- "sdxl-base" / "sdxl-refiner" (`write_sdxl()`): an `sgm.models.diffusion.DiffusionEngine` laid out as
  generative-models' configs/inference/sd_xl_base.yaml / sd_xl_refiner.yaml (the yaml A1111 reads for SDXL), built
  with sgm's own classes: a tiny UNet with SDXL's block layout (sgm's openaimodel UNetModel; context 2048 and
  adm_in_channels 2816 for the base, context 1280 and 2560 for the refiner), a tiny VAE, and the text encoders at
  their real architectures with random weights: CLIP ViT-L/14's text model (12 layers, 768 wide; the base's first
  embedder, its tokenizer from a local folder) and OpenCLIP ViT-bigG-14's text tower (32 layers, 1280 wide, ~695M
  values; the base's second embedder and the refiner's only one), stored in float16 (everything else float32).
- `<stem>.yaml`: the model config A1111 reads beside the checkpoint. `cond_stage_config.params.version`
  points to `OUT_DIR/<stem>-clip`, a local folder with the text encoder's `config.json` and tokenizer files
  (the real 49,408-token CLIP BPE vocabulary, taken from the installed open_clip package), so nothing is
  downloaded.

Needs, on the module path, the repository's `extension/` folder (for `sdtrt.tools.tiny`) and A1111's
`repositories/stable-diffusion-stability-ai` (for `ldm`) and `repositories/generative-models` (for `sgm`, SDXL
only); the caller sets PYTHONPATH.

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
UNET_LAYOUTS = ("sd1", "sd1-blocks", "sd1-width", "sd1-inpaint", "sdxl-base", "sdxl-refiner")
#: The layouts written as SGM (SDXL) models by `write_sdxl()`.
SDXL_LAYOUTS = ("sdxl-base", "sdxl-refiner")
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


#: CLIP ViT-L/14's text model (openai/clip-vit-large-patch14), the first text encoder of SDXL base.
CLIP_VIT_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768, "num_hidden_layers": 12,
                   "num_attention_heads": 12}


def write_clip_folder(folder: Path, text_config: dict[str, Any] | None = None) -> None:
    """A CLIPTextModel config (tiny, or `text_config` over it) plus the real CLIP tokenizer (vocab.json,
    merges.txt)."""
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
        "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407, "torch_dtype": "float32",
        **(text_config or {})}, indent=1), encoding="utf-8")


def unet_spec(layout: str = "sd1") -> Any:
    """The `sdtrt.models.torch_unet.UNetSpec` of a UNet layout of UNET_LAYOUTS."""
    from sdtrt.tools.tiny import TINY, standard_spec

    if layout in ("sd1", "sd1-inpaint"):
        return TINY[layout][0]
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
    # An inpainting model as configs/v1-inpainting-inference.yaml has it: the mask and the masked image's latent
    # are concatenated to the UNet's input (conditioning_key hybrid), no finetuning from another checkpoint.
    inpaint = layout == "sd1-inpaint"
    target = "LatentInpaintDiffusion" if inpaint else "LatentDiffusion"
    conditioning = "hybrid\n    finetune_keys: null" if inpaint else "crossattn"
    return f"""\
model:
  target: ldm.models.diffusion.ddpm.{target}
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
    conditioning_key: {conditioning}
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


def narrow_vae_posterior_(vae: Any) -> None:
    """Make the VAE encoder's posterior a point: its log-variance at LDM's floor (-30, a standard deviation of 3e-7).

    LDM encodes an img2img / inpainting init image by sampling that posterior with torch's global RNG, whose state
    A1111 leaves to whatever ran before (the previous generation's seed and noise, a model load), and a random VAE's
    posterior is wide: two identical img2img requests would start from latents differing by ~30/255 in the image
    (seen here: the first request after the start differs from every later one). Real VAEs' posteriors are narrow;
    with this one the sample is the mean, so identical requests give identical images whatever ran before."""
    import torch

    half = vae.quant_conv.weight.shape[0] // 2  # quant_conv's outputs: mean channels, then log-variance channels
    with torch.no_grad():
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = -30.0


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


# ---- SDXL (sgm) ------------------------------------------------------------------------------------------------
#: The tiny UNets' parameters beside the real ones (configs/inference/sd_xl_base.yaml / sd_xl_refiner.yaml):
#: SDXL's block layout (3 levels for the base, 4 for the refiner, 2 res blocks each, transformers at the second and
#: third level, linear projections, heads by channel count) at 32 channels instead of 320 / 384, with transformer
#: depths 1 (and 2 in the base's third level and middle block, where the real base has 10) instead of 2-10.
SDXL_UNETS: dict[str, dict[str, Any]] = {
    "sdxl-base": {"adm_in_channels": 2816, "model_channels": 32, "channel_mult": [1, 2, 4],
                  "transformer_depth": [1, 1, 2], "context_dim": 2048},
    "sdxl-refiner": {"adm_in_channels": 2560, "model_channels": 32, "channel_mult": [1, 2, 4, 4],
                     "transformer_depth": 1, "context_dim": [1280, 1280, 1280, 1280]},
}
SDXL_HEAD_CHANNELS = 8

_SDXL_DENOISER = """\
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000

        weighting_config:
          target: sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization
"""

_SDXL_CLIP_L = """\
          # crossattn cond
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              version: {version}
              layer: hidden
              layer_idx: 11
"""

_SDXL_CLIP_G = """\
          # crossattn and vector cond
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: ViT-bigG-14
              version: laion2b_s39b_b160k
              freeze: True
              layer: penultimate
              always_return_pooled: True
              legacy: False
"""


def _size_embedder(key: str) -> str:
    return f"""\
          # vector cond
          - is_trainable: False
            input_key: {key}
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
"""


def sdxl_yaml(layout: str, clip_folder: Path | None) -> str:
    """The config A1111 reads beside an SDXL checkpoint: the structure of generative-models'
    configs/inference/sd_xl_base.yaml (`sdxl-base`) or sd_xl_refiner.yaml (`sdxl-refiner`), with the tiny UNet of
    SDXL_UNETS, a tiny VAE (4 levels of 32 channels: latents are 1/8 of the image), and the base's CLIP ViT-L
    tokenizer and config read from `clip_folder`."""
    u = SDXL_UNETS[layout]
    if layout == "sdxl-base":
        assert clip_folder is not None
        embedders = (_SDXL_CLIP_L.format(version=json.dumps(str(clip_folder))) + _SDXL_CLIP_G
                     + "".join(_size_embedder(k) for k in ("original_size_as_tuple", "crop_coords_top_left",
                                                           "target_size_as_tuple")))
    else:
        embedders = _SDXL_CLIP_G + "".join(_size_embedder(k) for k in ("original_size_as_tuple",
                                                                       "crop_coords_top_left", "aesthetic_score"))
    return f"""\
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True

{_SDXL_DENOISER}
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: {u["adm_in_channels"]}
        num_classes: sequential
        use_checkpoint: True
        in_channels: 4
        out_channels: 4
        model_channels: {u["model_channels"]}
        attention_resolutions: [4, 2]
        num_res_blocks: 2
        channel_mult: {u["channel_mult"]}
        num_head_channels: {SDXL_HEAD_CHANNELS}
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: {u["transformer_depth"]}
        context_dim: {u["context_dim"]}
        spatial_transformer_attn_type: softmax-xformers
        legacy: False

    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
{embedders}
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          attn_type: vanilla-xformers
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 1, 1, 1]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""


def randomize_modules_(module: Any, seed: int) -> None:
    """Random values for every parameter, decided by the layer that holds it: norm layers' weights near 1 and
    biases near 0 (not 0), every other matrix or kernel ~ 1/sqrt(fan_in), every other vector and scalar small.
    Nothing stays zero: LDM/SGM zero-initialise the UNet's output convolution (and each block's last layer), which
    would make every prediction zero."""
    import torch

    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in module.named_modules():
            for name, p in mod.named_parameters(recurse=False):
                r = torch.randn(p.shape, generator=g)
                if isinstance(mod, norms) and name == "weight":
                    p.copy_(1.0 + 0.1 * r)
                elif p.ndim > 1:
                    p.copy_(r / math.sqrt(p[0].numel()))
                else:
                    p.copy_(0.1 * r)


class _LayersOnMeta:
    """Build Linear / Conv2d / MultiheadAttention weights on the meta device while the model is constructed (as
    A1111's InitializeOnMeta does), so OpenCLIP's ViT-bigG image tower (~1.8G values, deleted right away by sgm's
    embedder) costs neither memory nor time; `materialize()` then gives every meta parameter real storage."""

    def __enter__(self) -> None:
        import torch

        self.saved = [(cls, cls.__init__) for cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention)]
        for cls, init in self.saved:
            def on_meta(self_: Any, *a: Any, __init: Any = init, **k: Any) -> None:
                k["device"] = "meta"
                __init(self_, *a, **k)
            cls.__init__ = on_meta  # type: ignore[method-assign,assignment]
        self.module_to = torch.nn.Module.to
        torch.nn.Module.to = lambda self_, *a, **k: self_  # type: ignore[method-assign,assignment]

    def __exit__(self, *exc: object) -> None:
        import torch

        for cls, init in self.saved:
            cls.__init__ = init  # type: ignore[method-assign]
        torch.nn.Module.to = self.module_to  # type: ignore[method-assign]

    @staticmethod
    def materialize(module: Any) -> None:
        import torch

        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and p.is_meta:
                    mod._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                               requires_grad=False)


def write_sdxl(out: Path, stem: str, seed: int, layout: str) -> dict[str, Any]:
    """Write `<stem>.safetensors` and `<stem>.yaml` (and, for the base, `<stem>-clip-l/`) of an SDXL base or refiner
    (see the module docstring): the model is built from the yaml with sgm's classes, offline (the CLIP text model
    from its local config, OpenCLIP without pretrained weights, as A1111 builds them), every weight random."""
    import open_clip
    import sgm.modules.attention
    import sgm.modules.encoders.modules as sgm_encoders
    import torch
    import transformers
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from sgm.util import instantiate_from_config

    clip_folder = None
    if layout == "sdxl-base":
        clip_folder = out / f"{stem}-clip-l"
        write_clip_folder(clip_folder, CLIP_VIT_L_TEXT)
    yaml_text = sdxl_yaml(layout, clip_folder)
    ckpt = out / f"{stem}.safetensors"
    ckpt.with_suffix(".yaml").write_text(yaml_text, encoding="utf-8")

    config: Any = OmegaConf.create(yaml_text)
    config.model.params.first_stage_config.params.ddconfig.attn_type = "vanilla"  # A1111's repair without xformers
    sgm.modules.attention.XFORMERS_IS_AVAILABLE = False  # as A1111 sets it (the UNet's attention: plain softmax)

    def clip_from_config(path: str, *a: Any, **k: Any) -> Any:
        return transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(path))

    create = open_clip.create_model_and_transforms

    def create_without_pretrained(*a: Any, pretrained: Any = None, **k: Any) -> Any:
        return create(*a, pretrained=None, **k)

    saved_from_pretrained = sgm_encoders.CLIPTextModel.from_pretrained
    sgm_encoders.CLIPTextModel.from_pretrained = clip_from_config
    open_clip.create_model_and_transforms = create_without_pretrained
    try:
        with _LayersOnMeta():
            model = instantiate_from_config(config.model)
    finally:
        sgm_encoders.CLIPTextModel.from_pretrained = saved_from_pretrained
        open_clip.create_model_and_transforms = create
    _LayersOnMeta.materialize(model)
    model = model.eval().requires_grad_(False)
    randomize_modules_(model.model, seed)
    randomize_modules_(model.first_stage_model, seed + 1)
    randomize_modules_(model.conditioner, seed + 2)

    sd = {}
    for k, v in model.state_dict().items():
        assert not v.is_meta, k
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
            if k.startswith("conditioner."):
                v = v.half()  # ViT-bigG's text tower is ~695M values: 1.4 GB in float16, as SDXL files store it
        sd[k] = v.detach().contiguous().clone()
    del model
    save_file(sd, str(ckpt), metadata={"format": "pt"})
    unet_values = sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model."))
    text_values = sum(v.numel() for k, v in sd.items() if k.startswith("conditioner."))
    return {"checkpoint": str(ckpt), "yaml": str(ckpt.with_suffix(".yaml")),
            "clip": str(clip_folder) if clip_folder else None, "unet": layout, "tensors": len(sd),
            "unet_values": unet_values, "text_values": text_values, "bytes": ckpt.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stem", default="tiny-sd1")
    ap.add_argument("--unet", choices=UNET_LAYOUTS, default="sd1")
    args = ap.parse_args()
    out: Path = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.unet in SDXL_LAYOUTS:
        print(json.dumps(write_sdxl(out, args.stem, args.seed, args.unet)))
        return

    import ldm.modules.encoders.modules as encoders
    import torch
    import transformers
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from safetensors.torch import load_file, save_file

    from sdtrt.tools.tiny import write_checkpoint, write_tiny_checkpoint

    clip_folder = out / f"{args.stem}-clip"
    write_clip_folder(clip_folder)

    # The UNet: exactly sdtrt.tools.tiny's (same seed -> same weights), key layout checked strictly below.
    if args.unet in ("sd1", "sd1-inpaint"):
        ckpt = write_tiny_checkpoint(args.unet, out, args.seed, stem=args.stem)
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
    narrow_vae_posterior_(model.first_stage_model)
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
