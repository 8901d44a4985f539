"""A real lllyasviel's Forge (main dfdcbab), or a real Forge Neo, for the integration tests, offline on CPU: its data
folder with this repository linked into its extensions, a tiny random SD1 checkpoint the host recognises and a LoRA
for it, and the process (API-only, or with its UI for the browser tests) with a small client.

Forge is found through SDTRT_FORGE_DIR (a checkout set up as docs/forge/SETUP.md says; its venv at
$SDTRT_FORGE_DIR/venv, or SDTRT_FORGE_PYTHON). The model is written once per data folder with Forge's Python
(tests/integration/tiny_forge_model.py), or SDTRT_FORGE_MODEL names one already written.

Forge Neo (`NEO`, passed as `host=` to the functions below) is found through SDTRT_NEO_DIR (its `webui/` tree set up
as docs/forge/NEO_SETUP.md says; its venv at $SDTRT_NEO_DIR/venv, or SDTRT_NEO_PYTHON; SDTRT_NEO_MODEL: a model
already written). What differs: the CPU flag (`--cpu`, not `--always-cpu`), no `--ckpt`/`--ckpt-dir` (Neo loads the
one checkpoint of the data folder), and the model writer's imports (Neo's packages are modules_forge/packages and
its flags are parsed when backend.args is imported)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORGE_DIR = os.environ.get("SDTRT_FORGE_DIR", "")
STEPS = 4
CHECKPOINT = "tiny-forge-sd1"

needs_forge = pytest.mark.skipif(not FORGE_DIR, reason="SDTRT_FORGE_DIR is not set (a Forge dfdcbab checkout with "
                                 "its venv, see docs/forge/SETUP.md)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: tiny_forge_model.py run by Neo's Python (cwd = Neo's webui/): Neo's third-party packages on sys.path and its
#: flags parsed with --cpu before anything imports memory_management (the script itself sets Forge's --always-cpu,
#: which Neo ignores and would then probe CUDA)
NEO_MODEL_WRITER = """
import runpy, sys
script, out = sys.argv[1], sys.argv[2]
sys.path[:0] = ['.', 'modules_forge/packages']
sys.argv = [script, '--cpu']
import backend.args
assert backend.args.args.cpu
sys.argv = [script, out]
runpy.run_path(script, run_name='__main__')
"""


@dataclass(frozen=True)
class HostSpec:
    """Where a Forge-family host is and how it is started: its folder, Python, pre-written model (environment
    variables), CPU flag, and whether it takes --ckpt/--ckpt-dir."""

    name: str
    dir_env: str
    python_env: str
    model_env: str
    cpu_flag: str
    ckpt_flags: bool
    neo: bool = False

    @property
    def dir(self) -> str:
        return os.environ.get(self.dir_env, "")

    def python(self) -> str:
        return os.environ.get(self.python_env) or str(Path(self.dir) / "venv" / "bin" / "python")

    def model_command(self, out: Path) -> list[str]:
        script = str(ROOT / "tests" / "integration" / "tiny_forge_model.py")
        if self.neo:
            return [self.python(), "-c", NEO_MODEL_WRITER, script, str(out)]
        return [self.python(), script, str(out)]

    def ckpt_args(self, model: Path) -> list[str]:
        return ["--ckpt-dir", str(model.parent), "--ckpt", str(model)] if self.ckpt_flags else []


FORGE = HostSpec("Forge", "SDTRT_FORGE_DIR", "SDTRT_FORGE_PYTHON", "SDTRT_FORGE_MODEL", "--always-cpu", True)
NEO = HostSpec("Forge Neo", "SDTRT_NEO_DIR", "SDTRT_NEO_PYTHON", "SDTRT_NEO_MODEL", "--cpu", False, neo=True)

needs_neo = pytest.mark.skipif(not NEO.dir, reason="SDTRT_NEO_DIR is not set (a Forge Neo webui/ tree with its "
                               "venv, see docs/forge/NEO_SETUP.md)")


def forge_python(host: HostSpec | None = None) -> str:
    if host is None:
        return os.environ.get("SDTRT_FORGE_PYTHON") or str(Path(FORGE_DIR) / "venv" / "bin" / "python")
    return host.python()


class Forge:
    def __init__(self, data: Path, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.data, self.port, self.proc, self.log = data, port, proc, log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, method: str, path: str, body: Any = None, timeout: float = 600) -> tuple[int, Any]:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def get(self, path: str) -> Any:
        status, body = self.call("GET", path)
        assert status == 200, (path, status, body)
        return body

    def counters(self) -> dict[str, Any]:
        return dict(self.get("/sdtrt/v1/status")["counters"])

    def generate(self, unet: str, route: str = "txt2img", **fields: Any) -> tuple[Any, int, int, dict[str, Any]]:
        """(image as int array, engine calls, fallback calls, extra_generation_params) of one generation."""
        import numpy as np
        from PIL import Image

        body = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": STEPS, "width": 64, "height": 64,
                "seed": 1, "sampler_name": "Euler", "cfg_scale": 7, "override_settings": {"sd_unet": unet}, **fields}
        before = self.counters()
        status, answer = self.call("POST", f"/sdapi/v1/{route}", body)
        assert status == 200, answer
        after = self.counters()
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB")).astype(int)
        info = json.loads(answer["info"])
        return (image, after["engine_calls"] - before["engine_calls"],
                after["fallback_calls"] - before["fallback_calls"], dict(info.get("extra_generation_params") or {}))

    def build(self, body: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
        """POST /sdtrt/v1/engines and wait for the job: its final state (asserted done)."""
        status, job = self.call("POST", "/sdtrt/v1/engines", body)
        assert status == 202, job
        deadline = time.monotonic() + timeout
        while (state := self.get(f"/sdtrt/v1/jobs/{job['job_id']}"))["state"] not in ("done", "failed"):
            assert time.monotonic() < deadline, state
            time.sleep(2)
        assert state["state"] == "done", state
        return dict(state)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def write_lora(model: Path, out: Path, host: HostSpec | None = None) -> None:
    """A kohya LoRA for the model's UNet (tests/lora_files.py), written with the host's Python (it has
    safetensors)."""
    code = ("import sys; from safetensors.torch import load_file; sys.path.insert(0, sys.argv[3]); "
            "from lora_files import write_lora; "
            "sd = {k: v for k, v in load_file(sys.argv[1]).items() if k.startswith('model.diffusion_model.')}; "
            "write_lora(sys.argv[2], sd, 'lora', layers='attn')")
    subprocess.run([forge_python(host), "-c", code, str(model), str(out), str(ROOT / "tests")], check=True,
                   timeout=600, capture_output=True)


def prepare_data(data: Path, host: HostSpec | None = None) -> Path:
    """The host's data folder: this repository as an extension, the tiny checkpoint and a LoRA. The checkpoint's
    path."""
    (data / "extensions").mkdir(parents=True)
    (data / "extensions" / "sd-webui-trt").symlink_to(ROOT)
    ckpts = data / "models" / "Stable-diffusion"
    ckpts.mkdir(parents=True)
    model = ckpts / f"{CHECKPOINT}.safetensors"
    spec = host or FORGE
    given = os.environ.get(spec.model_env)
    if given:
        model.symlink_to(Path(given).resolve())
    else:
        subprocess.run(spec.model_command(model), cwd=FORGE_DIR if host is None else spec.dir, check=True,
                       timeout=1200, capture_output=True)
    write_lora(model, data / "models" / "Lora" / "tinylora.safetensors", host)
    return model


@contextlib.contextmanager
def running_forge(data: Path, model: Path, *, ui: bool = False, extra_args: Sequence[str] = (),
                  env: dict[str, str] | None = None, host: HostSpec | None = None) -> Iterator[Forge]:
    """The host (Forge unless `host`) started on `data` (prepared by `prepare_data`), API-only unless `ui`; stopped
    at the end, its engines removed."""
    spec = host or FORGE
    port = free_port()
    log = data / "forge.log"
    environ = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SDTRT_CACHE=str(data / "engines"),
                   **(env or {}))
    cmd = [forge_python(host), "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
           "--skip-python-version-check", "--skip-version-check", spec.cpu_flag, "--api",
           *(() if ui else ("--nowebui",)), "--port", str(port), "--server-name", "127.0.0.1", "--data-dir",
           str(data), *spec.ckpt_args(model), *extra_args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=FORGE_DIR if host is None else spec.dir, env=environ, stdout=out,
                                stderr=subprocess.STDOUT)
    client = Forge(data, port, proc, log)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{spec.name} exited with {proc.returncode}: {client.log_text()[-3000:]}")
            try:
                if client.call("GET", "/sdtrt/v1/status", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{spec.name} did not answer within 300 s: {client.log_text()[-3000:]}")
            time.sleep(1)
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(data / "engines", ignore_errors=True)


def sdtrt_errors(log: str) -> list[str]:
    """Tracebacks and error lines of our extension in Forge's log (not Forge's note that this checkout has no git
    remote to read the extension's version from)."""
    lines = log.splitlines()
    return [line for i, line in enumerate(lines) if ("sdtrt" in line or "sd-webui-trt" in line) and (
        "Error" in line or "Traceback" in line or (i + 1 < len(lines) and "Traceback" in lines[i + 1]))
        and "Failed reading extension data from Git repository" not in line]
