"""A ControlNet proper through the engine in the real A1111 1.10.1 with the real sd-webui-controlnet 1.1.455.

sd-webui-controlnet builds every SD1 ControlNet at SD1's full width (320 channels, 13 residuals of 320 to 1280
channels), so the UNet must have that width too: the "sd1-width" model of tiny_webui_model.py (SD1's block layout
and widths, no transformers in the levels; random weights). The ControlNet file is written by sd-webui-controlnet's
own `ControlNet` class (scripts/cldm.py, SD1 architecture: 320 channels, attention at three levels, context 768,
an RGB hint) with every weight random, zero convolutions included (zero ones would add nothing), run in the WebUI's
Python; its model guess then loads it as a ControlNet. Units get a 64x64 gradient as hint with preprocessor "none".

An engine with ControlNet inputs is built through the API; then each generation with units (weights 1 and 0.5, the
three control modes, a guidance window, two units, hires fix) must give SD Unet None's image with the same units
within 2/255 and run every UNet call on the engine, as many as the same generation without units.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .a1111_host import A1111Install, WebUIHost, clean_env, write_tiny_model
from .test_real_webui_controlnet import CONTROLNET, build_through_api, check_units_run_on_the_engine, listed_model, unit
from .test_real_webui_controlnet import controlnet_dir as controlnet_dir  # noqa: PLC0414 (the fixture, by name)
from .test_real_webui_sdtrt import sdtrt_config

pytestmark = pytest.mark.integration

CONTROLNET_STEM = "control_tiny_sd15_gradient"

#: Runs in the WebUI's Python: argv = controlnet dir, output file, seed, this folder. Instantiates
#: sd-webui-controlnet's own SD1 ControlNet class and saves every parameter random (`tiny_webui_model.randomize_`,
#: float16 as released ControlNets are).
CONTROLNET_WRITE = r'''
import sys, types
import torch
from safetensors.torch import save_file

cn_dir, path, seed, here = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, here)
from tiny_webui_model import randomize_
modules = types.ModuleType("modules")
modules.__path__ = []
devices = types.ModuleType("modules.devices")
devices.dtype_unet = torch.float32
modules.devices = devices
sys.modules.update({"modules": modules, "modules.devices": devices})
sys.path.insert(0, cn_dir)
from scripts.cldm import ControlNet

net = ControlNet(in_channels=4, model_channels=320, hint_channels=3, num_res_blocks=2, attention_resolutions=[1, 2, 4],
                 channel_mult=[1, 2, 4, 4], num_heads=8, transformer_depth=[1, 1, 1, 0], transformer_depth_middle=1,
                 context_dim=768, use_linear_in_transformer=False, use_fp16=False)
randomize_(net, seed)
sd = {"control_model." + k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()}
save_file(sd, path)
print(len(sd))
'''


@pytest.fixture(scope="module")
def width_checkpoint(a1111_install: A1111Install, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(a1111_install, tmp_path_factory.mktemp("a1111-models-width"), stem="tiny-sd1-width",
                            unet="sd1-width", timeout=1800)


def write_controlnet(install: A1111Install, controlnet_dir: Path, path: Path, seed: int = 9) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # ldm only: generative-models has a regular `scripts` package, which would shadow sd-webui-controlnet's
    # namespace package `scripts` (cldm.py falls back to ldm's blocks without sgm)
    pythonpath = str(install.root / "repositories" / "stable-diffusion-stability-ai")
    proc = subprocess.run([str(install.python), "-c", CONTROLNET_WRITE, str(controlnet_dir), str(path), str(seed),
                           str(Path(__file__).resolve().parent)],
                          env=clean_env({"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": pythonpath}),
                          capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return path


@pytest.fixture(scope="module")
def host(controlnet_dir: Path, width_checkpoint: Path, a1111_install: A1111Install,
         webui_factory: Callable[..., WebUIHost], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebUIHost]:
    data_dir = tmp_path_factory.mktemp("a1111-controlnet-sd1")
    write_controlnet(a1111_install, controlnet_dir, data_dir / "models" / "ControlNet" / f"{CONTROLNET_STEM}.safetensors")
    h = webui_factory(data_dir=data_dir, checkpoint=width_checkpoint, extensions={CONTROLNET: controlnet_dir},
                      config=sdtrt_config(tmp_path_factory.mktemp("sdtrt-cache-controlnet-sd1")))
    job = build_through_api(h, controlnet=True)
    print(f"engine with ControlNet inputs for {width_checkpoint.name} built in "
          f"{job['finished'] - job['started']:.1f}s")
    yield h
    h.stop()


@pytest.fixture(scope="module")
def controlnet_model(host: WebUIHost) -> str:
    return listed_model(host, CONTROLNET_STEM)


@pytest.mark.parametrize(("extra", "what"), [
    ({}, "ControlNet, weight 1"),
    ({"weight": 0.5, "control_mode": "My prompt is more important"}, "ControlNet, weight 0.5, prompt mode"),
    ({"control_mode": "ControlNet is more important"}, "ControlNet, ControlNet mode"),
    ({"guidance_start": 0.0, "guidance_end": 0.5}, "ControlNet, guidance window (first half)"),
])
def test_controlnet_runs_on_the_engine(host: WebUIHost, controlnet_model: str, extra: dict, what: str) -> None:  # type: ignore[type-arg]
    check_units_run_on_the_engine(host, [unit("none", controlnet_model, **extra)], what)
    assert "ControlNet" in host.log_text_since_start() and host.extension_errors() == [], host.log_tail(100)


def test_two_controlnet_units_run_on_the_engine(host: WebUIHost, controlnet_model: str) -> None:
    check_units_run_on_the_engine(host, [unit("none", controlnet_model, weight=0.7),
                                         unit("none", controlnet_model, weight=0.4,
                                              control_mode="ControlNet is more important")], "two ControlNet units")


def test_hires_fix_with_a_controlnet_runs_on_the_engine(host: WebUIHost, controlnet_model: str) -> None:
    check_units_run_on_the_engine(host, [unit("none", controlnet_model)], "ControlNet with hires fix",
                                  enable_hr=True, hr_scale=2, hr_second_pass_steps=2, denoising_strength=0.5,
                                  hr_upscaler="Latent")
