"""A1111 runs this at launch (and when the extension is installed) with the WebUI's Python.

It installs only what is missing, never uninstalls the user's packages, keeps the WebUI's own pins (numpy,
protobuf) so onnx/onnxruntime cannot upgrade them, and does nothing (works offline) when all is present.
TensorRT itself is opt-in: set SDTRT_INSTALL_TENSORRT=1 (or =rtx for TensorRT-RTX) to have it installed here.
"""

from __future__ import annotations

import os
import tempfile
from importlib import metadata

import launch  # provided by the WebUI

#: (import/distribution name, pip requirement)
REQUIRED = [("onnx", "onnx>=1.12"), ("onnxruntime", "onnxruntime>=1.16"), ("safetensors", "safetensors>=0.4")]
#: distributions whose installed version must not move
HOST_PINS = ("numpy", "protobuf", "torch")


def _pins() -> list[str]:
    out = []
    for dist in HOST_PINS:
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return out


def _install(requirement: str, desc: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(_pins()) + "\n")
        constraints = f.name
    try:
        launch.run_pip(f'install "{requirement}" -c "{constraints}"', desc)
    finally:
        os.unlink(constraints)


def main() -> None:
    for name, req in REQUIRED:
        if not launch.is_installed(name):
            _install(req, f"sd-webui-trt requirement: {req}")
    want = os.environ.get("SDTRT_INSTALL_TENSORRT", "").strip().lower()
    if want in ("1", "true", "yes", "tensorrt") and not launch.is_installed("tensorrt"):
        _install("tensorrt", "sd-webui-trt: TensorRT")
    elif want == "rtx" and not launch.is_installed("tensorrt_rtx"):
        cuda = "cu13" if (getattr(__import__("torch").version, "cuda", None) or "").startswith("13") else "cu12"
        _install(f"tensorrt-rtx-{cuda}", "sd-webui-trt: TensorRT-RTX")


main()
