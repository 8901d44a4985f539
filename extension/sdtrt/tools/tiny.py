"""Tiny random-weight UNets of every family, written as A1111-format checkpoints with their config yaml.

Used by `python -m sdtrt demo` and the tests: real architecture, real key names, real context and `y` widths,
tiny channel counts. Every weight is random, the zero-initialised output conv included, so comparisons against
PyTorch cannot pass vacuously."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sdtrt.constants import (
    INPAINT_IN_CHANNELS,
    LATENT_CHANNELS,
    SD1_CONTEXT_DIM,
    SD2_CONTEXT_DIM,
    SDXL_BASE_CONTEXT_DIM,
    SDXL_BASE_Y_WIDTH,
    SDXL_REFINER_CONTEXT_DIM,
    SDXL_REFINER_Y_WIDTH,
    UNET_PREFIX,
)
from sdtrt.models.torch_unet import UNetModel, UNetSpec


def standard_spec(*, in_channels: int = LATENT_CHANNELS, model_channels: int = 32,
                  channel_mult: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
                  transformer_depth: tuple[int, ...] = (1, 1, 0), transformer_depth_middle: int = 1,
                  context_dim: int = SD1_CONTEXT_DIM, use_linear: bool = False, num_heads: int = -1,
                  num_head_channels: int = -1, adm_in_channels: int | None = None) -> UNetSpec:
    """A spec laid out like the LDM/SGM configs: output blocks use their level's transformer depth."""
    levels = len(channel_mult)
    depth_out = tuple(transformer_depth[levels - 1 - j // (num_res_blocks + 1)]
                      for j in range(levels * (num_res_blocks + 1)))
    return UNetSpec(in_channels, LATENT_CHANNELS, model_channels, channel_mult, num_res_blocks, transformer_depth,
                    depth_out, transformer_depth_middle, context_dim, use_linear, num_heads, num_head_channels,
                    adm_in_channels)


#: name -> (spec, parameterization). Head layouts are given by the yaml, as A1111 configs do.
TINY: dict[str, tuple[UNetSpec, str]] = {
    "sd1": (standard_spec(num_heads=2), "eps"),
    "sd1-inpaint": (standard_spec(in_channels=INPAINT_IN_CHANNELS, num_heads=2), "eps"),
    "sd2": (standard_spec(context_dim=SD2_CONTEXT_DIM, use_linear=True, num_head_channels=8), "eps"),
    "sd2-v": (standard_spec(context_dim=SD2_CONTEXT_DIM, use_linear=True, num_head_channels=8), "v"),
    "sdxl-base": (standard_spec(transformer_depth=(0, 1, 2), transformer_depth_middle=2,
                                context_dim=SDXL_BASE_CONTEXT_DIM, use_linear=True, num_head_channels=8,
                                adm_in_channels=SDXL_BASE_Y_WIDTH), "eps"),
    "sdxl-refiner": (standard_spec(channel_mult=(1, 2, 2, 2), transformer_depth=(0, 1, 1, 0),
                                   context_dim=SDXL_REFINER_CONTEXT_DIM, use_linear=True, num_head_channels=8,
                                   adm_in_channels=SDXL_REFINER_Y_WIDTH), "eps"),
}


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a random value of a sensible scale (weights ~ 1/sqrt(fan_in), norms ~ 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(r / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight") or name.startswith("out.0.weight") \
                    or ("in_layers.0.weight" in name) or ("out_layers.0.weight" in name):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
    return module


def tiny_unet(name: str, seed: int = 0) -> UNetModel:
    spec, _ = TINY[name]
    return randomize_(UNetModel(spec).eval().requires_grad_(False), seed)  # type: ignore[return-value]


def _yaml(spec: UNetSpec, parameterization: str) -> str:
    sgm = spec.adm_in_channels is not None
    heads = (f"num_head_channels: {spec.num_head_channels}" if spec.num_head_channels > 0
             else f"num_heads: {spec.num_heads}")
    unet = (
        f"      params:\n"
        f"        in_channels: {spec.in_channels}\n        out_channels: {spec.out_channels}\n"
        f"        model_channels: {spec.model_channels}\n        {heads}\n"
        f"        context_dim: {spec.context_dim}\n"
        f"        use_linear_in_transformer: {str(spec.use_linear_in_transformer).lower()}\n"
    )
    if sgm:
        return ("model:\n  target: sgm.models.diffusion.DiffusionEngine\n  params:\n"
                "    network_config:\n      target: sgm.modules.diffusionmodules.openaimodel.UNetModel\n"
                + unet + f"        adm_in_channels: {spec.adm_in_channels}\n")
    param = "    parameterization: v\n" if parameterization == "v" else ""
    return ("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n" + param +
            "    unet_config:\n      target: ldm.modules.diffusionmodules.openaimodel.UNetModel\n" + unet)


def write_checkpoint(spec: UNetSpec, directory: Path, stem: str, seed: int = 0, parameterization: str = "eps",
                     dtype: torch.dtype | None = None) -> Path:
    """Write a random-weight `<stem>.safetensors` (A1111 key layout) of any UNet spec and `<stem>.yaml` beside it;
    returns the checkpoint path. `dtype`: the weights' type on disk (default float32; full-size SDXL checkpoints
    are float16)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unet = randomize_(UNetModel(spec).eval().requires_grad_(False), seed)
    sd = {UNET_PREFIX + k: v.to(dtype or v.dtype).contiguous() for k, v in unet.state_dict().items()}
    del unet
    path = directory / f"{stem}.safetensors"
    save_file(sd, str(path), metadata={"format": "pt"})
    path.with_suffix(".yaml").write_text(_yaml(spec, parameterization), encoding="utf-8")
    return path


def write_tiny_checkpoint(name: str, directory: Path, seed: int = 0, *, stem: str | None = None) -> Path:
    """A tiny checkpoint of family `name` (see TINY) with its yaml; returns the checkpoint path."""
    spec, param = TINY[name]
    return write_checkpoint(spec, directory, stem or f"tiny-{name}", seed, param)
