"""A1111 runs this with the WebUI's Python (`python install.py`, PYTHONPATH = the WebUI) at launch and when the
extension is installed from the Extensions tab, unless --skip-install.

It installs only what is missing, through A1111's own `launch.run_pip` (so --skip-install, INDEX_URL and
--prefer-binary are honoured), never uninstalls or upgrades the user's packages (the WebUI's numpy, protobuf
and torch are held as pip constraints), and does nothing, so works offline, when all is present.

What it installs:
- always: onnx, onnxruntime (the CPU backend and fallback; onnxruntime-gpu counts as present), safetensors;
- with an NVIDIA GPU: TensorRT for the CUDA major version of the WebUI's torch (tensorrt-cu12 / -cu13).
SDTRT_INSTALL_TENSORRT overrides the GPU choice: "auto" (default), "tensorrt", "rtx" (TensorRT-RTX instead),
"0" (no GPU backend).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from importlib import metadata

#: (name checked with launch.is_installed, pip requirement)
REQUIRED = [("onnx", "onnx>=1.12"), ("onnxruntime", "onnxruntime>=1.16"), ("safetensors", "safetensors>=0.4")]
#: distributions whose installed version must not move
HOST_PINS = ("numpy", "protobuf", "torch")
ENV = "SDTRT_INSTALL_TENSORRT"


def host_pins(version: Callable[[str], str] = metadata.version, *, relaxed: bool = False) -> list[str]:
    """Constraints that keep the WebUI's packages where they are. `relaxed` lets numpy and protobuf move within
    their minor version only (A1111 1.10 pins protobuf 3.20.0, and no onnx wheel for Python 3.11 accepts it,
    while 3.20.3 has one); torch never moves."""
    out = []
    for dist in HOST_PINS:
        try:
            v = version(dist)
        except metadata.PackageNotFoundError:
            continue
        parts = v.split("+")[0].split(".")
        if relaxed and dist != "torch" and len(parts) >= 2 and all(p.isdigit() for p in parts[:2]):
            out.append(f"{dist}>={v},<{parts[0]}.{int(parts[1]) + 1}")
        else:
            out.append(f"{dist}=={v}")
    return out


def torch_cuda() -> tuple[bool, int | None]:
    """(an NVIDIA GPU is usable, CUDA major version of the WebUI's torch)."""
    try:
        import torch
    except ImportError:
        return False, None
    cuda = getattr(torch.version, "cuda", None)
    major = int(cuda.split(".")[0]) if cuda else None
    try:
        gpu = major is not None and torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken driver means no GPU backend, not a failed launch
        gpu = False
    return gpu, major


def plan(is_installed: Callable[[str], bool], gpu: bool, cuda_major: int | None, choice: str) -> list[str]:
    """The pip requirements to install, in order; empty when everything is present."""
    wanted = [req for name, req in REQUIRED if not is_installed(name)]
    choice = (choice or "auto").strip().lower()
    if choice in ("0", "no", "none", "false", "off"):
        return wanted
    major = cuda_major if cuda_major in (12, 13) else 12
    if choice == "rtx":
        if not is_installed("tensorrt_rtx"):
            wanted.append(f"tensorrt-rtx-cu{major}")
    elif (choice in ("1", "yes", "true", "tensorrt") or (choice == "auto" and gpu)) and not is_installed("tensorrt"):
        wanted.append(f"tensorrt-cu{major}")
    return wanted


def install(requirement: str, run_pip: Callable[[str, str], object], pins: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(pins) + "\n")
        constraints = f.name
    try:
        run_pip(f'install "{requirement}" -c "{constraints}"', f"sd-webui-trt requirement: {requirement}")
    finally:
        os.unlink(constraints)


def install_held(requirement: str, run_pip: Callable[[str, str], object],
                 version: Callable[[str], str] = metadata.version) -> bool:
    """Install with the host's exact pins; failing that, with numpy/protobuf free within their minor version.
    Returns False (after saying what to do) when both fail: the WebUI still starts, on PyTorch."""
    for relaxed in (False, True):
        try:
            install(requirement, run_pip, host_pins(version, relaxed=relaxed))
            return True
        except RuntimeError as e:
            last = e
    print(f"sd-webui-trt: could not install {requirement} without changing the WebUI's packages ({last}). "
          f"Install it by hand into the WebUI's Python (python -m pip install \"{requirement}\"); the WebUI runs "
          "on PyTorch until then.")
    return False


def main() -> None:
    import launch  # provided by the WebUI

    for requirement in plan(launch.is_installed, *torch_cuda(), os.environ.get(ENV, "auto")):
        install_held(requirement, launch.run_pip)


if __name__ == "__main__":
    main()
