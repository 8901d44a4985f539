"""Write a tiny, Forge-loadable SD1 checkpoint with random weights (run with Forge's venv python, cwd = Forge root).

    cd $FORGE_DIR && venv/bin/python $REPO/tests/integration/tiny_forge_model.py OUT.safetensors [--seed N]

- UNet: SD1's block layout (2 res blocks/level, transformers at levels 0-2, 8 heads, context 768) at SD1's width
  320 (huggingface_guess recognises SD1 only with model_channels 320) narrowed with channel_mult [1,1,1,1]
  (~112 M parameters); built with sdtrt's LDM UNet (this repository's extension/, read only) and checked to load strictly
  into Forge's own IntegratedUNet2DConditionModel with the config huggingface_guess derives from the file.
- Text encoder: full-size CLIP-L (Forge's own config backend/huggingface/runwayml/stable-diffusion-v1-5/text_encoder),
  stored float16.  VAE: full-size SD VAE (Forge's IntegratedAutoencoderKL from that repo's vae config), posterior
  narrowed to a point (img2img deterministic).  Everything random (norm weights ~1, matrices ~1/sqrt(fan_in)),
  so no layer is zero.  LDM key layout: model.diffusion_model.*, cond_stage_model.transformer.text_model.*,
  first_stage_model.*.
"""
import argparse
import math
import os
import sys

import torch

FORGE = os.getcwd()
EXTENSION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "extension")
sys.path[:0] = [FORGE, os.path.join(FORGE, "packages_3rdparty"), os.path.join(FORGE, "repositories", "huggingface_guess"),
                EXTENSION]
SD15 = os.path.join(FORGE, "backend", "huggingface", "runwayml", "stable-diffusion-v1-5")


def randomize_modules_(module, seed):
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    sys.argv = sys.argv[:1] + ["--always-cpu"]  # backend.args is parsed at import; without it Forge probes CUDA
    import huggingface_guess
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtrt.models.torch_unet import UNetModel
    from sdtrt.tools.tiny import standard_spec

    sd = {}
    spec = standard_spec(model_channels=320, channel_mult=(1, 1, 1, 1), num_res_blocks=2,
                         transformer_depth=(1, 1, 1, 0), num_heads=8)
    unet = UNetModel(spec).eval().requires_grad_(False)
    randomize_modules_(unet, a.seed)
    sd.update({"model.diffusion_model." + k: v.contiguous() for k, v in unet.state_dict().items()})
    del unet

    clip = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(SD15, "text_encoder"))).eval()
    randomize_modules_(clip, a.seed + 2)
    sd.update({"cond_stage_model.transformer." + k: v.half().contiguous()
               for k, v in clip.state_dict().items() if not k.endswith("position_ids")})
    del clip

    vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(os.path.join(SD15, "vae"))).eval()
    randomize_modules_(vae, a.seed + 1)
    half = vae.quant_conv.weight.shape[0] // 2
    with torch.no_grad():  # posterior = its mean (as tests/integration/tiny_webui_model.py does for A1111)
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = -30.0
    sd.update({"first_stage_model." + k: v.contiguous() for k, v in vae.state_dict().items()})
    del vae

    # check: Forge's guess takes it for SD1.5 and its own UNet class loads the UNet keys strictly
    guess = huggingface_guess.guess(dict(sd))
    assert type(guess).__name__ == "SD15", type(guess)
    fu = IntegratedUNet2DConditionModel.from_config(guess.unet_config)
    prefix = "model.diffusion_model."
    fu.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    assert all(torch.isfinite(v.float()).all() for v in sd.values())
    save_file(sd, a.out, metadata={"format": "pt"})
    print({"out": a.out, "tensors": len(sd), "bytes": os.path.getsize(a.out), "guess": type(guess).__name__,
           "unet_config": guess.unet_config})


if __name__ == "__main__":
    main()
