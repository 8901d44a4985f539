"""install.py: what it installs on which machine, through A1111's launch helpers, with the host's pins held."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_install() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("sdtrt_install", ROOT / "install.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # importing runs nothing: main() only under __main__
    return mod


def present(*names: str):  # type: ignore[no-untyped-def]
    return lambda name: name in names


def test_plan_installs_only_what_is_missing() -> None:
    inst = load_install()
    assert inst.plan(present("onnx", "onnxruntime", "safetensors"), False, None, "auto") == []
    assert inst.plan(present("onnx", "onnxruntime", "safetensors", "tensorrt"), True, 12, "auto") == []
    assert inst.plan(present("safetensors"), False, 12, "auto") == ["onnx>=1.12", "onnxruntime>=1.16"]


@pytest.mark.parametrize(("gpu", "major", "choice", "extra"), [
    (True, 12, "auto", ["tensorrt-cu12"]),
    (True, 13, "auto", ["tensorrt-cu13"]),
    (False, 12, "auto", []),  # no GPU: onnxruntime only
    (True, 12, "0", []),
    (True, 13, "rtx", ["tensorrt-rtx-cu13"]),
    (False, None, "tensorrt", ["tensorrt-cu12"]),
])
def test_plan_picks_the_gpu_backend_for_the_cuda_major(gpu: bool, major: int | None, choice: str,
                                                       extra: list[str]) -> None:
    inst = load_install()
    assert inst.plan(present("onnx", "onnxruntime", "safetensors"), gpu, major, choice) == extra


def test_main_uses_launch_run_pip_with_host_pins_as_constraints(monkeypatch: pytest.MonkeyPatch) -> None:
    inst = load_install()
    calls: list[tuple[str, str, str]] = []

    def run_pip(command: str, desc: str) -> None:
        constraints = command.split('-c "')[1].rstrip('"')
        calls.append((command, desc, Path(constraints).read_text()))

    launch = types.SimpleNamespace(is_installed=present("safetensors", "onnx"), run_pip=run_pip)
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(inst, "torch_cuda", lambda: (True, 13))
    monkeypatch.setenv(inst.ENV, "auto")
    inst.main()
    assert [c[0].split('"')[1] for c in calls] == ["onnxruntime>=1.16", "tensorrt-cu13"]
    for _, desc, pins in calls:
        assert "sd-webui-trt" in desc
        assert "numpy==" in pins and "torch==" in pins  # installed versions held; nothing gets upgraded
    tmp = [c[0].split('-c "')[1].rstrip('"') for c in calls]
    assert not any(Path(t).exists() for t in tmp)  # constraint files cleaned up


def test_pins_relax_within_the_minor_version_only_after_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111 1.10 pins protobuf 3.20.0; no onnx wheel for Python 3.11 accepts it, 3.20.3 has one."""
    inst = load_install()
    versions = {"numpy": "1.26.2", "protobuf": "3.20.0", "torch": "2.1.2+cu121"}
    assert inst.host_pins(versions.__getitem__) == ["numpy==1.26.2", "protobuf==3.20.0", "torch==2.1.2+cu121"]
    assert inst.host_pins(versions.__getitem__, relaxed=True) == [
        "numpy>=1.26.2,<1.27", "protobuf>=3.20.0,<3.21", "torch==2.1.2+cu121"]
    tried: list[str] = []

    def run_pip(command: str, desc: str) -> None:
        tried.append(Path(command.split('-c "')[1].rstrip('"')).read_text())
        if "protobuf==3.20.0" in tried[-1]:
            raise RuntimeError("Couldn't install onnx")

    assert inst.install_held("onnx>=1.12", run_pip, versions.__getitem__)
    assert len(tried) == 2 and "protobuf>=3.20.0,<3.21" in tried[1] and "torch==2.1.2+cu121" in tried[1]

    def always_fails(command: str, desc: str) -> None:
        raise RuntimeError("no network")

    assert not inst.install_held("onnx>=1.12", always_fails, versions.__getitem__)  # reported, launch goes on


def test_nothing_to_do_runs_without_network_or_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    inst = load_install()
    launch = types.SimpleNamespace(is_installed=present("onnx", "onnxruntime", "safetensors"),
                                   run_pip=lambda *a: pytest.fail("pip must not run"))
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(inst, "torch_cuda", lambda: (False, None))
    inst.main()


def test_runs_as_a_script_like_a1111_does(tmp_path: Path) -> None:
    """A1111 runs `python install.py` with PYTHONPATH at the WebUI: with everything present it exits 0."""
    (tmp_path / "launch.py").write_text("def is_installed(n):\n    return True\n"
                                        "def run_pip(*a):\n    raise SystemExit('pip called')\n")
    r = subprocess.run([sys.executable, str(ROOT / "install.py")], check=False, env={"PYTHONPATH": str(tmp_path),
                       "SDTRT_INSTALL_TENSORRT": "0", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
