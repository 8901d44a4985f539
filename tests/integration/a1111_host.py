"""Run the real AUTOMATIC1111 WebUI, with this repository installed as an extension, for integration tests.

Configuration comes from the environment, never from paths in this file:

- SDTRT_A1111_DIR: an A1111 checkout (v1.10.x) whose `repositories/` are in place;
- SDTRT_A1111_PYTHON: its Python (default `<SDTRT_A1111_DIR>/venv/bin/python`);
- SDTRT_A1111_START_TIMEOUT: seconds to wait for the API (default 300);
- SDTRT_CONTROLNET_DIR: a checkout of sd-webui-controlnet for the tests that run it beside this extension (default
  `<SDTRT_A1111_DIR>/extensions/sd-webui-controlnet`).

`WebUIHost(install, data_dir)` prepares a data dir (a tiny SD1 model written by `tiny_webui_model.py`, a seeded
`config.json`, this repository symlinked as `extensions/sd-webui-trt`), starts `launch.py` offline on CPU in its
own process group, waits for the API and for the start-up checkpoint load (`wait_model=False`: the API only),
and stops it (the whole group) on `stop()` / leaving the `with` block.
The server's output goes to `<data_dir>/webui.log`; `log_tail()` returns its end for failure messages.
`extensions={"name": path}` links other extensions into the data dir beside this one.
`ui=True` starts the Gradio UI as well (`--api` without `--nowebui`), for browser tests.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

ENV_DIR = "SDTRT_A1111_DIR"
ENV_PYTHON = "SDTRT_A1111_PYTHON"
ENV_TIMEOUT = "SDTRT_A1111_START_TIMEOUT"
ENV_CONTROLNET = "SDTRT_CONTROLNET_DIR"

#: The repository root (this file is tests/integration/a1111_host.py).
REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSION_NAME = "sd-webui-trt"
MODEL_SCRIPT = Path(__file__).resolve().with_name("tiny_webui_model.py")
CHECKPOINT_STEM = "tiny-sd1"

#: Settings written to config.json before the first start. `sd_unet` must be present there, or a
#: per-request `override_settings={"sd_unet": ...}` is never restored; live previews are off (they
#: would fetch approximation models).
DEFAULT_CONFIG: dict[str, Any] = {"sd_unet": "Automatic", "live_previews_enable": False}


#: Lines A1111 v1.10 prints once the start-up checkpoint load has ended (modules/sd_models.py, initialize.py).
MODEL_LOADED = "Model loaded in "
STARTED = "Startup time:"
MODEL_FAILED = "Stable diffusion model failed to load"


class HostError(RuntimeError):
    pass


@dataclass(frozen=True)
class A1111Install:
    root: Path
    python: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> A1111Install | None:
        """The installation named by SDTRT_A1111_DIR, or None when the variable is unset or empty."""
        env = os.environ if environ is None else environ
        root = env.get(ENV_DIR, "").strip()
        if not root:
            return None
        python = env.get(ENV_PYTHON, "").strip() or str(Path(root) / "venv" / "bin" / "python")
        return cls(Path(root).expanduser().resolve(), Path(python).expanduser())

    def controlnet_dir(self, environ: Mapping[str, str] | None = None) -> Path:
        """Where sd-webui-controlnet is checked out (SDTRT_CONTROLNET_DIR, else the WebUI's own extensions/)."""
        env = os.environ if environ is None else environ
        given = env.get(ENV_CONTROLNET, "").strip()
        return Path(given).expanduser().resolve() if given else self.root / "extensions" / "sd-webui-controlnet"

    def problems(self) -> list[str]:
        out = []
        if not (self.root / "launch.py").is_file():
            out.append(f"{ENV_DIR}={self.root}: no launch.py there")
        if not (self.root / "repositories" / "stable-diffusion-stability-ai" / "ldm").is_dir():
            out.append(f"{ENV_DIR}={self.root}: repositories/stable-diffusion-stability-ai is missing")
        if not os.access(self.python, os.X_OK):
            out.append(f"{ENV_PYTHON}={self.python}: not an executable")
        return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the WebUI's processes: offline, and nothing of the test runner's Python leaking in."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "COMMANDLINE_ARGS")
           and not k.startswith("PYTEST_")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "GRADIO_ANALYTICS_ENABLED": "False", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONIOENCODING": "utf-8"})
    if extra:
        env.update(extra)
    return env


def write_tiny_model(install: A1111Install, out_dir: Path, *, seed: int = 0, stem: str = CHECKPOINT_STEM,
                     unet: str = "sd1", timeout: float = 600) -> Path:
    """Write the tiny SD1 model (checkpoint, yaml, local CLIP folder) with the WebUI's Python; returns the
    checkpoint path. `unet`: the UNet layout (tiny_webui_model.UNET_LAYOUTS; "sdxl-base" and "sdxl-refiner" write
    an SDXL model)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pythonpath = os.pathsep.join([str(REPO_ROOT / "extension"),
                                  str(install.root / "repositories" / "stable-diffusion-stability-ai"),
                                  str(install.root / "repositories" / "generative-models")])
    proc = subprocess.run(
        [str(install.python), str(MODEL_SCRIPT), str(out_dir), "--seed", str(seed), "--stem", stem, "--unet", unet],
        cwd=str(out_dir), env=clean_env({"PYTHONPATH": pythonpath}), capture_output=True, text=True,
        timeout=timeout, check=False)
    if proc.returncode != 0:
        raise HostError(f"writing the tiny model failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                        f"{proc.stderr[-6000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return Path(info["checkpoint"])


class WebUIHost:
    """One WebUI server process over one data dir. Use as a context manager, or call start()/stop()."""

    def __init__(self, install: A1111Install, data_dir: Path, *, ui: bool = False,
                 extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 config: Mapping[str, Any] | None = None, link_extension: bool = True,
                 checkpoint: Path | None = None, seed: int = 0, wait_model: bool = True,
                 auth: tuple[str, str] | None = None, extensions: Mapping[str, Path] | None = None) -> None:
        self.install = install
        self.data_dir = Path(data_dir).resolve()
        self.ui = ui
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.config = dict(DEFAULT_CONFIG if config is None else config)
        self.link_extension = link_extension
        self.other_extensions = {name: Path(path) for name, path in (extensions or {}).items()}
        self.seed = seed
        self.wait_model = wait_model
        self.auth = auth  # HTTP Basic credentials sent by request() (for servers started with --api-auth)
        self._log_start = 0
        self.ckpt_dir = self.data_dir / "models" / "Stable-diffusion"
        self.checkpoint = checkpoint
        self.log_path = self.data_dir / "webui.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None

    # ---- setup -----------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def extension_dir(self) -> Path:
        return self.data_dir / "extensions" / EXTENSION_NAME

    def prepare(self) -> None:
        """Write what the server needs into the data dir; idempotent (a later start reuses it)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.checkpoint is None:
            ckpt = self.ckpt_dir / f"{CHECKPOINT_STEM}.safetensors"
            self.checkpoint = ckpt if ckpt.is_file() else write_tiny_model(self.install, self.ckpt_dir,
                                                                             seed=self.seed)
        else:
            self.ckpt_dir = self.checkpoint.parent
        cfg = self.data_dir / "config.json"
        if not cfg.exists():
            cfg.write_text(json.dumps(self.config, indent=1), encoding="utf-8")
        if self.link_extension:
            self.extension_dir.parent.mkdir(parents=True, exist_ok=True)
            if not self.extension_dir.is_symlink():
                if self.extension_dir.exists():
                    shutil.rmtree(self.extension_dir)
                self.extension_dir.symlink_to(REPO_ROOT, target_is_directory=True)
        for name, path in self.other_extensions.items():
            link = self.data_dir / "extensions" / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(path.resolve(), target_is_directory=True)

    def command(self) -> list[str]:
        assert self.checkpoint is not None
        args = [str(self.install.python), "launch.py",
                "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
                "--use-cpu", "all", "--no-half", "--precision", "full", "--api",
                "--port", str(self.port), "--server-name", "127.0.0.1",
                "--data-dir", str(self.data_dir), "--ckpt-dir", str(self.ckpt_dir), "--ckpt", str(self.checkpoint),
                "--no-download-sd-model"]
        if not self.ui:
            args.append("--nowebui")
        return args + self.extra_args

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> WebUIHost:
        if self.proc is not None:
            raise HostError("already started")
        self.prepare()
        timeout = float(os.environ.get(ENV_TIMEOUT, "300")) if timeout is None else timeout
        self.port = free_port()
        env = clean_env({"HF_HOME": str(self.data_dir / "hf-home"), **self.extra_env})
        t0 = time.monotonic()
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), cwd=str(self.install.root), env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        try:
            self._wait_ready(t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        api_up = False
        while True:
            if self.proc.poll() is not None:
                raise HostError(f"the WebUI exited with rc {self.proc.returncode} before answering\n"
                                f"{self.log_tail()}")
            # No request before A1111 says it started: in UI mode the server answers while webui() still adds
            # the API middleware, and a request in that window makes starlette refuse it ("Cannot add middleware
            # after an application has started") and the WebUI exits.
            if not api_up and STARTED in self.log_text_since_start():
                try:
                    api_up = self.request("GET", "/sdapi/v1/sd-models", timeout=5)[0] == 200
                except (OSError, urllib.error.URLError):
                    pass
            if api_up:
                # The checkpoint loads in a background thread; wait for it so timings start from a ready host.
                log = self.log_text_since_start()
                if not self.wait_model or MODEL_LOADED in log:
                    return
                if MODEL_FAILED in log:
                    raise HostError(f"the WebUI could not load {self.checkpoint}\n{self.log_tail(150)}")
            if time.monotonic() > deadline:
                raise HostError(f"the WebUI did not answer on {self.base_url} in time\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, grace: float = 15) -> None:
        """Stop the server's whole process group: SIGTERM, then SIGKILL after `grace` seconds."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            pgid = None
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            if pgid is not None:
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        if pgid is not None:  # children that outlived the leader
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def restart(self, timeout: float | None = None) -> WebUIHost:
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_text_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def extension_errors(self) -> list[str]:
        """A1111's error reports (`*** ...` lines) since the last start that name a file of this extension:
        a script that failed to load, a callback or script hook that raised."""
        roots = (f"{self.extension_dir}{os.sep}", f"{REPO_ROOT}{os.sep}")
        return [line for line in self.log_text_since_start().splitlines()
                if line.startswith("*** ") and any(r in line for r in roots)]

    def log_tail(self, lines: int = 80) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"----- last {lines} lines of {self.log_path} -----\n{tail}\n-----"

    # ---- HTTP ------------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 300,
                auth: tuple[str, str] | None | str = "default") -> tuple[int, Any]:
        """(status, decoded JSON or text). HTTP errors are returned, not raised. `auth`: (user, password) for HTTP
        Basic, None for none; by default the host's `auth`."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        cred = self.auth if auth == "default" else auth
        if cred is not None:
            token = base64.b64encode(f"{cred[0]}:{cred[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", errors="replace")

    def get(self, path: str, **kw: Any) -> Any:
        return self._ok("GET", path, None, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self._ok("POST", path, {} if body is None else body, **kw)

    def _ok(self, method: str, path: str, body: Any, **kw: Any) -> Any:
        status, out = self.request(method, path, body, **kw)
        if status != 200:
            raise HostError(f"{method} {path} -> {status}: {str(out)[:2000]}\n{self.log_tail()}")
        return out

    def txt2img(self, prompt: str = "a photo of a cat", *, steps: int = 4, width: int = 64, height: int = 64,
                sampler: str = "Euler", seed: int = 1, **extra: Any) -> dict[str, Any]:
        payload = {"prompt": prompt, "steps": steps, "width": width, "height": height, "sampler_name": sampler,
                   "seed": seed, "cfg_scale": 7, "batch_size": 1, "n_iter": 1, **extra}
        out: dict[str, Any] = self.post("/sdapi/v1/txt2img", payload)
        return out


def decode_image(b64: str) -> bytes:
    """The PNG bytes of an image in an API response."""
    if "," in b64[:100]:
        b64 = b64.split(",", 1)[1]
    return base64.b64decode(b64)


def png_pixels(png: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, channels, raw 8-bit pixel rows) of a non-interlaced 8-bit gray/RGB/RGBA PNG (stdlib only)."""
    import struct
    import zlib

    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, b"", None
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        data = png[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat += data
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG without IHDR")
    width, height, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"unsupported PNG (depth {depth}, color type {color}, interlace {interlace})")
    raw, stride, bpp = zlib.decompress(idat), width * channels, channels
    out, prev = bytearray(), bytearray(stride)
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += line
        prev = line
    return width, height, channels, bytes(out)


def encode_png(width: int, height: int, pixels: bytes, channels: int = 3) -> bytes:
    """An 8-bit gray/RGB/RGBA PNG of raw pixel rows (stdlib only; no filtering)."""
    import struct
    import zlib

    color = {1: 0, 3: 2, 4: 6}[channels]
    stride = width * channels
    assert len(pixels) == stride * height, (len(pixels), width, height, channels)
    raw = b"".join(b"\0" + pixels[y * stride:(y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def gradient_png(width: int = 64, height: int = 64) -> bytes:
    """An RGB test image: red grows left to right, green top to bottom, blue along the diagonal."""
    pixels = bytearray()
    for y in range(height):
        for x in range(width):
            pixels += bytes((255 * x // max(width - 1, 1), 255 * y // max(height - 1, 1),
                             255 * (x + y) // max(width + height - 2, 1)))
    return encode_png(width, height, bytes(pixels))


if __name__ == "__main__":  # manual use: python a1111_host.py DATA_DIR [--ui]  (Ctrl-C stops it)
    inst = A1111Install.from_env()
    if inst is None:
        sys.exit(f"set {ENV_DIR}")
    host = WebUIHost(inst, Path(sys.argv[1]), ui="--ui" in sys.argv)
    with host:
        print(f"WebUI at {host.base_url} (started in {host.start_seconds:.1f}s); log: {host.log_path}", flush=True)
        try:
            while host.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
