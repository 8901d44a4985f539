"""Write a tiny, Forge-loadable SDXL base checkpoint with random weights (run with Forge's venv python, cwd = Forge
root), the SDXL counterpart of tiny_forge_model.py (SD1):

    cd $FORGE_DIR && venv/bin/python $REPO/tests/integration/tiny_forge_sdxl.py OUT.safetensors [--seed N] [--refiner]

- UNet: what huggingface_guess (repositories/huggingface_guess, model_list.py) takes for SDXL. Its `matches` checks
  model_channels 320, use_linear_in_transformer, context_dim 2048, adm_in_channels 2816 and the list of transformer
  depths per input res block; of SDXL's family ([0,0,2,2,10,10] base, SSD-1B [0,0,2,2,4,4], Segmind Vega
  [0,0,1,1,2,2], KOALA ...) the smallest is Vega's: 3 levels of 2 res blocks, transformer depth 0/1/2, every class
  a subclass of `model_list.SDXL`, so backend/loader.py builds `StableDiffusionXL` for it. channel_mult is not
  checked: narrowed to [1,1,1] (every level 320 wide, ~100 M parameters); SDXL's 64 channels per head (5 heads).
  Built with sdtrt's LDM UNet (extension/, read only), checked to load strictly into Forge's own
  IntegratedUNet2DConditionModel with the config the guess derives from the file.
- Text encoders at SDXL's real sizes, from Forge's own configs (backend/huggingface/stabilityai/
  stable-diffusion-xl-base-1.0): CLIP ViT-L (`text_encoder`, HF layout under conditioner.embedders.0.transformer.)
  and OpenCLIP ViT-bigG's text tower (`text_encoder_2`, CLIPTextModelWithProjection, 32 layers of 1280, ~695 M
  parameters), written in the OpenCLIP layout of real SDXL files (conditioner.embedders.1.model.*) by Forge's own
  `model_list.SDXL.process_clip_state_dict_for_saving` (what Forge's "save checkpoint" writes), stored float16; the
  script checks that Forge's `process_clip_state_dict` gives the HF weights back.
- VAE: full-size SDXL VAE (Forge's IntegratedAutoencoderKL from that repo's vae config), posterior narrowed to a
  point (img2img deterministic). Everything random (norm weights ~1, matrices ~1/sqrt(fan_in)), so no layer is zero.
- `--refiner`: an SDXL refiner instead (`model_list.SDXLRefiner`: model_channels 384, context 1280, `y` 2560,
  transformer depths [0,0,4,4,4,4,0,0] = 4 levels of 2 res blocks, depth 0/4/4/0, narrowed to channel_mult
  [1,1,1,1], ~230 M parameters; 6 heads of 64), with only the bigG text tower (conditioner.embedders.0.model.*, by
  `model_list.SDXLRefiner.process_clip_state_dict_for_saving`) and the refiner repo's VAE config.
Peak memory ~5 GB (the bigG tower in float32 while it is randomised), ~1 min, 2.4 GB written (refiner ~2.2 GB)."""
import argparse
import gc
import os
import sys

import torch

FORGE = os.getcwd()
HERE = os.path.dirname(os.path.abspath(__file__))
EXTENSION = os.path.join(HERE, "..", "..", "extension")
sys.path[:0] = [FORGE, os.path.join(FORGE, "packages_3rdparty"), os.path.join(FORGE, "repositories", "huggingface_guess"),
                EXTENSION, HERE]
SDXL = os.path.join(FORGE, "backend", "huggingface", "stabilityai", "stable-diffusion-xl-base-1.0")
REFINER = os.path.join(FORGE, "backend", "huggingface", "stabilityai", "stable-diffusion-xl-refiner-1.0")

#: the UNet: Segmind Vega's transformer depths per input res block ([0,0,1,1,2,2]) at width 320, narrowed
UNET = {"model_channels": 320, "channel_mult": (1, 1, 1), "num_res_blocks": 2, "transformer_depth": (0, 1, 2),
        "transformer_depth_middle": 1, "context_dim": 2048, "use_linear": True, "num_head_channels": 64,
        "adm_in_channels": 2816}
#: the refiner's UNet: SDXLRefiner's transformer depths ([0,0,4,4,4,4,0,0]) at width 384, narrowed
UNET_REFINER = {"model_channels": 384, "channel_mult": (1, 1, 1, 1), "num_res_blocks": 2,
                "transformer_depth": (0, 4, 4, 0), "transformer_depth_middle": 1, "context_dim": 1280,
                "use_linear": True, "num_head_channels": 64, "adm_in_channels": 2560}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refiner", action="store_true", help="an SDXL refiner instead of an SDXL base")
    a = ap.parse_args()
    repo, guessed = (REFINER, "SDXLRefiner") if a.refiner else (SDXL, "SDXL")
    sys.argv = sys.argv[:1] + ["--always-cpu"]  # backend.args is parsed at import; without it Forge probes CUDA
    import huggingface_guess
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from huggingface_guess import model_list
    from safetensors.torch import save_file
    from tiny_forge_model import randomize_modules_
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdtrt.models.torch_unet import UNetModel
    from sdtrt.tools.tiny import standard_spec

    sd = {}
    unet = UNetModel(standard_spec(**(UNET_REFINER if a.refiner else UNET))).eval().requires_grad_(False)
    randomize_modules_(unet, a.seed)
    sd.update({"model.diffusion_model." + k: v.contiguous() for k, v in unet.state_dict().items()})
    del unet

    hf = {}  # the text encoders as Forge holds them (cond_stage_model.clip_l / clip_g), float16
    if not a.refiner:
        clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(SDXL, "text_encoder"))).eval()
        randomize_modules_(clip_l, a.seed + 2)
        hf.update({"clip_l.transformer." + k: v.half().contiguous() for k, v in clip_l.state_dict().items()
                   if not k.endswith("position_ids")})
        del clip_l
    g_config = os.path.join(repo, "text_encoder" if a.refiner else "text_encoder_2")
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(g_config)).eval()
    randomize_modules_(clip_g, a.seed + 3)
    clip_g.half()
    hf.update({"clip_g.transformer." + k: v.contiguous() for k, v in clip_g.state_dict().items()
               if not k.endswith("position_ids")})
    del clip_g
    gc.collect()
    saved = getattr(model_list, guessed).process_clip_state_dict_for_saving(None, dict(hf))
    saved.pop("conditioner.embedders.0.transformer.text_model.embeddings.position_ids", None)
    sd.update({k: v.contiguous() for k, v in saved.items()})
    del saved

    vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(os.path.join(repo, "vae"))).eval()
    randomize_modules_(vae, a.seed + 1)
    half = vae.quant_conv.weight.shape[0] // 2
    with torch.no_grad():  # posterior = its mean (as tests/integration/tiny_webui_model.py does for A1111)
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = -30.0
    sd.update({"first_stage_model." + k: v.contiguous() for k, v in vae.state_dict().items()})
    del vae

    # checks: Forge's guess takes it for (a subclass of) SDXL / SDXLRefiner, its own UNet class loads the UNet keys
    # strictly, and its clip conversion gives the text encoders' HF weights back
    guess = huggingface_guess.guess(dict(sd))
    assert isinstance(guess, getattr(model_list, guessed)), type(guess)
    assert a.refiner or not isinstance(guess, model_list.SDXLRefiner), type(guess)
    fu = IntegratedUNet2DConditionModel.from_config(guess.unet_config)
    prefix = "model.diffusion_model."
    fu.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    del fu
    back = guess.process_clip_state_dict(dict(sd))
    back = {k: v for k, v in back.items() if k.startswith(("clip_l.", "clip_g."))}
    missing = sorted(set(hf) - set(back))
    assert not missing, missing[:5]
    assert all(torch.equal(back[k], hf[k]) for k in hf), [k for k in hf if not torch.equal(back[k], hf[k])][:5]
    del back, hf
    assert all(torch.isfinite(v.float()).all() for v in sd.values())
    save_file(sd, a.out, metadata={"format": "pt"})
    print({"out": a.out, "tensors": len(sd), "bytes": os.path.getsize(a.out), "guess": type(guess).__name__,
           "unet_config": guess.unet_config})


if __name__ == "__main__":
    main()
