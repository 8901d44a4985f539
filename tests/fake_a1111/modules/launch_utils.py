"""`launch` helpers for install.py: `is_installed`, `run`, `run_pip` (no-op under --skip-install), `args`, `python`.

Fake-only: `run_pip` records every command in `pip_calls` and only executes it when FAKE_A1111_RUN_PIP=1, so tests
never install packages by accident."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

from modules import cmd_args

args, _ = cmd_args.parser.parse_known_args()
python = sys.executable
git = os.environ.get("GIT", "git")
index_url = os.environ.get("INDEX_URL", "")
dir_repos = "repositories"
default_command_live = os.environ.get("WEBUI_LAUNCH_LIVE_OUTPUT") == "1"
pip_calls: list[str] = []


def run(command, desc=None, errdesc=None, custom_env=None, live: bool = default_command_live) -> str:  # type: ignore[no-untyped-def]
    if desc is not None:
        print(desc)
    run_kwargs = {"args": command, "shell": True, "env": os.environ if custom_env is None else custom_env,
                  "encoding": "utf8", "errors": "ignore"}
    if not live:
        run_kwargs["stdout"] = run_kwargs["stderr"] = subprocess.PIPE
    result = subprocess.run(**run_kwargs)  # noqa: PLW1510
    if result.returncode != 0:
        error_bits = [f"{errdesc or 'Error running command'}.", f"Command: {command}",
                      f"Error code: {result.returncode}"]
        if result.stdout:
            error_bits.append(f"stdout: {result.stdout}")
        if result.stderr:
            error_bits.append(f"stderr: {result.stderr}")
        raise RuntimeError("\n".join(error_bits))
    return result.stdout or ""


def is_installed(package):  # type: ignore[no-untyped-def]
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def run_pip(command, desc=None, live=default_command_live):  # type: ignore[no-untyped-def]
    if args.skip_install:
        return None
    index_url_line = f" --index-url {index_url}" if index_url != "" else ""
    full = f'"{python}" -m pip {command} --prefer-binary{index_url_line}'
    pip_calls.append(full)
    if os.environ.get("FAKE_A1111_RUN_PIP") != "1":
        return ""
    return run(full, desc=f"Installing {desc}", errdesc=f"Couldn't install {desc}", live=live)


def run_python(code, desc=None, errdesc=None):  # type: ignore[no-untyped-def]
    return run(f'"{python}" -c "{code}"', desc, errdesc)


def run_extension_installer(extension_dir):  # type: ignore[no-untyped-def]
    """Runs <extension_dir>/install.py as a subprocess with PYTHONPATH=<install dir> (launch_utils semantics)."""
    from modules.paths_internal import script_path

    path_installer = os.path.join(extension_dir, "install.py")
    if not os.path.isfile(path_installer):
        return None
    env = os.environ.copy()
    env["PYTHONPATH"] = f"{script_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return run(f'"{python}" "{path_installer}"', errdesc=f"Error running install.py for extension {extension_dir}",
               custom_env=env)


def git_tag():  # type: ignore[no-untyped-def]
    return "v1.10.1"


def commit_hash():  # type: ignore[no-untyped-def]
    return "82a973c04367123ae98bd9abdf80d9eda9b910e2"
