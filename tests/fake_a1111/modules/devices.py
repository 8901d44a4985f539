"""Devices and dtypes. CPU only: `device` is the CPU, but code keeps calling `.to(devices.cpu)` and
`.to(devices.device)` as in the real host. `dtype_unet` is fp16 unless `--no-half` (set in shared_init and
again when weights load)."""

from __future__ import annotations

import contextlib

import torch

cpu = torch.device("cpu")
fp8 = False
device = device_interrogate = device_gfpgan = device_esrgan = device_codeformer = None
dtype = torch.float16
dtype_vae = torch.float16
dtype_unet = torch.float16
dtype_inference = torch.float16
unet_needs_upcast = False

#: fake-only: how many times torch_gc() ran (apply_unet calls it on activation)
gc_calls = 0


def has_mps() -> bool:
    return False


def has_xpu() -> bool:
    return False


def get_optimal_device_name() -> str:
    return "cpu"


def get_optimal_device() -> torch.device:
    return cpu


def torch_gc() -> None:
    global gc_calls
    gc_calls += 1


def cond_cast_unet(input):  # type: ignore[no-untyped-def]
    return input.to(dtype_unet) if unet_needs_upcast else input


def cond_cast_float(input):  # type: ignore[no-untyped-def]
    return input.float() if unet_needs_upcast else input


def autocast(disable=False):  # type: ignore[no-untyped-def]
    """On the CPU the fake never autocasts (inputs are cast explicitly by the apply_model hijack)."""
    return contextlib.nullcontext()


def without_autocast(disable=False):  # type: ignore[no-untyped-def]
    return contextlib.nullcontext()


def first_time_calculation() -> None:
    pass


class NansException(Exception):
    pass


def test_for_nans(x, where):  # type: ignore[no-untyped-def]
    from modules import shared

    if shared.cmd_opts.disable_nan_check:
        return
    if not torch.isnan(x[(0, ) * len(x.shape)]):
        return
    raise NansException(f"A tensor with NaNs was produced in {where}.")
