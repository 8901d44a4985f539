"""install.py as Forge's launcher runs it (`modules.launch_utils.run_extension_installer`: the extension's
install.py with Forge's Python and PYTHONPATH = Forge, its `launch.run_pip`), in the real Forge dfdcbab's venv: it
finishes without an error report, and Forge's environment keeps its pins afterwards (numpy 1.26.2, protobuf 3.20.0
from Forge's requirements_versions.txt, its torch) with onnx and onnxruntime importable and `pip check` clean."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .forge_host import FORGE_DIR, ROOT, forge_python, needs_forge

pytestmark = needs_forge

RUN_INSTALLER = ("import sys; ext = sys.argv[1]; sys.argv = ['launch.py', '--skip-torch-cuda-test']; "
                 "from modules import launch_utils; launch_utils.run_extension_installer(ext); print('installer done')")
VERSIONS = ("import numpy, google.protobuf, onnx, onnxruntime, torch; "
            "print(numpy.__version__, google.protobuf.__version__, torch.__version__)")


def pinned(name: str) -> str:
    for line in (Path(FORGE_DIR) / "requirements_versions.txt").read_text().splitlines():
        if line.strip().lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"Forge pins no {name}")


def test_install_py_through_forges_launcher_keeps_forges_pins() -> None:
    before = subprocess.run([forge_python(), "-c", VERSIONS], cwd=FORGE_DIR, capture_output=True, text=True,
                            timeout=300, check=True).stdout.split()
    run = subprocess.run([forge_python(), "-c", RUN_INSTALLER, str(ROOT)], cwd=FORGE_DIR, capture_output=True,
                         text=True, timeout=1800, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "installer done" in out, out
    assert "Error running install.py" not in out and "Traceback" not in out, out
    after = subprocess.run([forge_python(), "-c", VERSIONS], cwd=FORGE_DIR, capture_output=True, text=True,
                           timeout=300, check=True).stdout.split()
    assert after == before and after[:2] == [pinned("numpy"), pinned("protobuf")], (before, after)
    pip = subprocess.run([forge_python(), "-m", "pip", "check"], cwd=FORGE_DIR, capture_output=True, text=True,
                         timeout=300, check=False)
    assert pip.returncode == 0, pip.stdout + pip.stderr
