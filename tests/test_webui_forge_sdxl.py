"""SDXL (base and refiner) in the fake Forge (tests/fake_forge: `backend/diffusion_engine/sdxl.py`, the loader's choice
of the engine class by the UNet's context and `y` widths, the `y` condition through `KModel.apply_model`, all written
from Forge dfdcbab's source), served by an onnxruntime engine built headless from the checkpoint file.

Forge's conditioning first: the `y` vector (2816 for the base = pooled CLIP-G 1280 + six 256-wide embeddings of
height, width, crop top/left, target height/width; 2560 for the refiner = pooled CLIP-G + height, width, crop
top/left and the aesthetic score). Then generations compared with SD Unet None (PyTorch) as in
tests/test_webui_forge.py: txt2img on the engine with engine calls == steps (base and refiner), a size outside the
engine's profile on PyTorch with the notice, and a LoRA merged the way Forge merges it, refitted into the engine.
Last Forge's refiner switch within a generation (`modules/sd_samplers_common.py` apply_refiner, modelled in the
fake): PyTorch's latents with the base's steps on its engine and the refiner's on the refiner's.

The checkpoints have SDXL's 64 channels per attention head (what Forge's guess and the fake's loader assume for
SDXL: no config yaml), so the tiny UNets are 64 channels wide."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import sdtrt.webui.service as service_module
from conftest import WEBUI_PROFILE
from fakeforge import FakeForge
from sdtrt.constants import SDXL_BASE_CONTEXT_DIM, SDXL_BASE_Y_WIDTH, SDXL_REFINER_CONTEXT_DIM, SDXL_REFINER_Y_WIDTH
from sdtrt.tools.tiny import standard_spec, write_checkpoint
from test_webui_forge import (
    ROOT,
    STEPS,
    add_lora,
    assert_close,
    assert_differs,
    assert_unpatched,
    fallback_note,
    run,
    svc,
)
from webui_support import close_webuis

pytest.importorskip("fastapi")

#: SDXL's block layouts (tools/tiny.py's sdxl-base / sdxl-refiner) at 64 channels: SDXL's heads of 64 channels
SPECS = {
    "sdxl-base": standard_spec(model_channels=64, transformer_depth=(0, 1, 2), transformer_depth_middle=2,
                               context_dim=SDXL_BASE_CONTEXT_DIM, use_linear=True, num_head_channels=64,
                               adm_in_channels=SDXL_BASE_Y_WIDTH),
    "sdxl-refiner": standard_spec(model_channels=64, channel_mult=(1, 2, 2, 2), transformer_depth=(0, 1, 1, 0),
                                  context_dim=SDXL_REFINER_CONTEXT_DIM, use_linear=True, num_head_channels=64,
                                  adm_in_channels=SDXL_REFINER_Y_WIDTH),
}


def _checkpoint(family: str, factory: pytest.TempPathFactory) -> Path:
    """A tiny `family` checkpoint as Forge users have them: the file alone (Forge reads no config yaml)."""
    directory = factory.mktemp(f"forge-{family}")
    path = write_checkpoint(SPECS[family], directory, f"{family}-s0", seed=0)
    path.with_suffix(".yaml").unlink()
    return path


def _cache(*paths: Path, factory: pytest.TempPathFactory) -> Path:
    """An engine cache with one onnxruntime engine of each of `paths` (build_engine headless, from the file) following
    Forge's upsampling (what builds in Forge default to: it serves sizes that are not multiples of 64 px too)."""
    from sdtrt.models.convention import FORGE
    from sdtrt.pipeline.build import build_engine
    from sdtrt.profiles import Profile

    cache = factory.mktemp("forge-sdxl-engines")
    for path in paths:
        build_engine(path, [Profile.parse(WEBUI_PROFILE)], cache, backend="onnxruntime", convention=FORGE)
    return cache


@pytest.fixture(scope="module")
def sdxl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint("sdxl-base", tmp_path_factory)


@pytest.fixture(scope="module")
def sdxl_cache(sdxl_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cache(sdxl_checkpoint, factory=tmp_path_factory)


@pytest.fixture(scope="module")
def refiner_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint("sdxl-refiner", tmp_path_factory)


@pytest.fixture(scope="module")
def both_cache(sdxl_checkpoint: Path, refiner_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An engine cache with an engine of the base and one of the refiner."""
    return _cache(sdxl_checkpoint, refiner_checkpoint, factory=tmp_path_factory)


@pytest.fixture
def boot(tmp_path: Path):  # type: ignore[no-untyped-def]
    hosts: list[FakeForge] = []

    def make(checkpoint: Path | list[Path], cache: Path) -> FakeForge:
        service_module._SERVICE = None  # one service per WebUI process
        checkpoints = checkpoint if isinstance(checkpoint, list) else [checkpoint]
        cfg = {"sd_unet": "Automatic", "sdtrt_enabled": True, "sdtrt_fallback": "pytorch",
               "sdtrt_cache_dir": str(cache), "sd_model_checkpoint": checkpoints[0].stem}
        host = FakeForge.boot(tmp_path / f"forge{len(hosts)}", checkpoints, config=cfg,
                              extensions={"sd-webui-trt": ROOT})
        hosts.append(host)
        return host

    yield make
    close_webuis(hosts)


def unet_calls(host: FakeForge) -> list[dict[str, Any]]:
    return [c for c in host.calls if c["where"] == "apply_model"]


# ---- Forge's SDXL conditioning ------------------------------------------------------------------------------------
def test_forge_loads_sdxl_by_its_weights_and_conditions_it_with_the_size_vector(boot, sdxl_checkpoint: Path,
                                                                                  sdxl_cache: Path) -> None:  # type: ignore[no-untyped-def]
    host = boot(sdxl_checkpoint, sdxl_cache)
    run(host, unet="None")  # Forge loads the model at the first generation
    model = host.sd_model
    assert type(model).__name__ == "StableDiffusionXL" and model.is_sdxl and not model.is_sd1
    assert model.model_config.huggingface_repo == "stabilityai/stable-diffusion-xl-base-1.0"
    assert type(host.kmodel.diffusion_model).__name__ == "IntegratedUNet2DConditionModel"

    from modules import prompt_parser

    from sdtrt.models.torch_unet import timestep_embedding

    host.opts.data.update(sdxl_crop_top=8, sdxl_crop_left=16)
    cond = model.get_learned_conditioning(prompt_parser.SdConditioning(["a cat", "a dog"], width=96, height=64))
    assert cond["crossattn"].shape == (2, 77, 2048) and cond["vector"].shape == (2, 2816)
    sizes = cond["vector"][:, 1280:].reshape(2, 6, 256)
    for i, value in enumerate((64, 96, 8, 16, 64, 96)):  # height, width, crop top, crop left, target h, target w
        assert torch.equal(sizes[:, i], timestep_embedding(torch.tensor([float(value)]), 256).expand(2, -1)), i
    assert_differs(cond["vector"][0, :1280], cond["vector"][1, :1280])  # pooled CLIP-G per prompt
    empty = model.get_learned_conditioning(prompt_parser.SdConditioning([""], is_negative_prompt=True, width=64,
                                                                        height=64))
    assert not empty["crossattn"].any() and not empty["vector"][:, :1280].any() and empty["vector"][:, 1280:].any()


# ---- the engine serves SDXL ---------------------------------------------------------------------------------------
def test_sdxl_txt2img_runs_on_the_engine_with_pytorchs_latents(boot, sdxl_checkpoint: Path, sdxl_cache: Path) -> None:  # type: ignore[no-untyped-def]
    host = boot(sdxl_checkpoint, sdxl_cache)
    reference, delta = run(host, unet="None")
    assert delta == {"engine_calls": 0, "fallback_calls": 0}
    calls = unet_calls(host)
    assert calls and all(c["extra"] == ["y"] and c["context"] == (2, 77, 2048) for c in calls), calls[:1]
    loaded = svc().require_host().loaded_checkpoint()
    assert loaded is not None and loaded.model_name == "sdxl-base-s0" and loaded.config is None

    host.clear_trace()
    result, delta = run(host)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(result.latents, reference.latents)
    assert "TensorRT fallback" not in result.extra_generation_params
    assert {c["module"] for c in unet_calls(host)} == {"EngineModule"}
    assert [c for c in host.calls if c["where"] == "torch"] == []
    assert_unpatched(host)

    other, _ = run(host, unet="None", width=128, height=96)  # the size vector changes with the size: still equal
    served, delta = run(host, width=128, height=96)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(served.latents, other.latents)
    batch_ref, _ = run(host, unet="None", batch_size=2)
    batch, delta = run(host, batch_size=2)  # 4 rows (cond + uncond) per call: the profile's largest batch
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(batch.latents, batch_ref.latents)
    assert host.errors == []


def test_an_sdxl_size_outside_the_profile_runs_on_pytorch_with_the_notice(boot, sdxl_checkpoint: Path,
                                                                          sdxl_cache: Path) -> None:  # type: ignore[no-untyped-def]
    host = boot(sdxl_checkpoint, sdxl_cache)
    size = {"width": 192, "height": 64}  # the profile's widest is 128 px
    reference, _ = run(host, unet="None", **size)
    result, delta = run(host, **size)
    assert delta == {"engine_calls": 0, "fallback_calls": STEPS}
    note = fallback_note(result)
    assert "no engine profile covers" in note, note
    assert torch.equal(result.latents, reference.latents)
    assert_unpatched(host)
    _, delta = run(host)  # and the next covered generation is on the engine again
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert host.errors == []


def test_an_sdxl_lora_is_refitted_into_the_engine(boot, sdxl_checkpoint: Path, sdxl_cache: Path) -> None:  # type: ignore[no-untyped-def]
    host = boot(sdxl_checkpoint, sdxl_cache)
    add_lora(host, "xl", sdxl_checkpoint, seed=3)
    plain, lora = "a photo of a cat", "a photo of a cat <lora:xl:0.8>"
    plain_ref, _ = run(host, unet="None", prompt=plain)
    lora_ref, _ = run(host, unet="None", prompt=lora)
    assert_differs(lora_ref.latents, plain_ref.latents)
    refits = svc().counters.snapshot().get("refits", 0)
    result, delta = run(host, prompt=lora)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert svc().counters.snapshot().get("refits", 0) > refits
    assert_close(result.latents, lora_ref.latents)
    assert_unpatched(host)
    back, delta = run(host, prompt=plain)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(back.latents, plain_ref.latents)
    assert host.errors == []


# ---- the refiner ----------------------------------------------------------------------------------------------------
def test_the_sdxl_refiner_runs_on_its_engine_with_pytorchs_latents(boot, refiner_checkpoint: Path,  # type: ignore[no-untyped-def]
                                                                      both_cache: Path) -> None:
    host = boot(refiner_checkpoint, both_cache)
    reference, _ = run(host, unet="None")
    model = host.sd_model
    assert type(model).__name__ == "StableDiffusionXLRefiner" and model.is_sdxl
    calls = unet_calls(host)
    assert calls and all(c["extra"] == ["y"] and c["context"] == (2, 77, 1280) for c in calls), calls[:1]

    from modules import prompt_parser

    from sdtrt.models.torch_unet import timestep_embedding

    for negative, option in ((False, "sdxl_refiner_high_aesthetic_score"), (True, "sdxl_refiner_low_aesthetic_score")):
        cond = model.get_learned_conditioning(prompt_parser.SdConditioning(["a cat"], is_negative_prompt=negative,
                                                                           width=64, height=64))
        assert cond["crossattn"].shape == (1, 77, 1280) and cond["vector"].shape == (1, 2560)
        aesthetic = timestep_embedding(torch.tensor([float(host.opts.data.get(option, 6.0 if not negative else 2.5))]),
                                       256)
        assert torch.equal(cond["vector"][:, -256:], aesthetic), option

    result, delta = run(host)
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(result.latents, reference.latents)
    assert_unpatched(host)
    assert host.errors == []


# ---- Forge's refiner switch within a generation ---------------------------------------------------------------------
def _switch(host: FakeForge, unet: str) -> tuple[Any, dict[str, int]]:
    return run(host, unet=unet, refiner_checkpoint="sdxl-refiner-s0", refiner_switch_at=0.3)


def test_the_refiner_switch_gives_pytorchs_latents_and_the_base_steps_run_on_the_engine(  # type: ignore[no-untyped-def]
        boot, sdxl_checkpoint: Path, refiner_checkpoint: Path, both_cache: Path) -> None:
    host = boot([sdxl_checkpoint, refiner_checkpoint], both_cache)
    base_only, _ = run(host, unet="None")
    reference, delta = _switch(host, "None")
    assert delta == {"engine_calls": 0, "fallback_calls": 0}
    assert reference.extra_generation_params["Refiner switch at"] == 0.3
    contexts = [c["context"][-1] for c in unet_calls(host)[-STEPS:]]
    assert contexts == [2048, 1280, 1280], contexts  # step 0 on the base, steps 1, 2 (1/3, 2/3 >= 0.3) on the refiner
    assert_differs(reference.latents, base_only.latents)

    result, delta = _switch(host, "Automatic")
    assert_close(result.latents, reference.latents)
    # the base's step on its engine, the refiner's (after Forge's switch inside the sampling loop, which runs no
    # sampling hook) on the refiner's engine: served again from on_cfg_denoiser
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}, delta
    assert_unpatched(host)
    after, delta = run(host)  # the next generation: the base reloaded, on its engine
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(after.latents, base_only.latents)
    assert host.errors == []
