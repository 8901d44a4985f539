"""Test harness around the fake Forge (lllyasviel/stable-diffusion-webui-forge @ dfdcbab) in `tests/fake_forge/`
(CPU only). The counterpart of tests/fakehost.py for A1111, with the same shape::

    from fakeforge import FakeForge

    with FakeForge.boot(tmp_path, checkpoints=[ckpt_path], extensions={"sd-webui-trt": repo_root},
                        config={"sd_unet": "Automatic"}) as host:
        processed = host.txt2img(prompt="a cat", steps=3, width=64, height=64)
        processed.latents        # final latents (N, 4, h, w), before the fake VAE decode
        host.kmodel              # the loaded model's KModel (forge_objects.unet.model); None before the first load
        host.calls / host.reached / host.moves   # fake_forge_trace records (see tests/fake_forge/fake_forge_trace.py)

`sys.path` gets tests/fake_forge first (its `modules` and `k_diffusion` packages fall back to the fake A1111's files
where Forge kept A1111's), so `modules_forge` and `backend` are importable (sdtrt.hosts.running_host() says Forge) and
A1111's `ldm`/`sgm` are not. Forge loads no model at startup: the first generation does.

`FakeForge.boot(tmp_path, checkpoints=(), *, args=(), extensions=(), config=None, ui=False)` as FakeHost.boot:
checkpoints copied into `<data-dir>/models/Stable-diffusion/` (their yaml too), extensions symlinked into
`<data-dir>/extensions/`, `config` written to config.json, always `--data-dir --skip-prepare-environment
--skip-install --skip-torch-cuda-test --use-cpu all --no-download-sd-model` (and `--nowebui` unless `ui`).
One host at a time, Forge or A1111: booting either closes the other (module state is global).

`variant="neo"` boots the fake Forge Neo instead (tests/fake_neo, an overlay over tests/fake_forge: Neo's patcher,
memory management, LoRA flow, sd_unet without SdUnet, no sd_hijack/sd_models_config, ...; see
tests/fake_neo/README.md): tests/fake_neo goes first on `sys.path`, then tests/fake_forge, and `--cpu` is added."""

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

import fakehost

TESTS = Path(__file__).resolve().parent
FAKE_ROOT = TESTS / "fake_forge"
NEO_ROOT = TESTS / "fake_neo"
VARIANTS = ("forge", "neo")
CORE = TESTS.parent / "extension"

#: top-level names the fake Forge provides, borrows or shadows; cleared before a boot and after close
FAKE_TOP_LEVEL = ("modules", "backend", "modules_forge", "k_diffusion", "launch", "webui", "fake_forge_trace",
                  "a1111_fakes", "fake_clip", "fake_vae", "fake_trace", "ldm", "sgm", "networks", "network",
                  "extra_networks_lora", "lora", "lora_patches", "lora_logger", "fake_neo_overlay")


def _is_fake_name(name: str) -> bool:
    return name.split(".", 1)[0] in FAKE_TOP_LEVEL


def _file_under(mod: ModuleType, roots: list[Path]) -> bool:
    f = getattr(mod, "__file__", None)
    if not f:
        return False
    p = os.path.realpath(f)
    return any(p.startswith(str(r) + os.sep) for r in roots)


class FakeForge:
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
        self.variant = "forge"

    @classmethod
    def boot(cls, tmp_path: Path, checkpoints: Any = (), *, args: Any = (), extensions: Any = (),
             config: dict | None = None, ui: bool = False, variant: str = "forge") -> FakeForge:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
        if fakehost._active is not None and not fakehost._active.closed:
            fakehost._active.close()
        host = cls()
        host.variant = variant
        host.data_dir = Path(tmp_path) / "forge-data"
        models = host.data_dir / "models" / "Stable-diffusion"
        models.mkdir(parents=True, exist_ok=True)
        items = checkpoints.items() if isinstance(checkpoints, dict) else [(Path(p).name, p) for p in checkpoints]
        for rel, src in items:
            dst = models / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            if Path(src).with_suffix(".yaml").is_file():
                shutil.copy2(Path(src).with_suffix(".yaml"), dst.with_suffix(".yaml"))
            host.checkpoint_paths[rel] = dst
        ext_dir = host.data_dir / "extensions"
        ext_dir.mkdir(exist_ok=True)
        ext_items = extensions.items() if isinstance(extensions, dict) else [(Path(p).name, p) for p in extensions]
        for name, root in ext_items:
            link = ext_dir / name
            if not link.exists():
                link.symlink_to(Path(root).resolve(), target_is_directory=True)
            host._roots.append(Path(root).resolve())
        if variant == "neo":
            host._roots.append(NEO_ROOT.resolve())
        host._roots += [FAKE_ROOT.resolve(), (TESTS / "fake_a1111").resolve(), host.data_dir.resolve()]
        if config is not None:
            (host.data_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")

        argv = ["webui.py", "--data-dir", str(host.data_dir), "--skip-prepare-environment", "--skip-install",
                "--skip-torch-cuda-test", "--use-cpu", "all", "--no-download-sd-model"]
        if variant == "neo":
            argv.append("--cpu")
        if not ui:
            argv.append("--nowebui")
        argv += [str(a) for a in args]

        host._before = dict(sys.modules)
        host._path = list(sys.path)
        host._argv = list(sys.argv)
        for name in [n for n in sys.modules if _is_fake_name(n)]:
            host._stash[name] = sys.modules.pop(name)
        sys.path.insert(0, str(FAKE_ROOT))
        if variant == "neo":
            sys.path.insert(0, str(NEO_ROOT))
        if str(CORE) not in sys.path:
            sys.path.insert(1, str(CORE))
        sys.argv = argv
        fakehost._active = host  # type: ignore[assignment]  # a FakeHost boot closes this one first
        try:
            import fake_forge_trace
            import modules.launch_utils  # noqa: F401  (parses `launch.args` from the fake argv)
            import webui

            fake_forge_trace.clear()
            host.demo, host.app, host.api = webui.webui() if ui else webui.api_only()
        except BaseException:
            host.close()
            raise
        finally:
            sys.argv = host._argv
        return host

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        overlay = sys.modules.get("fake_neo_overlay")
        if overlay is not None:
            overlay.remove_hook()
        for name, mod in list(sys.modules.items()):
            if self._before.get(name) is mod:
                continue
            if _is_fake_name(name) or _file_under(mod, self._roots):
                del sys.modules[name]
        sys.modules.update(self._stash)
        sys.path[:] = self._path
        sys.argv = self._argv
        if fakehost._active is self:  # type: ignore[comparison-overlap]
            fakehost._active = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- module access -----------------------------------------------------------------------------------------
    def m(self, name: str) -> ModuleType:
        return importlib.import_module(f"modules.{name}")

    @property
    def shared(self) -> Any:
        return self.m("shared")

    @property
    def opts(self) -> Any:
        return self.m("shared").opts

    @property
    def sd_model(self) -> Any:
        return self.m("sd_models").model_data.sd_model

    @property
    def sd_unet(self) -> Any:
        return self.m("sd_unet")

    @property
    def errors(self) -> list:
        return self.m("errors").reported

    @property
    def kmodel(self) -> Any:
        """The loaded model's KModel (shared by every clone of its UNet patcher), or None before the first load."""
        objects = getattr(self.sd_model, "forge_objects", None)
        return None if objects is None else objects.unet.model

    @property
    def memory_management(self) -> Any:
        return importlib.import_module("backend.memory_management")

    # ---- trace -------------------------------------------------------------------------------------------------
    @property
    def trace(self) -> Any:
        return sys.modules["fake_forge_trace"]

    @property
    def calls(self) -> list[dict]:
        return self.trace.calls

    @property
    def reached(self) -> list[tuple[str, str]]:
        return self.trace.reached

    @property
    def moves(self) -> list[tuple[str, str]]:
        return self.trace.moves

    def clear_trace(self) -> None:
        self.trace.clear()

    # ---- generation --------------------------------------------------------------------------------------------
    def txt2img(self, **fields: Any) -> Any:
        models = importlib.import_module("modules.api.models")
        processed, _ = self.api.run_txt2img(models.StableDiffusionTxt2ImgProcessingAPI(**fields))
        return processed

    def client(self, auth: tuple[str, str] | None = None) -> Any:
        from fastapi.testclient import TestClient

        client = TestClient(self.app, raise_server_exceptions=False)
        if auth is not None:
            client.auth = auth
        return client
