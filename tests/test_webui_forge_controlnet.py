"""Forge's built-in ControlNet and T2I-Adapter on the engine (sdtrt/hosts/forge_control.py) in the fake Forge
(tests/fake_forge: `backend/patcher/controlnet.py`, the built-in `sd_forge_controlnet` script, the sampling's
`control` dict and the UNet's `apply_control`, all written from Forge dfdcbab's source).

First the mapping itself: Forge's UNet given a `control` dict == the engine's module (`models/control.py`) given the
converted residuals. Then whole generations: units (ControlNet at two weights and a guidance range, a T2I-Adapter,
both together) on an engine with ControlNet inputs give PyTorch's latents with every call on the engine; what the
engine cannot take runs on PyTorch with the reason (reference-only patches the UNet's inside; a plain engine has no
ControlNet inputs), and `/sdtrt/v1/coverage` predicts each case."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import WEBUI_PROFILE
from test_webui_forge import (  # noqa: F401
    STEPS,
    assert_close,
    assert_differs,
    assert_unpatched,
    boot,
    fallback_note,
    run,
    sd1_cache,
    sd1_checkpoint,
)

pytest.importorskip("fastapi")


def unit(model: str = "tiny-controlnet", **kw: Any) -> dict[str, Any]:
    return {"enabled": True, "module": "None", "model": model, "weight": 1.0, **kw}


def units(*given: dict[str, Any]) -> dict[str, Any]:
    return {"alwayson_scripts": {"ControlNet": {"args": list(given)}}}


@pytest.fixture(scope="module")
def cn_cache(sd1_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """An engine cache with one onnxruntime engine with ControlNet inputs."""
    from sdtrt.pipeline.build import build_engine
    from sdtrt.profiles import Profile

    cache = tmp_path_factory.mktemp("forge-cn-engines")
    build_engine(sd1_checkpoint, [Profile.parse(WEBUI_PROFILE)], cache, backend="onnxruntime", controlnet=True)
    return cache


def forge_control() -> Any:
    import sdtrt.hosts.forge_control

    return sdtrt.hosts.forge_control


def test_forges_control_dict_becomes_the_engines_residuals(boot) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """Forge's UNet with a control dict (adapter features at SD1's points, a residual per skip, a middle one,
    Forge's list order) == our ControlNet export module with the converted inputs; the dict is left as it was."""
    from sdtrt.models.control import _ControlLoop
    from sdtrt.models.ldm import LdmUNetControl

    host = boot()
    run(host, unet="None")  # Forge loads the model
    unet = host.kmodel.diffusion_model
    g = torch.Generator().manual_seed(5)  # (the tiny checkpoint's weights are all random)
    layout = unet.spec.skip_layout()
    blocks = len(layout) - 1
    points = tuple(i for i in LdmUNetControl.adapter_after if i < blocks)
    assert points, "the tiny UNet has no adapter injection point"
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, unet.spec.context_dim, generator=g)

    def shaped(c: int, level: int) -> torch.Tensor:
        return torch.randn(2, c, -(-8 // 2**level), -(-8 // 2**level), generator=g)

    residuals = [shaped(c, level) for c, level in layout]
    features = [shaped(*layout[i]) if i in points else None for i in range(blocks)]
    control = {"input": list(reversed(features)), "middle": [residuals[-1]], "output": residuals[:-1]}
    kept = {k: list(v) for k, v in control.items()}

    feeds = forge_control().control_feeds(control, len(layout), points)
    assert {k: list(v) for k, v in control.items()} == kept
    module = _ControlLoop(unet, with_y=False, n_skips=len(layout), adapter_after=points)
    with torch.no_grad():
        ours = module(x, t, context, *[s if s is not None else torch.zeros_like(r)
                                       for s, r in zip(feeds.skips, residuals)], *feeds.adapters)
        forge = unet(x, t, context=context, control={k: list(v) for k, v in control.items()},
                     transformer_options={})
        plain = unet(x, t, context=context, transformer_options={})
    assert (forge - plain).abs().max() > 1e-2  # the residuals matter
    assert torch.allclose(ours, forge, atol=1e-5, rtol=1e-5), (ours - forge).abs().max()

    stray = [None] * blocks
    stray[1] = shaped(*layout[1])
    with pytest.raises(Exception, match="after input block 1"):
        forge_control().control_feeds({"input": list(reversed(stray))}, len(layout), points)
    with pytest.raises(Exception, match="no inputs for"):
        forge_control().control_feeds({"output": residuals[:-1], "extra": [residuals[0]]}, len(layout), points)


@pytest.mark.parametrize("case", [
    "controlnet", "controlnet-half-weight-first-half", "t2i-adapter", "controlnet-and-t2i-adapter"])
def test_forge_controlnet_units_run_on_the_engine_with_pytorchs_latents(boot, cn_cache: Path, case: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    given = {"controlnet": [unit()],
             "controlnet-half-weight-first-half": [unit(weight=0.5, guidance_end=0.5)],
             "t2i-adapter": [unit("tiny-t2i-adapter")],
             "controlnet-and-t2i-adapter": [unit(), unit("tiny-t2i-adapter", weight=0.7)]}[case]
    host = boot(cache=cn_cache)
    plain, _ = run(host, unet="None")
    reference, _ = run(host, unet="None", **units(*given))
    assert_differs(reference.latents, plain.latents)  # the units change the result

    client = host.client()
    body = {"prompt": "a photo of a cat", "steps": STEPS, "width": 64, "height": 64,
            "override_settings": {"sd_unet": "Automatic"}, **units(*given)}
    predicted = client.post("/sdtrt/v1/coverage", json=body).json()
    assert predicted["engine"] is True, predicted
    result, delta = run(host, **units(*given))
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}, fallback_note(result)
    assert_close(result.latents, reference.latents)
    assert "TensorRT fallback" not in result.extra_generation_params
    assert_unpatched(host)
    again, delta = run(host)  # the units are gone with their generation
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(again.latents, plain.latents)
    assert host.errors == []


def test_what_the_engine_cannot_take_runs_on_pytorch_with_the_reason(boot, cn_cache: Path, sd1_cache: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from sdtrt.webui.controlnet import NO_CONTROL_ENGINE

    # reference-only patches the UNet's inside: PyTorch, told, predicted
    host = boot(cache=cn_cache)
    ref_units = units(unit(module="reference_only", model="None"))
    reference, _ = run(host, unet="None", **ref_units)
    body = {"prompt": "a photo of a cat", "steps": STEPS, "width": 64, "height": 64,
            "override_settings": {"sd_unet": "Automatic"}, **ref_units}
    predicted = host.client().post("/sdtrt/v1/coverage", json=body).json()
    assert predicted["engine"] is False and "changes the UNet's inside" in (predicted["reason"] or ""), predicted
    result, delta = run(host, **ref_units)
    assert delta == {"engine_calls": 0, "fallback_calls": STEPS}
    assert "block_modifiers" in fallback_note(result)
    assert_close(result.latents, reference.latents)
    assert_unpatched(host)

    # an engine without ControlNet inputs: ControlNet units on PyTorch with the build hint, predicted
    host = boot(cache=sd1_cache)
    cn_units = units(unit())
    reference, _ = run(host, unet="None", **cn_units)
    predicted = host.client().post("/sdtrt/v1/coverage", json={**body, **cn_units}).json()
    assert predicted["engine"] is False and predicted["reason"] == NO_CONTROL_ENGINE, predicted
    result, delta = run(host, **cn_units)
    assert delta == {"engine_calls": 0, "fallback_calls": STEPS}
    assert NO_CONTROL_ENGINE in fallback_note(result)
    assert_close(result.latents, reference.latents)
    plain_ref, _ = run(host, unet="None")
    plain, delta = run(host)  # without units the plain engine serves again
    assert delta == {"engine_calls": STEPS, "fallback_calls": 0}
    assert_close(plain.latents, plain_ref.latents)
    assert_unpatched(host)
    assert host.errors == []
