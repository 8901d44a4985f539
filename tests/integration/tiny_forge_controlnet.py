"""Write a random ControlNet for the tiny Forge SD1 checkpoint, in the layout Forge's built-in ControlNet loads
(run with Forge's venv python, cwd = Forge root):

    cd $FORGE_DIR && venv/bin/python $REPO/tests/integration/tiny_forge_controlnet.py MODEL.safetensors OUT.safetensors
    (Forge Neo: its webui/ folder and venv, and --cpu-flag=--cpu)

The ControlNet is Forge's own `backend.nn.cnets.cldm.ControlNet` built with the UNet config Forge's model guess
derives from the checkpoint's UNet (so its 13 residuals have the UNet's skip shapes) and a 3-channel hint, every
weight random (zero convolutions included: a released ControlNet's are trained away from zero), saved float16 with
the `control_model.` prefix of released LDM ControlNets. Checked before saving (where its modules import outside the
WebUI: lllyasviel's Forge): Forge's ControlNetPatcher builds a ControlNet from the file."""
import argparse
import inspect
import os
import sys

FORGE = os.getcwd()
# (Forge's third-party packages; Forge Neo keeps them in modules_forge/packages)
sys.path[:0] = [FORGE, os.path.join(FORGE, "packages_3rdparty"), os.path.join(FORGE, "repositories", "huggingface_guess"),
                os.path.join(FORGE, "modules_forge", "packages")]

from tiny_forge_model import randomize_modules_  # this folder: the same random initialisation


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--cpu-flag", default="--always-cpu", help="the host's CPU flag (Forge Neo: --cpu)")
    a = ap.parse_args()
    sys.argv = sys.argv[:1] + [a.cpu_flag]  # backend.args is parsed at import; without it Forge probes CUDA
    from backend.nn.cnets import cldm
    from huggingface_guess.detection import model_config_from_unet
    from safetensors.torch import load_file, save_file

    prefix = "model.diffusion_model."
    unet_sd = {k: v for k, v in load_file(a.model).items() if k.startswith(prefix)}
    config = dict(model_config_from_unet(unet_sd, prefix, True).unet_config)
    config.pop("out_channels", None)
    config.pop("dtype", None)
    if "hint_width" in inspect.signature(cldm.ControlNet.__init__).parameters:
        config["hint_width"] = 16  # Forge Neo asks the hint block's first width (released ControlNets': 16)
    net = cldm.ControlNet(hint_channels=3, **config).eval().requires_grad_(False)
    randomize_modules_(net, a.seed)
    sd = {"control_model." + k: v.half().contiguous() for k, v in net.state_dict().items()}

    try:
        from modules_forge.supported_controlnet import ControlNetPatcher

        patcher = ControlNetPatcher.try_build_from_state_dict(dict(sd), a.out)
        assert patcher is not None and type(patcher.model_patcher).__name__ == "ControlNet", patcher
    except ImportError:  # Forge Neo's modules import each other circularly outside its launcher: its test loads it
        pass
    save_file(sd, a.out)
    print({"out": a.out, "tensors": len(sd), "bytes": os.path.getsize(a.out), "config": config})


if __name__ == "__main__":
    main()
