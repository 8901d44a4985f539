"""The extension inside a fake Forge Neo (tests/fake_neo over tests/fake_forge, harness tests/fakeforge.py with
`variant="neo"`), loaded through the real scripts/sdtrt_webui.py and driven through the txt2img API path.

Neo (Haoming02's sd-webui-forge-classic `neo`, as vendored in exo101/sd-webui-forge-neo-v3 @ f95f632; research note
docs/forge/NEO.md) differs from lllyasviel's Forge where the adapter touches it: no `SdUnet`, no `sd_hijack` /
`sd_models_config`, a ComfyUI-style ModelPatcher (LoRA as `unet.patches` 6-tuples merged at load time by
`patch_weight_to_device`, loaded-weight bookkeeping on the KModel that makes a patched load look like a LoRA load,
shared object-patch backups, weakref'd LoadedModel records), `block_inner_modifiers`, `sd_forge_compile`, and a hires
pass that calls process_before_every_sampling once.

The first tests check the fake itself: its module layout, and that the two traps NEO.md §B found with Neo's real
patcher code happen in it (a naive adapter fails them). The rest run the extension: engine generations == PyTorch
(tolerance as tests/test_webui_forge.py), the patch gone afterwards, hires, LoRA (refit; the LoRA still right for
PyTorch generations afterwards; a LoRA change after an engine generation; PyTorch calls inside an engine generation
with the LoRA applied once), Forge's ControlNet on an engine with ControlNet inputs, and what runs on PyTorch with
the notice (block_inner_modifiers, torch.compile)."""

from __future__ import annotations

import importlib
import importlib.util
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import sdtrt.webui.service as service_module
from conftest import WEBUI_PROFILE
from fakeforge import FakeForge
from sdtrt.hosts import A1111, FORGE, running_host
from test_webui_forge import (  # noqa: F401
    PATCH_SCRIPT,
    STEPS,
    TORCH_UNET,
    add_lora,
    assert_close,
    assert_differs,
    counters,
    fallback_note,
    forge_host,
    gen,
    run,
    sd1_cache,
    sd1_checkpoint,
    svc,
)
from test_webui_forge_controlnet import cn_cache, unit, units  # noqa: F401
from webui_support import close_webuis

pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[1]
LORA = "a photo of a cat <lora:net:0.8>"
PLAIN = "a photo of a cat"

#: a stand-in for an engine adapter that only does what Forge's `forge_unpatch_model` did, on Neo:
#: `add_object_patch("diffusion_model", ...)` on a clone before sampling, `unpatch_model(unpatch_weights=False)` at
#: the end (NAIVE_ADAPTER=restore), or nothing at the end (NAIVE_ADAPTER=leave)
NAIVE_SCRIPT = '''
import os

import torch
from modules import scripts


class Hider(torch.nn.Module):
    """Holds the PyTorch UNet outside its module tree (as the extension's EngineModule) and runs it."""

    def __init__(self, unet):
        super().__init__()
        self.__dict__["unet"] = unet

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["unet"], name)

    def forward(self, *args, **kwargs):
        return self.__dict__["unet"](*args, **kwargs)


class NaiveAdapterForTest(scripts.Script):
    clones = []

    def title(self):
        return "Naive adapter"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process_before_every_sampling(self, p, *args, **kwargs):
        if not os.environ.get("NAIVE_ADAPTER"):
            return
        unet = p.sd_model.forge_objects.unet
        torch_unet = unet.model.diffusion_model
        torch_unet = torch_unet.__dict__.get("unet", torch_unet)
        clone = unet.clone()
        clone.add_object_patch("diffusion_model", Hider(torch_unet))
        p.sd_model.forge_objects.unet = clone
        self.clones.append(clone)

    def postprocess(self, p, processed, *args):
        clones, NaiveAdapterForTest.clones = self.clones, []
        if os.environ.get("NAIVE_ADAPTER") == "restore":
            for clone in clones:
                clone.unpatch_model(unpatch_weights=False)
'''

#: another extension changing the UNet's inside through Neo's TimestepEmbedSequential hook
INNER_SCRIPT = '''
import os

from modules import scripts


def louder_resblocks(x, when, layer, layer_index, block, transformer_options):
    return x * 1.1 if when == "after" and layer_index == 0 else x


class InnerModifierForTest(scripts.Script):
    def title(self):
        return "Inner modifier"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process_before_every_sampling(self, p, *args, **kwargs):
        if os.environ.get("NEO_INNER_MODIFIER") != "1":
            return
        unet = p.sd_model.forge_objects.unet.clone()
        unet.add_block_inner_modifier(louder_resblocks)
        p.sd_model.forge_objects.unet = unet

    def postprocess(self, p, processed, *args):
        pass
'''


def script_extension(tmp_path: Path, name: str, source: str) -> Path:
    ext = tmp_path / name
    (ext / "scripts").mkdir(parents=True)
    (ext / "scripts" / f"{name.replace('-', '_')}.py").write_text(source, encoding="utf-8")
    return ext


@pytest.fixture
def boot(tmp_path: Path, sd1_checkpoint: Path, sd1_cache: Path):  # type: ignore[no-untyped-def]  # noqa: F811
    hosts: list[FakeForge] = []

    def make(cache: Path | None = None, extensions: dict[str, Path] | None = None) -> FakeForge:
        service_module._SERVICE = None  # one service per WebUI process
        cfg = {"sd_unet": "Automatic", "sdtrt_enabled": True, "sdtrt_fallback": "pytorch",
               "sdtrt_cache_dir": str(cache or sd1_cache)}
        host = FakeForge.boot(tmp_path / f"neo{len(hosts)}", [sd1_checkpoint], config=cfg, variant="neo",
                              extensions={"sd-webui-trt": ROOT, **(extensions or {})})
        hosts.append(host)
        return host

    yield make
    close_webuis(hosts)


def run_counted(host: FakeForge, unet: str = "Automatic", **kw: Any) -> tuple[Any, dict[str, int]]:
    """(result, deltas of engine calls, fallback calls and refits) of one generation."""
    before = counters()
    result = gen(host, unet, **kw)
    after = counters()
    return result, {k: after[k] - before[k] for k in ("engine_calls", "fallback_calls", "refits")}


def engine_module_type() -> type:
    return forge_host().EngineModule


def assert_unpatched(host: FakeForge) -> None:
    """No engine patch outlives the generation (Neo's records included: their `.model` may be None, or a parent)."""
    kmodel = host.kmodel
    assert type(kmodel.diffusion_model).__name__ == TORCH_UNET
    for record in host.memory_management.current_loaded_models:
        patcher = record.model
        if patcher is None:
            continue
        assert not isinstance(patcher.object_patches.get("diffusion_model"), engine_module_type())
        assert not patcher.object_patches_backup, patcher.object_patches_backup
    assert svc().require_host().torch_unet() is kmodel.diffusion_model


def watch_moves_while_patched(host: FakeForge, monkeypatch: Any) -> list[str]:
    """Records each device/dtype move that reaches the PyTorch UNet while `diffusion_model` is not the UNet (the
    engine's patch installed). Neo's loader cannot reach it then; a release before installing the patch may move it
    (to the offload device), which is fine."""
    kmodel = host.kmodel
    unet = kmodel.diffusion_model
    seen: list[str] = []
    original = unet._apply

    def _apply(fn: Any, *args: Any, **kwargs: Any) -> Any:
        current = kmodel._modules["diffusion_model"]
        if current is not unet:
            seen.append(type(current).__name__)
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(unet, "_apply", _apply)
    return seen


def compile_script(host: FakeForge) -> Any:
    runner = host.m("scripts").scripts_txt2img
    return next(s for s in runner.alwayson_scripts if s.title() == "Torch Compile")


def lora_weight(host: FakeForge) -> torch.Tensor:
    """One UNet weight the test LoRA changes (its first patched key), as the PyTorch UNet holds it now."""
    [key] = sorted(host.sd_model.forge_objects_after_applying_lora.unet.patches)[:1]
    return host.kmodel.diffusion_model.get_parameter(key[len("diffusion_model."):]).detach().clone()


# ---- 0. the fake itself ----------------------------------------------------------------------------------------
def test_the_fake_has_neos_modules_and_patcher(boot) -> None:  # type: ignore[no-untyped-def]
    host = boot()
    from modules import sd_unet

    assert running_host() == FORGE
    assert not hasattr(sd_unet, "SdUnet") and hasattr(sd_unet, "SdUnetOption")
    for name in ("modules.sd_hijack", "modules.sd_models_config"):
        assert importlib.util.find_spec(name) is None
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(name)
    from backend import memory_management, utils
    from backend.patcher.base import ModelPatcher
    from modules_forge import forge_version

    assert forge_version.version == "neo"
    for gone in ("forge_patch_model", "forge_unpatch_model", "refresh_loras", "lora_loader"):
        assert not hasattr(ModelPatcher, gone)
    assert all(hasattr(ModelPatcher, n) for n in ("patch_model", "unpatch_model", "partially_load", "detach",
                                                  "patch_weight_to_device", "add_patches"))
    assert not hasattr(memory_management, "unload_model_clones")
    assert memory_management.vram_state == memory_management.VRAMState.DISABLED
    holder = torch.nn.Module()
    holder.child = torch.nn.Linear(1, 1)
    old = holder.child
    assert utils.set_attr_raw(holder, "child", torch.nn.Identity()) is old

    gen(host, unet="None")
    model = host.sd_model
    assert model.is_webui_legacy_model() and model.current_lora_hash == str([])
    unet = model.forge_objects.unet
    assert not hasattr(unet, "lora_patches") and unet.patches == {}
    clone = unet.clone()
    assert clone.parent is unet and clone.backup is unet.backup
    assert clone.object_patches_backup is unet.object_patches_backup
    [record] = [r for r in memory_management.current_loaded_models if r.model is not None and r.model.model is
                host.kmodel]
    assert type(record).model.__class__ is property
    assert host.kmodel.model_loaded_weight_memory > 0
    host.close()
    assert importlib.util.find_spec("backend") is None and running_host() == A1111


def test_the_fake_reproduces_neos_traps_for_a_naive_adapter(boot, sd1_checkpoint: Path, tmp_path: Path,  # type: ignore[no-untyped-def]  # noqa: F811
                                                            monkeypatch) -> None:
    """NEO.md §B with the fake's patcher, through generations and an adapter that only does what Forge needed
    (object patch, then `unpatch_model(unpatch_weights=False)`): B) its patched load is recorded as "loaded with
    the LoRA merged", so the next PyTorch generation with the same LoRA runs WITHOUT it; C) a patch left in place
    hides the UNet's keys from the next LoRA load, which drops the LoRA until the LoRA set changes."""
    host = boot(extensions={"naive-adapter": script_extension(tmp_path, "naive-adapter", NAIVE_SCRIPT)})
    add_lora(host, "net", sd1_checkpoint, seed=3)
    plain_ref, _ = run(host, unet="None", prompt=PLAIN)
    lora_ref, _ = run(host, unet="None", prompt=LORA)
    assert_differs(lora_ref.latents, plain_ref.latents)
    run(host, unet="None", prompt=PLAIN)

    monkeypatch.setenv("NAIVE_ADAPTER", "restore")  # B
    run(host, unet="None", prompt=LORA)
    monkeypatch.delenv("NAIVE_ADAPTER")
    assert type(host.kmodel.diffusion_model).__name__ == TORCH_UNET  # the UNet is back ...
    after, _ = run(host, unet="None", prompt=LORA)
    assert torch.equal(after.latents, plain_ref.latents)  # ... but the LoRA is silently missing
    assert not torch.equal(after.latents, lora_ref.latents)

    run(host, unet="None", prompt=PLAIN)  # (a LoRA change unloads: clean again)
    again, _ = run(host, unet="None", prompt=LORA)
    assert torch.equal(again.latents, lora_ref.latents)

    run(host, unet="None", prompt=PLAIN)
    monkeypatch.setenv("NAIVE_ADAPTER", "leave")  # C
    run(host, unet="None", prompt=PLAIN)
    monkeypatch.delenv("NAIVE_ADAPTER")
    dropped, _ = run(host, unet="None", prompt=LORA)  # the LoRA is read while the patch still hides the UNet
    assert host.sd_model.forge_objects_after_applying_lora.unet.patches == {}
    assert torch.equal(dropped.latents, plain_ref.latents)
    still, _ = run(host, unet="None", prompt=LORA)  # and stays dropped: the hash says it is applied
    assert torch.equal(still.latents, plain_ref.latents)
    assert host.errors == []


# ---- 1. loading and the REST API -------------------------------------------------------------------------------
def test_the_extension_loads_without_sdunet_and_the_api_builds(boot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    host = boot(cache=tmp_path / "fresh-cache")
    assert not hasattr(host.sd_unet, "SdUnet")
    assert host.errors == []  # the glue imported (no SdUnet, no sd_hijack) and registered its SD Unet option
    assert isinstance(svc().require_host(), forge_host().ForgeHost)
    client = host.client()
    r = client.get("/sdtrt/v1/engines")  # before Neo loaded a model
    assert r.status_code == 200 and r.json() == {"engines": []}, r.text
    assert client.get("/sdtrt/v1/status").status_code == 200

    gen(host, unet="None")  # Neo loads the model at the first generation
    loaded = svc().require_host().loaded_checkpoint()
    assert loaded is not None and loaded.model_name == "sd1-s0" and loaded.config is None
    r = client.post("/sdtrt/v1/engines", json={"checkpoint": "sd1-s0", "profiles": [WEBUI_PROFILE],
                                               "backend": "onnxruntime"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    for _ in range(1200):
        job = client.get(f"/sdtrt/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            break
        time.sleep(0.1)
    assert job["state"] == "done", job
    [row] = client.get("/sdtrt/v1/engines").json()["engines"]
    assert row["id"] == job["engine_id"] and row["ok"], row
    assert "[TRT] sd1-s0" in [o.label for o in host.sd_unet.unet_options]
    reference, _ = run(host, unet="None")
    result, delta = run(host)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(result.latents, reference.latents)
    assert host.errors == []


# ---- 2. engine generations ---------------------------------------------------------------------------------------
def test_txt2img_runs_on_the_engine_and_the_patch_is_gone_afterwards(boot, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    host = boot()
    reference, delta = run(host, unet="None")
    assert delta == {"engine_calls": 0, "fallback_calls": 0}
    torch_unet = host.kmodel.diffusion_model
    moved_while_patched = watch_moves_while_patched(host, monkeypatch)

    host.clear_trace()
    result, delta = run(host)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(result.latents, reference.latents)
    assert "TensorRT fallback" not in result.extra_generation_params
    assert moved_while_patched == []  # Neo's loader never moved the PyTorch UNet while the engine served
    assert {c["module"] for c in host.calls if c["where"] == "apply_model"} == {"EngineModule"}
    assert [c for c in host.calls if c["where"] == "torch"] == []
    assert_unpatched(host)
    assert host.kmodel.diffusion_model is torch_unet

    again, delta = run(host, unet="None")
    assert delta["engine_calls"] == 0 and torch.equal(again.latents, reference.latents)
    batch_ref, _ = run(host, unet="None", batch_size=2, n_iter=2)
    batch, delta = run(host, batch_size=2, n_iter=2)
    assert delta == {"engine_calls": 2 * STEPS, "fallback_calls": 0}
    assert_close(batch.latents, batch_ref.latents)
    assert_unpatched(host)
    assert host.errors == []


def test_hires_fix_both_passes_on_the_engine(boot, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Neo calls process_before_every_sampling once in the hires pass (after resetting the objects)."""
    host = boot()
    kw = {"enable_hr": True, "hr_scale": 2.0, "hr_second_pass_steps": 2, "denoising_strength": 0.5}
    reference, _ = run(host, unet="None", **kw)
    moved_while_patched = watch_moves_while_patched(host, monkeypatch)
    host.clear_trace()
    result, delta = run(host, **kw)
    assert delta == {"engine_calls": STEPS + 2, "fallback_calls": 0}
    assert result.latents.shape[-2:] == (16, 16)
    assert_close(result.latents, reference.latents)
    assert moved_while_patched == []
    assert_unpatched(host)
    assert host.errors == []


# ---- 3. LoRA (Neo's patcher) ---------------------------------------------------------------------------------------
def test_lora_on_the_engine_by_refit_and_still_right_for_pytorch_afterwards(boot, sd1_checkpoint: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """The engine gets Neo's merge of `unet.patches` by refit; the engine generation must leave Neo's load records so
    that the next PyTorch generation with the same LoRA merges it (NEO.md §B trap B), and no patch in place when
    the LoRA set changes (trap C)."""
    host = boot()
    add_lora(host, "net", sd1_checkpoint, seed=3)
    add_lora(host, "other", sd1_checkpoint, seed=4)
    other = "a photo of a cat <lora:other:0.8>"
    plain_ref, _ = run(host, unet="None", prompt=PLAIN)
    lora_ref, _ = run(host, unet="None", prompt=LORA)
    other_ref, _ = run(host, unet="None", prompt=other)
    assert_differs(lora_ref.latents, plain_ref.latents)
    assert_differs(other_ref.latents, lora_ref.latents)
    run(host, unet="None", prompt=PLAIN)

    first, delta = run_counted(host, prompt=LORA)  # the first load after the LoRA change is the engine's
    assert delta["engine_calls"] == STEPS and delta["fallback_calls"] == 0, fallback_note(first)
    assert delta["refits"] >= 1
    assert_close(first.latents, lora_ref.latents)
    assert_unpatched(host)

    same, _ = run(host, unet="None", prompt=LORA)  # the same LoRA on PyTorch: Neo must merge it now
    assert torch.equal(same.latents, lora_ref.latents), "the LoRA went missing after the engine generation"
    assert_unpatched(host)

    engine_again, delta = run_counted(host, prompt=LORA)
    assert delta["engine_calls"] == STEPS
    assert_close(engine_again.latents, lora_ref.latents)
    changed, _ = run(host, unet="None", prompt=other)  # a LoRA change right after an engine generation loads
    assert torch.equal(changed.latents, other_ref.latents), "the LoRA was dropped"
    assert host.sd_model.forge_objects_after_applying_lora.unet.patches

    engine_other, delta = run_counted(host, prompt=other)
    assert delta["engine_calls"] == STEPS and delta["refits"] >= 1
    assert_close(engine_other.latents, other_ref.latents)
    back, delta = run_counted(host, prompt=PLAIN)  # no LoRA: the base weights again
    assert delta["engine_calls"] == STEPS
    assert_close(back.latents, plain_ref.latents)
    none, _ = run(host, unet="None", prompt=PLAIN)
    assert torch.equal(none.latents, plain_ref.latents)
    assert_unpatched(host)
    assert host.errors == []


@pytest.mark.parametrize("why", [
    "hires-outside-the-profile",
    "another-extensions-patch",  # its hook runs before ours
    "another-extensions-patch-after-ours",  # it clones our patched clone: Neo loads that one (its parent is ours)
])
def test_pytorch_calls_inside_an_engine_generation_apply_the_lora_once(boot, sd1_checkpoint: Path, tmp_path: Path,  # type: ignore[no-untyped-def]  # noqa: F811
                                                                       monkeypatch, why: str) -> None:
    """A pass (or a call) that runs on PyTorch while the engine's patch hides the UNet from Neo's loader: the adapter
    merges the LoRA itself (Neo's patch_weight_to_device), once, and takes it out again with the patch."""
    ext = script_extension(tmp_path, "unet-patch", PATCH_SCRIPT)
    monkeypatch.setenv("FAKE_FORGE_PATCH_TITLE", "Z UNet patch" if why.endswith("after-ours") else "A UNet patch")
    host = boot(extensions={"unet-patch": ext})
    add_lora(host, "net", sd1_checkpoint, seed=3)
    if why == "hires-outside-the-profile":  # 64 px -> 160 px: the second pass is outside the profile (<= 128 px)
        kw: dict[str, Any] = {"enable_hr": True, "hr_scale": 2.5, "hr_second_pass_steps": 2,
                              "denoising_strength": 0.5}
        expected = {"engine_calls": STEPS, "fallback_calls": 2}
    else:
        kw = {}
        monkeypatch.setenv("FAKE_FORGE_UNET_PATCH", "1")
        expected = {"engine_calls": 0, "fallback_calls": STEPS}
    plain_ref, _ = run(host, unet="None", prompt=PLAIN, **kw)
    lora_ref, _ = run(host, unet="None", prompt=LORA, **kw)
    assert_differs(lora_ref.latents, plain_ref.latents)
    run(host, unet="None", prompt=PLAIN, **kw)

    result, delta = run(host, prompt=LORA, **kw)
    assert delta == expected, fallback_note(result)
    assert fallback_note(result)
    assert_close(result.latents, lora_ref.latents)  # the LoRA applied on the PyTorch calls, and only once
    assert_unpatched(host)
    again, _ = run(host, unet="None", prompt=LORA, **kw)  # Neo's next load of the LoRA: not doubled, not missing
    assert torch.equal(again.latents, lora_ref.latents)
    result, delta = run(host, prompt=LORA, **kw)  # the LoRA already merged by Neo before the engine generation
    assert delta == expected
    assert_close(result.latents, lora_ref.latents)
    plain, _ = run(host, unet="None", prompt=PLAIN, **kw)
    assert torch.equal(plain.latents, plain_ref.latents)
    assert_unpatched(host)
    assert host.errors == []


# ---- 4. Forge's built-in ControlNet ---------------------------------------------------------------------------------
def test_a_controlnet_unit_runs_on_an_engine_with_controlnet_inputs(boot, cn_cache: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    host = boot(cache=cn_cache)
    plain, _ = run(host, unet="None")
    given = units(unit(), unit("tiny-t2i-adapter", weight=0.7))
    reference, _ = run(host, unet="None", **given)
    assert_differs(reference.latents, plain.latents)
    result, delta = run(host, **given)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}, fallback_note(result)
    assert_close(result.latents, reference.latents)
    assert_unpatched(host)
    again, delta = run(host)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(again.latents, plain.latents)
    assert host.errors == []


# ---- 5. what runs on PyTorch with the notice ------------------------------------------------------------------------
def test_a_block_inner_modifier_runs_on_pytorch_with_the_notice(boot, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    host = boot(extensions={"inner": script_extension(tmp_path, "inner", INNER_SCRIPT)})
    plain_ref, _ = run(host, unet="None")
    monkeypatch.setenv("NEO_INNER_MODIFIER", "1")
    reference, _ = run(host, unet="None")
    assert_differs(reference.latents, plain_ref.latents)  # Neo's UNet runs it
    result, delta = run(host)
    assert delta == {"engine_calls": 0, "fallback_calls": STEPS}
    assert forge_host().UNET_PATCHED.format(keys="block_inner_modifiers") in fallback_note(result)
    assert_close(result.latents, reference.latents)
    assert_unpatched(host)
    monkeypatch.delenv("NEO_INNER_MODIFIER")
    plain, delta = run(host)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(plain.latents, plain_ref.latents)
    assert host.errors == []


def test_torch_compile_active_runs_on_pytorch_with_the_notice(boot) -> None:  # type: ignore[no-untyped-def]
    """Neo's sd_forge_compile wraps `KModel.apply_model` and compiles whatever `diffusion_model` is: never the
    engine's module."""
    host = boot()
    compile_on = {"alwayson_scripts": {"Torch Compile": {"args": ["dynamic"]}}}
    compile_off = {"alwayson_scripts": {"Torch Compile": {"args": ["Disable"]}}}
    plain_ref, _ = run(host, unet="None", **compile_off)
    reference, _ = run(host, unet="None", **compile_on)
    assert hasattr(host.kmodel, "_orig_apply_model")
    compiled = compile_script(host).process_batch.__globals__["compiled"]
    assert compiled and set(compiled) == {TORCH_UNET}
    compiled.clear()
    result, delta = run(host, **compile_on)
    assert delta["engine_calls"] == 0
    assert "compile" in fallback_note(result).lower(), fallback_note(result)
    assert torch.equal(result.latents, reference.latents)
    assert set(compiled) == {TORCH_UNET}  # the PyTorch UNet compiled, never the engine's module
    assert_unpatched(host)
    result, delta = run(host, **compile_off)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(result.latents, plain_ref.latents)
    assert host.errors == []


def test_a_neo_whose_object_patch_cannot_hold_a_module_runs_on_pytorch_with_the_notice(boot, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """February 2026 Neo (NEO.md, F26): `patch_model` sets object patches wrapped in a Parameter, so a module patch
    raises inside Neo's loader. The adapter must find that out before patching (NEO.md "Concrete changes" 2) and
    leave the generation to PyTorch with a notice - no traceback, PyTorch's latents."""
    host = boot()
    reference, _ = run(host, unet="None")
    from backend import utils

    monkeypatch.setattr(utils, "F26_SET_ATTR", True)
    result, delta = run(host)
    assert delta["engine_calls"] == 0
    assert fallback_note(result), result.extra_generation_params
    assert torch.equal(result.latents, reference.latents)
    assert type(host.kmodel.diffusion_model).__name__ == TORCH_UNET
    assert host.errors == []
