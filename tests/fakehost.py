"""Test harness around the fake AUTOMATIC1111 v1.10.1 host in `tests/fake_a1111/` (CPU only, no WebUI needed).

Usage::

    from fakehost import FakeHost

    with FakeHost.boot(tmp_path, checkpoints=[ckpt_path], args=["--no-half"], extensions=[repo_root],
                       config={"sd_unet": "Automatic"}) as host:
        processed = host.txt2img(prompt="a cat", steps=3, width=64, height=64)
        processed.latents          # final latents (N, 4, h, w), before the fake VAE decode
        host.unet_calls            # every UNet call: "routed" (at the diffusion_model call site) and "torch"
        host.client().post("/sdapi/v1/txt2img", json={...})

API
---
`FakeHost.boot(tmp_path, checkpoints=(), *, args=(), extensions=(), config=None, ckpt=None, ui=False, lora=True)`
    - `checkpoints`: paths of `.safetensors` files (their `<stem>.yaml` is copied along when present), or a dict
      `{"sub/name.safetensors": path}` to choose names (subfolders make `model_name` "sub_name", as in A1111).
      They are copied into `<data-dir>/models/Stable-diffusion/`.
    - `args`: extra command-line flags (`--no-half`, `--medvram`, `--lowvram`, `--api-auth u:p`,
      `--skip-load-model-at-start`, ...). Always added: `--data-dir`, `--skip-prepare-environment`,
      `--skip-install`, `--skip-torch-cuda-test`, `--use-cpu all`, `--no-download-sd-model`, and `--nowebui`
      unless `ui=True`. Unknown flags fail like the real parser (SystemExit).
    - `extensions`: extension roots (or `{dirname: root}`), symlinked as `<data-dir>/extensions/<dirname>`.
    - `config`: written to `<data-dir>/config.json` when not None. A1111 *replaces* `opts.data` with that file,
      so keys absent from it are not restored after `override_settings` (pass {"sd_unet": "Automatic"} to get the
      restore). With `config=None` there is no file and every default is in `opts.data` (a fresh install).
    - `ckpt`: `--ckpt` (a checkpoint name from `checkpoints`, or a path).
    - `ui`: False = `--nowebui` order (initialize -> load_scripts -> list_unets -> model -> Api(app) (builds the
      UI: on_ui_settings, script UIs, on_ui_tabs) -> before_ui -> app_started(None, app)); True = UI order
      (initialize ... -> before_ui -> create_ui -> new app -> Api if --api -> app_started(demo, app)).
      Without gradio, on_ui_tabs is skipped (`host.ui_tabs_skipped`); on_ui_settings always runs.
    - `lora`: include the built-in Lora stand-in extension (`extensions-builtin/Lora`).
    - `threaded_load`: load the model in a thread, as the real host does (the API answers meanwhile).
    - `load_gate`: a threading.Event; every model load waits for it inside InitializeOnMeta (torch patched
      process-wide, as during a real load) until the test sets it. `host.ext_module("fake_trace").loading` is set
      while a load waits there. close() sets the gate.

Only one host can be booted at a time (module state is global, as in the real process).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from typing_extensions import Self

TESTS = Path(__file__).resolve().parent
FAKE_ROOT = TESTS / "fake_a1111"
TEST_EXTENSION = TESTS / "fake_a1111_ext"
CORE = TESTS.parent / "extension"

#: top-level names the fake provides (or shadows); cleared before a boot and after close
FAKE_TOP_LEVEL = ("modules", "ldm", "sgm", "k_diffusion", "launch", "webui", "fake_trace", "fake_clip", "fake_vae",
                  "networks", "network", "network_lora", "lora_patches", "extra_networks_lora", "lora_logger")

_active: FakeHost | None = None


def _is_fake_name(name: str) -> bool:
    return name.split(".", 1)[0] in FAKE_TOP_LEVEL


def _file_under(mod: ModuleType, roots: list[Path]) -> bool:
    f = getattr(mod, "__file__", None)
    if not f:
        return False
    p = os.path.realpath(f)
    return any(p.startswith(str(r) + os.sep) for r in roots)


class FakeHost:
    def __init__(self) -> None:
        self.data_dir: Path
        self.app: Any = None
        self.api: Any = None
        self.demo: Any = None
        self._roots: list[Path] = []
        self._before: dict[str, ModuleType] = {}
        self._stash: dict[str, ModuleType] = {}
        self._path: list[str] = []
        self._argv: list[str] = []
        self.checkpoint_paths: dict[str, Path] = {}
        self.closed = False

    # ---- boot / close ------------------------------------------------------------------------------------------

    @classmethod
    def boot(cls, tmp_path: Path, checkpoints: Any = (), *, args: Any = (), extensions: Any = (),
             config: dict | None = None, ckpt: str | None = None, ui: bool = False, lora: bool = True,
             threaded_load: bool = False, load_gate: Any = None) -> FakeHost:
        global _active
        if _active is not None and not _active.closed:
            _active.close()
        host = cls()
        host.data_dir = Path(tmp_path) / "webui-data"
        host.data_dir.mkdir(parents=True, exist_ok=True)

        models = host.data_dir / "models" / "Stable-diffusion"
        models.mkdir(parents=True, exist_ok=True)
        items = checkpoints.items() if isinstance(checkpoints, dict) else [(Path(p).name, p) for p in checkpoints]
        for rel, src in items:
            dst = models / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            yaml = Path(src).with_suffix(".yaml")
            if yaml.is_file():
                shutil.copy2(yaml, dst.with_suffix(".yaml"))
            host.checkpoint_paths[rel] = dst

        ext_dir = host.data_dir / "extensions"
        ext_dir.mkdir(exist_ok=True)
        ext_items = extensions.items() if isinstance(extensions, dict) else [(Path(p).name, p) for p in extensions]
        for name, root in ext_items:
            link = ext_dir / name
            if not link.exists():
                link.symlink_to(Path(root).resolve(), target_is_directory=True)
            host._roots.append(Path(root).resolve())
        host._roots += [FAKE_ROOT.resolve(), host.data_dir.resolve()]

        if config is not None:
            (host.data_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")

        argv = ["webui.py", "--data-dir", str(host.data_dir), "--skip-prepare-environment", "--skip-install",
                "--skip-torch-cuda-test", "--use-cpu", "all", "--no-download-sd-model"]
        if not ui:
            argv.append("--nowebui")
        if ckpt is not None:
            argv += ["--ckpt", str(host.checkpoint_paths.get(ckpt, ckpt))]
        argv += [str(a) for a in args]

        host._before = dict(sys.modules)
        host._path = list(sys.path)
        host._argv = list(sys.argv)
        for name in [n for n in sys.modules if _is_fake_name(n)]:
            host._stash[name] = sys.modules.pop(name)
        sys.path.insert(0, str(FAKE_ROOT))
        if str(CORE) not in sys.path:
            sys.path.insert(1, str(CORE))
        if not lora:
            os.environ["FAKE_A1111_NO_LORA"] = "1"
        if threaded_load:
            os.environ["FAKE_A1111_THREADED_LOAD"] = "1"
        sys.argv = argv
        _active = host
        try:
            import fake_trace
            import modules.launch_utils  # noqa: F401  (parses `launch.args` from the fake argv)
            import webui

            fake_trace.clear()
            fake_trace.load_gate = load_gate
            host.demo, host.app, host.api = webui.webui() if ui else webui.api_only()
        except BaseException:
            host.close()
            raise
        finally:
            sys.argv = host._argv
        return host

    def close(self) -> None:
        global _active
        if self.closed:
            return
        self.closed = True
        patches = sys.modules.get("modules.patches")
        if patches is not None:
            for key, entries in list(patches.originals.items()):
                for (obj, field), original in list(entries.items()):
                    setattr(obj, field, original)
                entries.clear()
        for name, mod in list(sys.modules.items()):
            if self._before.get(name) is mod:
                continue
            if _is_fake_name(name) or _file_under(mod, self._roots):
                del sys.modules[name]
        sys.modules.update(self._stash)
        sys.path[:] = self._path
        sys.argv = self._argv
        os.environ.pop("FAKE_A1111_NO_LORA", None)
        os.environ.pop("FAKE_A1111_THREADED_LOAD", None)
        trace = sys.modules.get("fake_trace")
        if trace is not None and trace.load_gate is not None:
            trace.load_gate.set()  # a load held at the gate finishes (and its torch patches are undone)
        if _active is self:
            _active = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- module access -----------------------------------------------------------------------------------------

    def m(self, name: str) -> ModuleType:
        return importlib.import_module(f"modules.{name}")

    def ext_module(self, name: str) -> ModuleType:
        return sys.modules[name]

    @property
    def shared(self) -> Any:
        return self.m("shared")

    @property
    def opts(self) -> Any:
        return self.m("shared").opts

    @property
    def sd_model(self) -> Any:
        return self.m("shared").sd_model

    @property
    def sd_unet(self) -> Any:
        return self.m("sd_unet")

    @property
    def sd_models(self) -> Any:
        return self.m("sd_models")

    @property
    def script_callbacks(self) -> Any:
        return self.m("script_callbacks")

    @property
    def scripts(self) -> Any:
        return self.m("scripts")

    @property
    def errors(self) -> list:
        return self.m("errors").reported

    @property
    def ui_tabs_skipped(self) -> bool:
        return self.m("ui").ui_tabs_skipped

    # ---- trace -------------------------------------------------------------------------------------------------

    @property
    def unet_calls(self) -> list[dict]:
        return sys.modules["fake_trace"].calls

    @property
    def routed_calls(self) -> list[dict]:
        return [c for c in self.unet_calls if c["where"] == "routed"]

    @property
    def torch_calls(self) -> list[dict]:
        return [c for c in self.unet_calls if c["where"] == "torch"]

    @property
    def moves(self) -> list[tuple[str, str]]:
        return sys.modules["fake_trace"].moves

    def clear_trace(self) -> None:
        sys.modules["fake_trace"].clear()

    # ---- generation ----------------------------------------------------------------------------------------------

    def txt2img(self, **fields: Any) -> Any:
        models = importlib.import_module("modules.api.models")
        processed, _ = self.api.run_txt2img(models.StableDiffusionTxt2ImgProcessingAPI(**fields))
        return processed

    def img2img(self, **fields: Any) -> Any:
        models = importlib.import_module("modules.api.models")
        init_images = fields.pop("init_images", None)
        mask = fields.pop("mask", None)
        req = models.StableDiffusionImg2ImgProcessingAPI(**fields)
        req.init_images = init_images
        req.mask = mask
        processed, _ = self.api.run_img2img(req)
        return processed

    def client(self, auth: tuple[str, str] | None = None) -> Any:
        from fastapi.testclient import TestClient

        client = TestClient(self.app, raise_server_exceptions=False)
        if auth is not None:
            client.auth = auth
        return client

    def reload_ui(self) -> None:
        webui = sys.modules["webui"]
        self.demo, self.app, self.api = webui.reload_ui()
