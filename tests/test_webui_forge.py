"""The extension inside a fake Forge (tests/fake_forge, harness tests/fakeforge.py), loaded through the real
scripts/sdtrt_webui.py as the fake A1111 loads it, and driven through the txt2img API path: Forge detection and the
REST API, engine generations (the object patch of `diffusion_model`, taken out again after the generation: Forge's
loader never moves the PyTorch UNet meanwhile, and no stale patch makes Forge drop a later LoRA), hires fix, LoRA
merged the way Forge merges it, the engine convention (an engine following Forge's upsampling serves sizes that are
not multiples of 64 px; an A1111-convention one runs them on PyTorch with the notice, and the prediction says so) and
other extensions' UNet patches that must run on PyTorch with their notice.

Every case compares final latents with the same generation with SD Unet None (PyTorch), within the tolerance of
tests/test_webui_a1111.py and tests/test_fleet.py (1e-3 of the latents' magnitude: the fp32 onnxruntime engine agrees
with the fp32 PyTorch UNet to ~1e-6 per call; a wrong weight, input or upsampling gives differences of the latents'
own size)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import sdtrt.webui.service as service_module
from conftest import WEBUI_PROFILE
from fakeforge import FakeForge
from sdtrt.hosts import A1111, FORGE, running_host
from sdtrt.pipeline.checkpoint import read_unet_state_dict
from webui_support import close_webuis

pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
TORCH_UNET = "IntegratedUNet2DConditionModel"
PATCH_SCRIPT = '''
import os

from modules import scripts


def louder(h, hsp, transformer_options):
    return h * 1.25, hsp


class UnetPatchForTest(scripts.Script):
    """Patches the UNet's inside for this sampling pass as Forge's FreeU does (clone, set_model_*_patch, put back)."""

    def title(self):
        return os.environ.get("FAKE_FORGE_PATCH_TITLE", "UNet patch")

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process_before_every_sampling(self, p, *args, **kwargs):
        if os.environ.get("FAKE_FORGE_UNET_PATCH") != "1":
            return
        unet = p.sd_model.forge_objects.unet.clone()
        unet.set_model_output_block_patch(louder)
        p.sd_model.forge_objects.unet = unet

    def postprocess(self, p, processed, *args):  # A1111's Script has it (the fake A1111's lacks the default)
        pass
'''


@pytest.fixture(scope="module")
def sd1_checkpoint(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """The tiny SD1 checkpoint (seed 0) without the config yaml A1111 needs beside it: Forge takes the architecture
    from the weights alone (SD1's 8 attention heads), and the tiny yaml says 2."""
    path = tmp_path_factory.mktemp("forge-ckpt") / "sd1-s0.safetensors"
    shutil.copy2(tiny_checkpoint("sd1", 0), path)
    return path


@pytest.fixture(scope="module")
def sd1_cache(sd1_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An engine cache with one onnxruntime engine of `sd1_checkpoint`."""
    from sdtrt.pipeline.build import build_engine
    from sdtrt.profiles import Profile

    cache = tmp_path_factory.mktemp("forge-engines")
    build_engine(sd1_checkpoint, [Profile.parse(WEBUI_PROFILE)], cache, backend="onnxruntime")
    return cache


@pytest.fixture
def boot(tmp_path: Path, sd1_checkpoint: Path, sd1_cache: Path):  # type: ignore[no-untyped-def]
    hosts: list[FakeForge] = []

    def make(cache: Path | None = None, extensions: dict[str, Path] | None = None) -> FakeForge:
        service_module._SERVICE = None  # one service per WebUI process
        cfg = {"sd_unet": "Automatic", "sdtrt_enabled": True, "sdtrt_fallback": "pytorch",
               "sdtrt_cache_dir": str(cache or sd1_cache)}
        host = FakeForge.boot(tmp_path / f"forge{len(hosts)}", [sd1_checkpoint], config=cfg,
                              extensions={"sd-webui-trt": ROOT, **(extensions or {})})
        hosts.append(host)
        return host

    yield make
    close_webuis(hosts)


def forge_host() -> Any:
    """sdtrt.hosts.forge, importable only inside the (fake) Forge."""
    import sdtrt.hosts.forge

    return sdtrt.hosts.forge


def svc() -> service_module.EngineService:
    return service_module.service()


def counters() -> dict[str, Any]:
    return svc().counters.snapshot()


def gen(host: FakeForge, unet: str = "Automatic", **kw: Any) -> Any:
    kw.setdefault("prompt", "a photo of a cat")
    kw.setdefault("negative_prompt", "blurry")
    kw.setdefault("steps", STEPS)
    kw.setdefault("width", 64)
    kw.setdefault("height", 64)
    kw.setdefault("seed", 1234)
    kw["override_settings"] = {"sd_unet": unet, **kw.get("override_settings", {})}
    return host.txt2img(**kw)


def run(host: FakeForge, unet: str = "Automatic", **kw: Any) -> tuple[Any, dict[str, int]]:
    """(result, counter deltas) of one generation."""
    before = counters()
    result = gen(host, unet, **kw)
    after = counters()
    return result, {k: after[k] - before[k] for k in ("engine_calls", "fallback_calls")}


def assert_close(engine: torch.Tensor, reference: torch.Tensor, rel: float = 1e-3) -> None:
    assert engine.shape == reference.shape and engine.dtype == reference.dtype
    scale = reference.abs().max().item()
    assert scale > 0.1
    diff = (engine - reference).abs().max().item()
    assert diff <= rel * scale, f"max |diff| {diff} for latents of magnitude {scale}"


def assert_differs(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-2) -> None:
    diff = (a - b).abs().max().item()
    assert diff > rel * b.abs().max().item(), f"max |diff| {diff}: too small to tell the two apart"


def fallback_note(result: Any) -> str:
    return str(result.extra_generation_params.get("TensorRT fallback", ""))


def assert_unpatched(host: FakeForge) -> None:
    """No engine patch outlives the generation: `diffusion_model` is the PyTorch UNet again, no loaded patcher
    still holds an original to put back, and the extension's host sees that same UNet."""
    unet = host.kmodel.diffusion_model
    assert type(unet).__name__ == TORCH_UNET
    assert all(not lm.model.object_patches_backup for lm in host.memory_management.current_loaded_models)
    assert svc().require_host().torch_unet() is unet


def add_lora(host: FakeForge, name: str, checkpoint: Path, seed: int) -> Path:
    lora_files = pytest.importorskip("lora_files")
    path = host.data_dir / "models" / "Lora" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    return lora_files.write_lora(path, read_unet_state_dict(checkpoint), "lora", seed=seed)


# ---- 1. detection and the REST API ------------------------------------------------------------------------------
def test_forge_is_detected_and_the_api_builds_for_the_loaded_checkpoint(boot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    host = boot(cache=tmp_path / "fresh-cache")
    assert running_host() == FORGE
    assert isinstance(svc().require_host(), forge_host().ForgeHost)
    client = host.client()
    r = client.get("/sdtrt/v1/engines")  # before Forge loaded a model (its FakeInitialModel)
    assert r.status_code == 200 and r.json() == {"engines": []}, r.text
    assert client.get("/sdtrt/v1/status").status_code == 200
    assert svc().require_host().loaded_checkpoint() is None

    gen(host, unet="None")  # Forge loads the model at the first generation
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
    assert "[TRT] sd1-s0" in [o.label for o in host.sd_unet.unet_options]  # the SD Unet list was refreshed
    _, delta = run(host)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert host.errors == []
    host.close()
    assert running_host() == A1111  # nothing of the fake Forge left importable


# ---- 2. engine generations ---------------------------------------------------------------------------------------
def test_txt2img_runs_on_the_engine_through_the_object_patch_and_takes_it_out(boot) -> None:  # type: ignore[no-untyped-def]
    host = boot()
    reference, delta = run(host, unet="None")
    assert delta == {"engine_calls": 0, "fallback_calls": 0}
    assert (TORCH_UNET, "convert") in host.reached  # a PyTorch pass: Forge's loader moves the UNet (recorder works)
    torch_unet = host.kmodel.diffusion_model

    host.clear_trace()
    result, delta = run(host)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(result.latents, reference.latents)
    assert "TensorRT fallback" not in result.extra_generation_params
    # Forge's loader loaded the patched KModel (it moved it) but never reached the PyTorch UNet
    assert ("KModel", "cpu") in host.moves
    assert [r for r in host.reached if r[0] == TORCH_UNET] == []
    assert {c["module"] for c in host.calls if c["where"] == "apply_model"} == {"EngineModule"}
    assert [c for c in host.calls if c["where"] == "torch"] == []
    assert_unpatched(host)
    assert host.kmodel.diffusion_model is torch_unet

    again, delta = run(host, unet="None")  # PyTorch again: the same model, the same image
    assert delta["engine_calls"] == 0 and torch.equal(again.latents, reference.latents)

    batch_ref, _ = run(host, unet="None", batch_size=2, n_iter=2)
    batch, delta = run(host, batch_size=2, n_iter=2)  # a patched clone per batch, each loaded by Forge
    assert delta == {"engine_calls": 2 * STEPS, "fallback_calls": 0}
    assert_close(batch.latents, batch_ref.latents)
    assert_unpatched(host)
    assert host.errors == []


def test_hires_fix_both_passes_on_the_engine(boot) -> None:  # type: ignore[no-untyped-def]
    """Forge calls process_before_every_sampling twice in the hires pass (before and after it resets the objects);
    the second pass runs with hr_cfg 1.0 (cond rows only)."""
    host = boot()
    kw = {"enable_hr": True, "hr_scale": 2.0, "hr_second_pass_steps": 2, "denoising_strength": 0.5}
    reference, _ = run(host, unet="None", **kw)
    host.clear_trace()
    result, delta = run(host, **kw)
    assert delta == {"engine_calls": STEPS + 2, "fallback_calls": 0}
    assert result.latents.shape[-2:] == (16, 16)
    assert_close(result.latents, reference.latents)
    assert [r for r in host.reached if r[0] == TORCH_UNET] == []
    assert_unpatched(host)
    assert host.errors == []


# ---- 3. sizes Forge's UNet computes differently: the engine convention ----------------------------------------------
@pytest.fixture(scope="module")
def both_cache(sd1_checkpoint: Path, sd1_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with the A1111-convention engine of `sd1_cache` and a Forge-convention one of the same checkpoint and
    profile (two ids, side by side)."""
    from sdtrt.models.convention import FORGE
    from sdtrt.pipeline.build import build_engine
    from sdtrt.profiles import Profile

    cache = tmp_path_factory.mktemp("forge-both-engines")
    for engine in sd1_cache.iterdir():
        if not engine.name.startswith("."):
            shutil.copytree(engine, cache / engine.name)
    build_engine(sd1_checkpoint, [Profile.parse(WEBUI_PROFILE)], cache, backend="onnxruntime", convention=FORGE)
    return cache


def test_an_a1111_convention_engine_runs_off_grid_sizes_on_pytorch_with_the_notice(boot, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    host = boot()  # the cache holds an A1111-convention engine (the headless build's default)
    size = {"width": 72, "height": 64}  # latent 9x8: Forge upsamples to the skip's size, this engine would resize
    reference, _ = run(host, unet="None", **size)
    result, delta = run(host, **size)
    assert delta == {"engine_calls": 0, "fallback_calls": STEPS}
    note = fallback_note(result)
    assert "follows A1111's upsampling" in note and "build an engine with the Forge convention" in note, note
    assert torch.equal(result.latents, reference.latents)
    assert_unpatched(host)
    client = host.client()  # the coverage prediction says so beforehand, and offers a Forge-convention build
    body = {"prompt": "a photo of a cat", "steps": STEPS, **size}
    predicted = client.post("/sdtrt/v1/coverage", json=body).json()
    assert predicted["engine"] is False and "follows A1111's upsampling" in predicted["reason"], predicted
    assert predicted["passes"][0]["kind"] == "other_convention"
    assert predicted["build"]["convention"] == "forge" and predicted["build"]["checkpoint"].startswith("sd1-s0")
    on_grid = client.post("/sdtrt/v1/coverage", json={**body, "width": 64}).json()
    assert on_grid["engine"] is True  # where both conventions compute the same, the A1111 engine serves
    served, delta = run(host, width=64, height=64)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}

    import sdtrt.models.convention

    monkeypatch.setattr(sdtrt.models.convention, "ALIGNED_LATENT", 1)  # without the refusal it would serve it ...
    served, delta = run(host, **size)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_differs(served.latents, reference.latents)  # ... and compute another image than Forge
    assert host.errors == []


def test_a_forge_convention_engine_serves_off_grid_sizes_with_pytorchs_latents(boot, both_cache: Path) -> None:  # type: ignore[no-untyped-def]
    host = boot(cache=both_cache)
    client = host.client()
    rows = client.get("/sdtrt/v1/engines").json()["engines"]
    assert sorted(r["convention"] for r in rows) == ["a1111", "forge"] and all(r["ok"] for r in rows), rows
    forge_id = next(r["id"] for r in rows if r["convention"] == "forge")
    for size in ({"width": 72, "height": 64}, {"width": 64, "height": 104}, {"width": 64, "height": 64}):
        reference, _ = run(host, unet="None", **size)  # (Forge loads the model at the first generation)
        body = {"prompt": "a photo of a cat", "steps": STEPS, **size}
        predicted = client.post("/sdtrt/v1/coverage", json=body).json()
        # the host's convention first: the Forge engine serves, on the 8-grid too
        assert predicted["engine"] is True and predicted["passes"][0]["engine_id"] == forge_id, predicted
        host.clear_trace()
        result, delta = run(host, **size)
        assert delta == {"engine_calls": STEPS, "fallback_calls": 0}, size
        assert_close(result.latents, reference.latents)
        assert "TensorRT fallback" not in result.extra_generation_params
        assert [c for c in host.calls if c["where"] == "torch"] == []
        assert_unpatched(host)
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2, "denoising_strength": 0.5}
    reference, _ = run(host, unet="None", **hires)  # 64 -> 96 px: latent 12x12 in the hires pass
    result, delta = run(host, **hires)
    assert delta == {"engine_calls": STEPS + 2, "fallback_calls": 0}
    assert_close(result.latents, reference.latents)
    assert host.errors == []


def test_builds_in_forge_default_to_its_convention_and_check_the_name(boot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    host = boot(cache=tmp_path / "fresh-cache")
    gen(host, unet="None")
    client = host.client()
    base = {"checkpoint": "sd1-s0", "profiles": [WEBUI_PROFILE], "backend": "onnxruntime"}
    for bad in ("comfy", "Forge", ""):
        r = client.post("/sdtrt/v1/engines", json={**base, "convention": bad})
        assert r.status_code == 400 and "convention must be 'a1111' or 'forge'" in r.json()["detail"], r.text
    ids = {}
    for convention in (None, "a1111"):
        job = svc().submit_build("sd1-s0", [WEBUI_PROFILE], "onnxruntime", convention=convention)
        assert job.request["convention"] == (convention or "forge")
        for _ in range(1200):
            if svc().jobs.get(job.id).state.finished:
                break
            time.sleep(0.1)
        done = svc().jobs.get(job.id)
        assert done.state == "done", done.error
        ids[convention] = done.result["engine_id"]
    assert ids[None] != ids["a1111"]  # two engines of one checkpoint and profile, both in the cache
    rows = {r["id"]: r["convention"] for r in client.get("/sdtrt/v1/engines").json()["engines"]}
    assert rows == {ids[None]: "forge", ids["a1111"]: "a1111"}
    assert host.errors == []


# ---- 4. LoRA (Forge's patcher) -------------------------------------------------------------------------------------
def test_lora_matches_forges_merge_and_survives_the_engine_patch(boot, sd1_checkpoint: Path) -> None:  # type: ignore[no-untyped-def]
    """Forge merges a LoRA into the PyTorch UNet when its patcher loads, resolving weight names through the KModel -
    so through the engine's object patch (a fallback call must see the LoRA), and only while no stale patch hides
    the UNet's keys when the LoRA is read (a patch left in after a generation makes Forge drop the next LoRA)."""
    host = boot()
    add_lora(host, "net", sd1_checkpoint, seed=3)
    plain, lora = "a photo of a cat", "a photo of a cat <lora:net:0.8>"
    plain_ref, _ = run(host, unet="None", prompt=plain)
    lora_ref, _ = run(host, unet="None", prompt=lora)
    assert_differs(lora_ref.latents, plain_ref.latents)

    first, delta = run(host, prompt=lora)  # the engine gets Forge's merge of the LoRA by refit
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(first.latents, lora_ref.latents)
    assert_unpatched(host)

    back, delta = run(host, prompt=plain)  # the LoRA gone: base weights again
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(back.latents, plain_ref.latents)
    assert_unpatched(host)

    again, _ = run(host, unet="None", prompt=lora)  # Forge reads the LoRA after an engine generation: still applied
    assert torch.equal(again.latents, lora_ref.latents)

    size = {"width": 72, "height": 64}  # PyTorch calls under the patch: Forge merged the LoRA through it
    odd_ref, _ = run(host, unet="None", prompt=lora, **size)
    odd, delta = run(host, prompt=lora, **size)
    assert delta == {"engine_calls": 0, "fallback_calls": STEPS}
    assert torch.equal(odd.latents, odd_ref.latents)
    odd_plain, _ = run(host, unet="None", prompt=plain, **size)
    assert_differs(odd.latents, odd_plain.latents)
    assert_unpatched(host)

    none, _ = run(host, unet="None", prompt=plain)  # and Forge un-merges it for the next plain generation
    assert torch.equal(none.latents, plain_ref.latents)
    assert host.errors == []


# ---- 5. another extension's UNet patch -----------------------------------------------------------------------------
@pytest.mark.parametrize("title", [
    "A UNet patch",  # its process_before_every_sampling runs before the extension's (as Forge's built-in FreeU)
    # ... and after: it clones the extension's patched clone, Forge loads that one, and the patch must still be taken
    # out at the end (else Forge drops the next LoRA it merges)
    "Z UNet patch",
])
def test_a_unet_patch_by_another_extension_runs_on_pytorch(boot, sd1_checkpoint: Path, tmp_path: Path, monkeypatch,  # type: ignore[no-untyped-def]
                                                           title: str) -> None:
    ext = tmp_path / "unet-patch-ext"
    (ext / "scripts").mkdir(parents=True)
    (ext / "scripts" / "unet_patch.py").write_text(PATCH_SCRIPT, encoding="utf-8")
    monkeypatch.setenv("FAKE_FORGE_PATCH_TITLE", title)
    host = boot(extensions={"unet-patch": ext})
    add_lora(host, "net", sd1_checkpoint, seed=3)
    plain_ref, _ = run(host, unet="None")
    lora_ref, _ = run(host, unet="None", prompt="a photo of a cat <lora:net:0.8>")
    monkeypatch.setenv("FAKE_FORGE_UNET_PATCH", "1")
    patched_ref, _ = run(host, unet="None")
    assert_differs(patched_ref.latents, plain_ref.latents)

    result, delta = run(host)
    assert delta == {"engine_calls": 0, "fallback_calls": STEPS}
    assert forge_host().UNET_PATCHED.format(keys="patches") in fallback_note(result)
    assert_close(result.latents, patched_ref.latents)
    left_in = type(host.kmodel.diffusion_model).__name__

    monkeypatch.delenv("FAKE_FORGE_UNET_PATCH")
    lora, _ = run(host, unet="None", prompt="a photo of a cat <lora:net:0.8>")
    assert torch.equal(lora.latents, lora_ref.latents), "the LoRA was dropped"
    assert left_in == TORCH_UNET
    plain, delta = run(host)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(plain.latents, plain_ref.latents)
    assert_unpatched(host)
    assert host.errors == []


def test_prompt_chunks_are_counted_by_forges_own_text_processing(boot) -> None:  # type: ignore[no-untyped-def]
    host = boot()
    forge = svc().require_host()
    assert isinstance(forge, forge_host().ForgeHost)
    gen(host, "None")  # Forge loads its model at the first generation
    long = " ".join(["cat"] * 80)  # more than one 75-token chunk
    assert (forge.prompt_chunks("a cat", False), forge.prompt_chunks(long, False)) == (1, 2)
    assert forge.prompt_chunks("a cat AND a dog", False) == 1  # AND parts counted each
