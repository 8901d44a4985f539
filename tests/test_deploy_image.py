"""The container image (deploy/docker): its entrypoint and probe scripts run here, outside a container (the exact
A1111 command line, the errors, a real pre-build of a tiny checkpoint, probes against a local HTTP server), and its
Dockerfile parsed and checked against A1111 1.10.1's launcher (SDTRT_A1111_DIR) or the committed flag list."""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
ENTRY = DOCKER / "entrypoint.sh"
PROBE = DOCKER / "probe.sh"
SH = shutil.which("sh") or "/bin/sh"
#: where the image holds this repository (the chart runs <this>/deploy/docker/entrypoint.sh)
IMAGE_EXT = "/opt/webui/extensions/sd-webui-trt"
#: tag v1.10.1 of AUTOMATIC1111/stable-diffusion-webui
A1111_COMMIT = "82a973c04367123ae98bd9abdf80d9eda9b910e2"
#: modules/launch_utils.py prepare_environment() defaults at that commit (used when SDTRT_A1111_DIR is not set)
LAUNCHER_DEFAULTS = {
    "TORCH_COMMAND": "pip install torch==2.1.2 torchvision==0.16.2 --extra-index-url "
                     "https://download.pytorch.org/whl/cu121",
    "ASSETS_COMMIT_HASH": "6f7db241d2f8ba7457bac5ca9753331f0c266917",
    "STABLE_DIFFUSION_COMMIT_HASH": "cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf",
    "STABLE_DIFFUSION_XL_COMMIT_HASH": "45c443b316737a4ab6e40413d7794a7f5657c19f",
    "K_DIFFUSION_COMMIT_HASH": "ab527a9a6d347f364e3d185ba6d714e22d80cb3c",
    "BLIP_COMMIT_HASH": "48211a1594f1321b00f14c9f7a5b4813144b2fb9",
}
FIXED = ["--api", "--listen", "--port", "7860", "--skip-install", "--skip-prepare-environment",
         "--skip-version-check", "--no-download-sd-model"]


def a1111_dir() -> Path | None:
    d = os.environ.get("SDTRT_A1111_DIR")
    return Path(d) if d else None


def known_a1111_flags() -> set[str]:
    """Flags A1111 1.10.1 accepts: its cmd_args.py plus the built-in extensions' preload.py (--lora-dir is the Lora
    extension's), read from SDTRT_A1111_DIR when set, else the committed list tests/data/a1111_cmd_args.txt."""
    root = a1111_dir()
    if root is not None:
        sources = [root / "modules" / "cmd_args.py", *sorted((root / "extensions-builtin").glob("*/preload.py"))]
        flags = {m for p in sources for m in re.findall(r"add_argument\(\s*[\"'](--[\w-]+)[\"']", p.read_text())}
        assert "--ckpt-dir" in flags and "--lora-dir" in flags, f"no A1111 flags found under {root}"
        return flags
    listed = ROOT / "tests" / "data" / "a1111_cmd_args.txt"
    assert listed.is_file(), f"{listed} is missing and SDTRT_A1111_DIR is not set: no list of A1111 1.10.1's flags"
    return {line.split()[0] for line in listed.read_text().splitlines() if line.strip() and not line.startswith("#")}


def clean_env(**extra: str | os.PathLike[str]) -> dict[str, str]:
    """A minimal environment: nothing of the caller's SDTRT_*/WEBUI_*/HF_* leaks into the scripts."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def entry(*args: str, cwd: Path | None = None, **env: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SH, str(ENTRY), *args], check=False, env=clean_env(**env), cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    """A WebUI folder (no A1111 in it), an A1111-style models tree with some folders, an engine cache, a checkpoint
    in a sub-folder, an API credentials file."""
    webui = tmp_path / "webui"
    (webui / "extensions").mkdir(parents=True)
    models = tmp_path / "models"
    for sub in ("Stable-diffusion/sub", "Lora", "VAE", "ControlNet"):  # no embeddings
        (models / sub).mkdir(parents=True)
    (models / "Stable-diffusion/sub/m.safetensors").write_bytes(b"\0" * 16)
    cache = tmp_path / "engines"
    cache.mkdir()
    auth = tmp_path / "auth"
    auth.write_text(" alice:s3cret , bob:pw\n")
    env = {"WEBUI_DIR": webui, "WEBUI_PYTHON": "/venv/bin/python", "MODELS_DIR": models, "SDTRT_CACHE": cache}
    return {"tmp": tmp_path, "webui": webui, "models": models, "cache": cache, "auth": auth, "env": env}


def dry(site: dict[str, Any], *args: str, cwd: Path | None = None, **env: str | os.PathLike[str]) -> list[str]:
    out = entry(*args, cwd=cwd, **{**site["env"], "WEBUI_DRY_RUN": "1", **env})
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    return out.stdout.splitlines()


# ---- entrypoint: serve -----------------------------------------------------------------------------------------
def test_serve_defaults_to_the_api_with_the_model_folders_that_exist(site: dict[str, Any]) -> None:
    m = site["models"]
    expected = ["/venv/bin/python", f"{site['webui']}/launch.py", *FIXED, "--nowebui",
                "--ckpt-dir", f"{m}/Stable-diffusion", "--lora-dir", f"{m}/Lora", "--vae-dir", f"{m}/VAE"]
    assert dry(site) == expected  # no embeddings folder; ControlNet exists but no extension declares the flag
    assert dry(site, "serve") == expected


def test_serve_with_every_option(site: dict[str, Any]) -> None:
    m, tmp = site["models"], site["tmp"]
    (m / "embeddings").mkdir()
    cn = site["webui"] / "extensions" / "sd-webui-controlnet"
    cn.mkdir()
    (cn / "preload.py").write_text('def preload(parser):\n    parser.add_argument("--controlnet-dir", type=str)\n')
    (tmp / "x.csv").write_text("")  # a glob in WEBUI_EXTRA_ARGS must stay literal
    got = dry(site, cwd=tmp, WEBUI_UI="1", WEBUI_PORT="8080", WEBUI_CKPT="sub/m.safetensors",
              SDTRT_API_AUTH_FILE=site["auth"], WEBUI_EXTRA_ARGS=" --xformers\t--styles-file *.csv\n--medvram-sdxl ")
    assert got == ["/venv/bin/python", f"{site['webui']}/launch.py", "--api", "--listen", "--port", "8080",
                   *FIXED[4:], "--ckpt-dir", f"{m}/Stable-diffusion", "--lora-dir", f"{m}/Lora", "--vae-dir",
                   f"{m}/VAE", "--embeddings-dir", f"{m}/embeddings", "--controlnet-dir", f"{m}/ControlNet",
                   "--ckpt", f"{m}/Stable-diffusion/sub/m.safetensors",
                   "--xformers", "--styles-file", "*.csv", "--medvram-sdxl"]
    assert not any("s3cret" in a for a in got)  # the extension's preload reads the credentials from the file


def test_relative_paths_become_absolute_and_one_credential_per_line_works(site: dict[str, Any]) -> None:
    tmp = site["tmp"]
    (tmp / "auth2").write_text("\r\nalice:s3cret\r\n\r\nbob:pw\r\n")
    got = dry(site, cwd=tmp, MODELS_DIR="models//", SDTRT_CACHE="engines/", WEBUI_DIR="webui",
              WEBUI_PYTHON="venv/bin/python", SDTRT_API_AUTH_FILE="auth2")
    assert got[:2] == [f"{tmp}/venv/bin/python", f"{tmp}/webui/launch.py"]
    assert got[got.index("--ckpt-dir") + 1] == f"{tmp}/models/Stable-diffusion"
    assert "--api-auth" not in got and not any("s3cret" in a for a in got)


def test_every_flag_the_entrypoint_passes_exists_in_a1111_1_10_1(site: dict[str, Any]) -> None:
    (site["models"] / "embeddings").mkdir()
    got = dry(site, WEBUI_CKPT="sub/m.safetensors", SDTRT_API_AUTH_FILE=site["auth"])
    flags = {a for a in got if a.startswith("--")}
    assert len(flags) == 13
    assert flags - known_a1111_flags() == set()


def recorder(tmp: Path) -> tuple[Path, Path]:
    """A stand-in for the WebUI's Python that records how it was started, and exits 7."""
    record, stub = tmp / "record", tmp / "python"
    stub.write_text('#!/bin/sh\n{ echo "ppid=$PPID"; echo "cwd=$(pwd)"; '
                    'for v in HF_HUB_OFFLINE TRANSFORMERS_OFFLINE SDTRT_CACHE PYTHONPATH; do '
                    'eval "echo $v=\\${$v-unset}"; done; '
                    f'for a in "$@"; do echo "arg=$a"; done; }} > {record}\nexit 7\n')
    stub.chmod(0o755)
    return stub, record


def test_serve_execs_the_webui_in_its_folder_with_the_offline_environment(site: dict[str, Any]) -> None:
    """Not a dry run. `exec`: the stand-in's parent is this test's process, not the shell."""
    tmp, webui = site["tmp"], site["webui"]
    (webui / "launch.py").write_text("")  # never run: the stand-in Python does not read it
    stub, record = recorder(tmp)
    out = entry(cwd=tmp, **{**site["env"], "WEBUI_PYTHON": stub})
    assert out.returncode == 7, out.stderr  # the stand-in's own exit code: nothing ran after it
    lines = record.read_text().splitlines()
    assert lines[:6] == [f"ppid={os.getpid()}", f"cwd={webui}", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1",
                         f"SDTRT_CACHE={site['cache']}", "PYTHONPATH=unset"]
    assert [x[4:] for x in lines[6:]] == dry(site)[1:]
    entry(cwd=tmp, **{**site["env"], "WEBUI_PYTHON": stub, "HF_HUB_OFFLINE": "0"})
    assert "HF_HUB_OFFLINE=0" in record.read_text().splitlines()  # an operator's own value is kept


def test_prebuild_execs_with_the_extension_importable(site: dict[str, Any]) -> None:
    tmp = site["tmp"]
    (tmp / "plan.json").write_text("{}")
    stub, record = recorder(tmp)
    out = entry("prebuild", cwd=tmp, **{**site["env"], "WEBUI_PYTHON": stub, "SDTRT_PREBUILD_PLAN": "plan.json",
                                        "PYTHONPATH": "/somewhere"})
    assert out.returncode == 7, out.stderr
    lines = record.read_text().splitlines()
    assert lines[:6] == [f"ppid={os.getpid()}", f"cwd={tmp}", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1",
                         f"SDTRT_CACHE={site['cache']}", f"PYTHONPATH={ROOT}/extension:/somewhere"]
    assert lines[6:8] == ["arg=-m", "arg=sdtrt"]


def _errors(site: dict[str, Any]) -> list[tuple[dict[str, Any], int, str]]:
    tmp = site["tmp"]
    (tmp / "empty").write_text(" \n\n")
    (tmp / "malformed").write_text("alice:s3cret,bob\n")
    (tmp / "colons").write_text("alice:s3:cret\n")
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"SDTRT_CACHE": tmp / "nowhere"}, 1, f"SDTRT_CACHE={tmp}/nowhere is not a directory"),
        ({"SDTRT_API_AUTH_FILE": tmp / "missing"}, 1, f"SDTRT_API_AUTH_FILE={tmp}/missing is not a readable file"),
        ({"SDTRT_API_AUTH_FILE": tmp}, 1, f"SDTRT_API_AUTH_FILE={tmp} is not a readable file"),
        ({"SDTRT_API_AUTH_FILE": tmp / "empty"}, 1, "is empty: it must hold user:password"),
        ({"SDTRT_API_AUTH_FILE": tmp / "malformed"}, 1, "malformed: entry 2 is not user:password"),
        ({"SDTRT_API_AUTH_FILE": tmp / "colons"}, 1, "colons: entry 1 is not user:password"),
        ({"WEBUI_CKPT": "nope.safetensors"}, 1,
         f"WEBUI_CKPT=nope.safetensors: no such checkpoint {site['models']}/Stable-diffusion/nope.safetensors"),
        ({"WEBUI_UI": "2"}, 1, "WEBUI_UI=2 is neither 0"),
        ({"WEBUI_PORT": "http"}, 1, "WEBUI_PORT=http is not a port number"),
        ({"WEBUI_PORT": "70000"}, 1, "WEBUI_PORT=70000 is not a port number"),
        ({"_args": ["frobnicate"]}, 2, "unknown mode frobnicate"),
        ({"_args": ["serve", "--xformers"]}, 2, "no arguments after the mode"),
        ({"_args": ["prebuild"]}, 1, "SDTRT_PREBUILD_PLAN is not set"),
        ({"_args": ["prebuild"], "SDTRT_PREBUILD_PLAN": tmp / "plan.json"}, 1,
         f"SDTRT_PREBUILD_PLAN={tmp}/plan.json is not a readable file"),
        ({"_args": ["prebuild"], "SDTRT_PREBUILD_PLAN": tmp / "empty", "SDTRT_CACHE": ""}, 1,
         "SDTRT_CACHE is not set"),
        ({"_args": ["prebuild"], "SDTRT_PREBUILD_PLAN": tmp / "empty", "MODELS_DIR": tmp / "nomodels"}, 1,
         f"MODELS_DIR={tmp}/nomodels is not a directory"),
        ({"_args": ["prebuild"], "SDTRT_PREBUILD_PLAN": tmp / "empty", "SDTRT_CACHE": tmp / "nowhere"}, 1,
         f"SDTRT_CACHE={tmp}/nowhere is not a directory (mount the engine cache volume there)"),
    ]
    if os.geteuid() != 0:  # root reads and writes anything
        (tmp / "secret").write_text("alice:s3cret\n")
        (tmp / "secret").chmod(0)
        (tmp / "readonly").mkdir(mode=0o555)
        cases += [({"SDTRT_API_AUTH_FILE": tmp / "secret"}, 1, "is not a readable file"),
                  ({"_args": ["prebuild"], "SDTRT_PREBUILD_PLAN": tmp / "empty", "SDTRT_CACHE": tmp / "readonly"}, 1,
                   f"SDTRT_CACHE={tmp}/readonly is not writable")]
    return cases


def test_configuration_errors_say_what_is_wrong_and_run_nothing(site: dict[str, Any]) -> None:
    for case, code, message in _errors(site):
        env = {k: v for k, v in case.items() if k != "_args"}
        out = entry(*case.get("_args", []), **{**site["env"], "WEBUI_DRY_RUN": "1", **env})
        assert (out.returncode, out.stdout) == (code, ""), (case, out.stderr)
        assert message in out.stderr, (case, out.stderr)
        assert "s3cret" not in out.stderr and "s3:cret" not in out.stderr  # credentials never echoed
        if code == 2:
            assert out.stderr.startswith("usage: entrypoint.sh [serve|prebuild]")


def test_serve_refuses_a_webui_folder_without_a1111(site: dict[str, Any]) -> None:
    out = entry(**{**site["env"], "WEBUI_PYTHON": sys.executable})
    assert out.returncode == 1
    assert f"no A1111 at WEBUI_DIR={site['webui']} (launch.py is missing)" in out.stderr


# ---- entrypoint: prebuild --------------------------------------------------------------------------------------
def test_prebuild_command_line(site: dict[str, Any]) -> None:
    plan = site["tmp"] / "plan.json"
    plan.write_text("{}")
    got = dry(site, "prebuild", cwd=site["tmp"], SDTRT_PREBUILD_PLAN="plan.json")
    assert got == ["/venv/bin/python", "-m", "sdtrt", "prebuild", str(plan), "--models", str(site["models"]),
                   "--cache", str(site["cache"]), "--json"]


def listing(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*"))


def test_prebuild_builds_a_plan_then_finds_everything_present(site: dict[str, Any]) -> None:
    """The real thing through the entrypoint: a tiny SD1 checkpoint, an onnxruntime engine, the Job's JSON; the
    second run is a no-op that leaves every file of the cache as it was."""
    from sdtrt.tools.tiny import write_tiny_checkpoint  # importable: conftest puts extension/ on sys.path

    write_tiny_checkpoint("sd1", site["models"] / "Stable-diffusion", 0, stem="tiny")
    plan = site["tmp"] / "plan.json"
    plan.write_text(json.dumps({"builds": [{"checkpoint": "Stable-diffusion/tiny.safetensors",
                                            "profiles": ["1x64x64x75"], "backend": "onnxruntime"}]}))
    env = {**site["env"], "WEBUI_PYTHON": sys.executable, "SDTRT_PREBUILD_PLAN": plan}
    first = entry("prebuild", **env)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    build = report["builds"][0]
    assert (build["built"], build["error"], report["built"], report["failed"]) == (True, None, 1, 0)
    assert (site["cache"] / build["id"] / "manifest.json").is_file()
    assert any((site["cache"] / build["id"]).glob("*.onnx"))
    before = listing(site["cache"])

    second = entry("prebuild", **env)
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert (again["builds"][0]["id"], again["builds"][0]["built"], again["present"], again["built"]) == \
        (build["id"], False, 1, 0)
    assert listing(site["cache"]) == before


def test_prebuild_exits_1_with_the_report_when_a_build_fails(site: dict[str, Any]) -> None:
    plan = site["tmp"] / "plan.json"
    plan.write_text(json.dumps({"builds": [{"checkpoint": "Stable-diffusion/absent.safetensors",
                                            "profiles": ["1x64x64x75"], "backend": "onnxruntime"}]}))
    out = entry("prebuild", **{**site["env"], "WEBUI_PYTHON": sys.executable, "SDTRT_PREBUILD_PLAN": plan})
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["failed"] == 1 and "absent.safetensors does not exist" in report["builds"][0]["error"]
    assert listing(site["cache"]) == []


# ---- probe.sh ----------------------------------------------------------------------------------------------------
class FakeWebUI(http.server.BaseHTTPRequestHandler):
    accepted: ClassVar[set[str | None]] = set()
    ready: ClassVar[bool] = True
    delay: ClassVar[float] = 0.0
    seen: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        time.sleep(self.delay)
        if self.path == "/sdapi/v1/memory":
            ok = self.headers.get("Authorization") in self.accepted
            self.answer(200 if ok else 401, {"ram": {}} if ok else {"detail": "Incorrect username or password"})
        elif self.path == "/sdtrt/v1/ready":
            self.answer(200 if self.ready else 503, {"ready": self.ready,
                                                     "reasons": [] if self.ready else ["no engine for m"]})
        else:
            self.answer(404, {"detail": "Not Found"})

    def answer(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, indent=1).encode()  # several lines: the probe says it in one
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def webui_server() -> Iterator[int]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (the image has it)")
    FakeWebUI.accepted, FakeWebUI.ready, FakeWebUI.delay, FakeWebUI.seen = {basic("alice", 's3"c\\ret')}, True, 0, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeWebUI)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def probe(kind: str, port: int, tmp: Path, **env: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """probe.sh through a curl wrapper that records curl's command line."""
    real = shutil.which("curl")
    wrapper = tmp / "bin" / "curl"
    if not wrapper.exists():
        wrapper.parent.mkdir()
        wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {tmp}/curl-argv\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    e = clean_env(WEBUI_PORT=str(port), **env)
    e["PATH"] = f"{wrapper.parent}:{e['PATH']}"
    return subprocess.run([SH, str(PROBE), kind], check=False, env=e, capture_output=True, text=True, timeout=60)


def test_probe_live_sends_the_first_credentials_of_the_auth_file(webui_server: int, tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    auth.write_text('\n  alice:s3"c\\ret , bob:pw\n')
    # a proxy in the environment must not catch 127.0.0.1
    ok = probe("live", webui_server, tmp_path, SDTRT_API_AUTH_FILE=auth, http_proxy="http://127.0.0.1:9")
    assert (ok.returncode, ok.stderr) == (0, "")
    assert FakeWebUI.seen[-1] == ("/sdapi/v1/memory", basic("alice", 's3"c\\ret'))
    assert "s3" not in (tmp_path / "curl-argv").read_text()  # never on curl's command line

    auth.write_text("bob:pw,alice:s3cret\n")
    wrong = probe("live", webui_server, tmp_path, SDTRT_API_AUTH_FILE=auth)
    assert wrong.returncode == 1
    assert wrong.stderr.startswith(f"probe live: GET http://127.0.0.1:{webui_server}/sdapi/v1/memory answered "
                                   "HTTP 401: ")
    assert "Incorrect username or password" in wrong.stderr and wrong.stderr.count("\n") == 1

    anonymous = probe("live", webui_server, tmp_path)
    assert anonymous.returncode == 1 and "HTTP 401" in anonymous.stderr
    assert FakeWebUI.seen[-1] == ("/sdapi/v1/memory", None)

    FakeWebUI.accepted.add(None)  # an API without --api-auth
    assert probe("live", webui_server, tmp_path).returncode == 0
    unreadable = probe("live", webui_server, tmp_path, SDTRT_API_AUTH_FILE=tmp_path / "absent")
    assert unreadable.returncode == 1 and "is not a readable file" in unreadable.stderr


def test_probe_ready_follows_the_extension_route_without_credentials(webui_server: int, tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    auth.write_text("alice:s3cret\n")
    assert probe("ready", webui_server, tmp_path, SDTRT_API_AUTH_FILE=auth).returncode == 0
    assert FakeWebUI.seen[-1] == ("/sdtrt/v1/ready", None)
    FakeWebUI.ready = False
    out = probe("ready", webui_server, tmp_path)
    assert out.returncode == 1
    assert "answered HTTP 503" in out.stderr and '"reasons": [ "no engine for m" ]' in out.stderr
    assert out.stderr.count("\n") == 1


def test_probe_fails_on_timeouts_refusals_and_usage(webui_server: int, tmp_path: Path) -> None:
    FakeWebUI.delay = 3.0
    t0 = time.monotonic()
    slow = probe("ready", webui_server, tmp_path, PROBE_TIMEOUT="1")
    assert slow.returncode == 1 and "failed: curl: (28)" in slow.stderr and time.monotonic() - t0 < 2.5
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    refused = probe("live", closed, tmp_path)
    assert refused.returncode == 1 and f"127.0.0.1:{closed}/sdapi/v1/memory failed: curl: (7)" in refused.stderr
    for kind in ("", "health"):
        bad = probe(kind, webui_server, tmp_path)
        assert (bad.returncode, bad.stderr) == (2, "usage: probe.sh live|ready\n")


def test_scripts_pass_shellcheck_or_at_least_sh_n() -> None:
    for script in (ENTRY, PROBE):
        assert script.read_text().startswith("#!/bin/sh\n")
        out = subprocess.run([SH, "-n", str(script)], check=False, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    if shutil.which("shellcheck"):
        out = subprocess.run(["shellcheck", "-s", "sh", str(ENTRY), str(PROBE)], check=False, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stdout


# ---- Dockerfile ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dockerfile() -> Any:
    dp = pytest.importorskip("dockerfile_parse")
    return dp.DockerfileParser(path=str(DOCKER / "Dockerfile"))


def steps(df: Any, instruction: str) -> list[tuple[int, str]]:
    return [(i, s["value"]) for i, s in enumerate(df.structure) if s["instruction"] == instruction]


def one(df: Any, instruction: str, needle: str) -> tuple[int, str]:
    found = [(i, v) for i, v in steps(df, instruction) if needle in v]
    assert len(found) == 1, f"expected one {instruction} with {needle!r}, found {len(found)}"
    return found[0]


def copies(df: Any) -> list[tuple[int, list[str], str, list[str]]]:
    """(position, sources, absolute destination, flags) of every COPY/ADD, relative destinations resolved
    against WORKDIR."""
    out, workdir = [], "/"
    for i, s in enumerate(df.structure):
        if s["instruction"] == "WORKDIR":
            workdir = s["value"] if s["value"].startswith("/") else f"{workdir.rstrip('/')}/{s['value']}"
        if s["instruction"] in ("COPY", "ADD"):
            v = s["value"].strip()
            words = json.loads(v) if v.startswith("[") else v.split()
            flags = [w for w in words if w.startswith("--")]
            args = [w for w in words if not w.startswith("--")]
            dest = args[-1] if args[-1].startswith("/") else f"{workdir.rstrip('/')}/{args[-1]}"
            out.append((i, args[:-1], dest, flags))
    return out


def image_paths(df: Any, rel: str) -> set[str]:
    """Where a file of the repository (a path relative to the build context) ends up in the image."""
    found = set()
    for _, sources, dest, _ in copies(df):
        for src in sources:
            s = src.rstrip("/")
            if rel == s:
                found.add(f"{dest.rstrip('/')}/{Path(rel).name}" if dest.endswith("/") or len(sources) > 1 else dest)
            elif rel.startswith(s + "/"):
                found.add(f"{dest.rstrip('/')}/{rel[len(s) + 1:]}")
    return found


def dockerignored(rel: str) -> bool:
    """Docker's rules: a pattern matches a path or one of its parents; the last matching pattern decides; `!`
    keeps; `**` spans folders."""
    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
                i += 1
        return re.compile(out)

    lines = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    ignored = False
    parts = rel.split("/")
    for line in (x.strip() for x in lines):
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        rx = regex(line.lstrip("!").strip("/"))
        if any(rx.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not keep
    return ignored


def test_dockerignore_matcher_follows_docker_rules() -> None:
    assert dockerignored(".git/config") and dockerignored(".venv/bin/python") and dockerignored("tests/conftest.py")
    assert dockerignored("extension/sdtrt/__pycache__") and dockerignored("scripts/x.pyc")
    assert dockerignored("deploy/helm/Chart.yaml")
    assert not dockerignored("extension/sdtrt/tools/cli.py") and not dockerignored("deploy/docker/entrypoint.sh")


def test_base_image_is_a_pinned_cuda_12_1_cudnn_runtime_on_ubuntu_22_04(dockerfile: Any) -> None:
    froms = steps(dockerfile, "FROM")
    assert len(froms) == 1 and "$" not in froms[0][1]
    image, _, tag = dockerfile.baseimage.partition(":")
    assert image == "nvidia/cuda" and re.fullmatch(r"12\.1\.\d+-cudnn\d+-runtime-ubuntu22\.04", tag), tag


def test_a1111_is_fetched_at_the_v1_10_1_commit(dockerfile: Any) -> None:
    assert re.fullmatch(r"[0-9a-f]{40}", dockerfile.args["A1111_COMMIT"])
    assert dockerfile.args["A1111_COMMIT"] == A1111_COMMIT
    assert dockerfile.args["A1111_REPO"] == "https://github.com/AUTOMATIC1111/stable-diffusion-webui.git"
    _, run = one(dockerfile, "RUN", "git -C /opt/webui fetch")
    assert 'origin "$A1111_COMMIT"' in run and 'test "$(git -C /opt/webui rev-parse HEAD)" = "$A1111_COMMIT"' in run
    root = a1111_dir()
    if root is not None and (root / ".git").exists():  # the flags are read from this checkout: same version
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=False, capture_output=True,
                              text=True)
        assert head.stdout.strip() == A1111_COMMIT


def launcher_defaults() -> dict[str, str]:
    root = a1111_dir()
    if root is None:
        return LAUNCHER_DEFAULTS
    src = (root / "modules" / "launch_utils.py").read_text()
    assert '"--exit" in sys.argv' in src  # --exit is read from sys.argv, not declared in cmd_args.py
    index = re.search(r"os\.environ\.get\('TORCH_INDEX_URL', \"([^\"]+)\"\)", src)
    command = re.search(r"torch_command = os\.environ\.get\('TORCH_COMMAND', f\"([^\"]+)\"\)", src)
    assert index and command
    found = {"TORCH_COMMAND": command.group(1).replace("{torch_index_url}", index.group(1))}
    found.update(re.findall(r"os\.environ\.get\('(\w+_COMMIT_HASH)', \"([0-9a-f]{40})\"\)", src))
    assert found.keys() == LAUNCHER_DEFAULTS.keys()
    return found


def test_the_launcher_installs_torch_2_1_2_and_the_pinned_repositories_itself(dockerfile: Any) -> None:
    assert dockerfile.args["TORCH_COMMAND"] == launcher_defaults()["TORCH_COMMAND"]
    assert "torch==2.1.2 torchvision==0.16.2" in dockerfile.args["TORCH_COMMAND"]
    assert dockerfile.args["TORCH_COMMAND"].endswith("--extra-index-url https://download.pytorch.org/whl/cu121")
    i, run = one(dockerfile, "RUN", "launch.py")
    assert "/opt/webui/venv/bin/python /opt/webui/launch.py --skip-torch-cuda-test --exit" in run
    assert "--skip-install" not in run and "--skip-prepare-environment" not in run
    assert "sys.exit(v != ('2.1.2', '12.1', '0.16.2'))" in run  # the build fails on any other torch
    for name, value in launcher_defaults().items():
        if name.endswith("_COMMIT_HASH"):
            assert dockerfile.args[name] == value, name
            assert f"${name}" in run  # and the clone is checked against it
    assert "--skip-torch-cuda-test" in known_a1111_flags()
    assert i < one(dockerfile, "RUN", "install.py")[0]


def test_python_is_3_10_in_a_venv_where_the_entrypoint_looks(dockerfile: Any) -> None:
    _, apt = one(dockerfile, "RUN", "apt-get install")
    assert {"python3.10", "python3.10-venv", "git", "curl", "tini", "libgl1"} <= set(apt.split())
    _, run = one(dockerfile, "RUN", "launch.py")
    assert run.startswith("python3.10 -m venv /opt/webui/venv ")
    every_run = " ".join(v for _, v in steps(dockerfile, "RUN"))
    assert set(re.findall(r"python3\.\d+", every_run)) == {"python3.10"}
    assert "WEBUI_PYTHON:-$WEBUI_DIR/venv/bin/python" in ENTRY.read_text()
    assert "WEBUI_DIR:-/opt/webui" in ENTRY.read_text()


def test_the_extension_installer_runs_as_a1111_runs_it_with_tensorrt_forced(dockerfile: Any) -> None:
    i, run = one(dockerfile, "RUN", "SDTRT_INSTALL_TENSORRT")
    assert dockerfile.args["SDTRT_INSTALL_TENSORRT"] == "tensorrt"  # the default image: TensorRT (rtx: a variant)
    assert re.search(r'SDTRT_INSTALL_TENSORRT="?(\$SDTRT_INSTALL_TENSORRT|tensorrt)"? PYTHONPATH=/opt/webui', run)
    assert "/opt/webui/venv/bin/python /opt/webui/extensions/sd-webui-trt/install.py" in run
    # the backend the image is for must import, or the build fails
    assert "importlib.import_module('tensorrt_rtx' if sys.argv[1] == 'rtx' else 'tensorrt')" in run
    assert "pip check" in run
    assert re.fullmatch(r"tensorrt-cu12==10\.\d+\.\d+\.\d+", dockerfile.args["TENSORRT_REQUIREMENT"])
    installer = [pos for pos, sources, _, _ in copies(dockerfile) if "install.py" in sources]
    assert installer and min(installer) < i
    assert f"{IMAGE_EXT}/install.py" in image_paths(dockerfile, "install.py")


def test_entrypoint_user_and_port_are_what_the_chart_expects(dockerfile: Any) -> None:
    _, value = steps(dockerfile, "ENTRYPOINT")[-1]
    entrypoint = json.loads(value)
    assert entrypoint[-1] == f"{IMAGE_EXT}/deploy/docker/entrypoint.sh"
    assert entrypoint[:-1] in ([], ["/usr/bin/tini", "--"])
    assert json.loads(steps(dockerfile, "CMD")[-1][1]) == ["serve"]
    assert steps(dockerfile, "EXPOSE")[-1][1] == "7860"
    user = steps(dockerfile, "USER")
    uid = user[-1][1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric: Kubernetes' runAsNonRoot can check it
    _, useradd = one(dockerfile, "RUN", "useradd")
    assert "--uid 1000 --gid 1000" in useradd and "install -d -o 1000 -g 1000 /opt/webui" in useradd
    first_webui_write = one(dockerfile, "RUN", "git init")[0]
    assert all(pos < first_webui_write for pos, _ in user)  # A1111's files belong to the user from the start
    for _, _, dest, flags in copies(dockerfile):
        assert "--chown=1000:1000" in flags, dest
    _, health = steps(dockerfile, "HEALTHCHECK")[-1]
    assert f'["{IMAGE_EXT}/deploy/docker/probe.sh", "live"]' in health


def test_every_file_the_image_runs_is_copied_where_it_is_used(dockerfile: Any) -> None:
    needed = ["deploy/docker/entrypoint.sh", "deploy/docker/probe.sh", "install.py",
              *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "extension" / "sdtrt").rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts)]
    # what A1111 loads from an extension folder, wherever this repository has it
    for name in ("scripts", "javascript", "style.css", "preload.py", "metadata.ini", "localizations"):
        path = ROOT / name
        needed += [str(p.relative_to(ROOT)) for p in ([path] if path.is_file() else sorted(path.rglob("*")))
                   if p.is_file() and "__pycache__" not in p.parts]
    assert "scripts/sdtrt_webui.py" in needed and "extension/sdtrt/__main__.py" in needed
    for rel in needed:
        assert not dockerignored(rel), rel
        assert f"{IMAGE_EXT}/{rel}" in image_paths(dockerfile, rel), rel
    assert not dockerignored("deploy/docker/offline_assets.py")
    helper = "deploy/docker/offline_assets.py"
    early = image_paths(dockerfile, helper) - {f"{IMAGE_EXT}/{helper}"}
    (where,) = early  # copied on its own before the bake step, besides the extension's copy
    _, bake = one(dockerfile, "RUN", "offline_assets.py fetch")
    assert f"{where} fetch" in bake and f"{where} check" in bake


def test_nothing_is_downloaded_at_run_time(dockerfile: Any) -> None:
    envs = dockerfile.envs
    assert (envs["HF_HUB_OFFLINE"], envs["TRANSFORMERS_OFFLINE"], envs["HF_HOME"]) == ("1", "1", "/opt/huggingface")
    positions = {s["value"].split("=")[0]: i for i, s in enumerate(dockerfile.structure) if s["instruction"] == "ENV"}
    bake, run = one(dockerfile, "RUN", "offline_assets.py fetch")
    assert positions["HF_HOME"] < bake < positions["HF_HUB_OFFLINE"]  # fetched into the cache the runtime reads
    assert "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1" in run.split("offline_assets.py fetch")[1]  # then checked offline
    assert re.fullmatch(r"[0-9a-f]{40}", dockerfile.args["CLIP_REVISION"])
    import importlib.util

    spec = importlib.util.spec_from_file_location("offline_assets", DOCKER / "offline_assets.py")
    assert spec and spec.loader
    assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assets)
    assert assets.CLIP_REPO == "openai/clip-vit-large-patch14"
    assert assets.vae_approx_dir(Path("/opt/webui")) == Path("/opt/webui/models/VAE-approx")
    root = a1111_dir()
    if root is not None:
        src = (root / "modules" / "sd_vae_approx.py").read_text()
        assert f"'{assets.VAE_APPROX_URL}' + model_name" in src
        assert all(f'"{name}"' in src for name in assets.VAE_APPROX_DOWNLOADED + assets.VAE_APPROX_IN_GIT)
        assert 'os.path.join(paths.models_path, "VAE-approx", model_name)' in src
        assert (root / "models" / "VAE-approx" / "model.pt").is_file()  # in A1111's tree: not downloaded
        clip = (root / "repositories" / "stable-diffusion-stability-ai" / "ldm" / "modules" / "encoders" / "modules.py")
        if clip.is_file():
            assert f'version="{assets.CLIP_REPO}"' in clip.read_text()


def test_every_run_step_is_valid_bash(dockerfile: Any) -> None:
    assert json.loads(steps(dockerfile, "SHELL")[0][1])[0] == "/bin/bash"
    for _, run in steps(dockerfile, "RUN"):
        out = subprocess.run(["bash", "-n", "-c", run], check=False, capture_output=True, text=True)
        assert out.returncode == 0, (run, out.stderr)


def a1111_python() -> str:
    root = a1111_dir()
    python = root / "venv" / "bin" / "python" if root else None
    if python is None or not python.exists() or subprocess.run(
            [str(python), "-c", "import transformers, huggingface_hub"], check=False, capture_output=True).returncode:
        pytest.skip("no A1111 environment with transformers (SDTRT_A1111_DIR/venv): the image's libraries are needed")
    return str(python)


def test_baked_files_load_offline_with_a1111s_transformers(tmp_path: Path) -> None:
    """offline_assets.py fetch then check, in A1111's own environment (transformers 4.30.2): the hub download is
    replaced by a stand-in writing the cache layout huggingface_hub writes for a download by commit (no refs/main),
    the VAE approximations come from a local server; check then loads them all with the network off."""
    python = a1111_python()
    import torch

    served = tmp_path / "served"
    served.mkdir()
    for name in ("vaeapprox-sdxl.pt", "vaeapprox-sd3.pt"):
        torch.save({"conv.weight": torch.zeros(2)}, served / name)
    webui = tmp_path / "webui"
    (webui / "models" / "VAE-approx").mkdir(parents=True)
    torch.save({"conv.weight": torch.zeros(2)}, webui / "models" / "VAE-approx" / "model.pt")  # in A1111's tree
    handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(served)))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    files = {"vocab.json": json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, ",</w>": 2, "a</w>": 3}),
             "merges.txt": "#version: 0.2\n", "special_tokens_map.json": "{}",
             "tokenizer_config.json": json.dumps({"unk_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
                                                  "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}),
             "config.json": json.dumps({"model_type": "clip", "text_config": {"hidden_size": 8}})}
    fetch = f"""
import importlib.util, os, sys, types
from pathlib import Path
def snapshot_download(repo, revision, allow_patterns):
    assert (repo, allow_patterns) == ("openai/clip-vit-large-patch14", ["*.json", "*.txt"])
    snap = Path(os.environ["HF_HOME"], "hub", "models--openai--clip-vit-large-patch14", "snapshots", revision)
    snap.mkdir(parents=True)
    for name, text in {files!r}.items():
        (snap / name).write_text(text)
    return str(snap)
sys.modules["huggingface_hub"] = types.SimpleNamespace(snapshot_download=snapshot_download)
spec = importlib.util.spec_from_file_location("offline_assets", {str(DOCKER / "offline_assets.py")!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
m.VAE_APPROX_URL = "http://127.0.0.1:{server.server_address[1]}/"
m.main(["fetch", "--webui", {str(webui)!r}, "--clip-revision", "{'3' * 40}"])
"""
    env = clean_env(HF_HOME=tmp_path / "hf")
    try:
        fetched = subprocess.run([python, "-c", fetch], check=False, env=env, capture_output=True, text=True,
                                 timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "hf/hub/models--openai--clip-vit-large-patch14/refs/main").read_text() == "3" * 40
    check = [python, str(DOCKER / "offline_assets.py"), "check", "--webui", str(webui)]
    online = subprocess.run(check, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert online.returncode == 1 and "check runs with HF_HUB_OFFLINE=1" in online.stderr
    offline = subprocess.run(check, check=False, env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                             capture_output=True, text=True, timeout=120)
    assert offline.returncode == 0, offline.stderr
    assert "openai/clip-vit-large-patch14: vocabulary 4, hidden size 8" in offline.stdout
    assert offline.stdout.count(": 1 tensors") == 3
    (tmp_path / "hf/hub/models--openai--clip-vit-large-patch14/refs/main").unlink()  # what the download leaves
    unresolved = subprocess.run(check, check=False, env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                                capture_output=True, text=True, timeout=120)
    assert unresolved.returncode != 0 and "a CLIPTokenizer tokenizer" in unresolved.stderr
