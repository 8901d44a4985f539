"""The fake A1111 host (tests/fake_a1111, harness tests/fakehost.py) reproduces the behaviours of
the A1111 interface reference (shared/reference/a1111-interfaces.md) §7 that an sd_unet extension depends on. Every test drives the host
through the test extension in tests/fake_a1111_ext (an SdUnetOption per checkpoint whose SdUnet forwards to the
original torch forward and records its calls, plus an always-on script that records every hook)."""

from __future__ import annotations

import base64
import io
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_fp16
from fakehost import TEST_EXTENSION, FakeHost

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

STEPS = 3
SIZE = 64  # pixels -> 8x8 latents


@pytest.fixture
def boot(tmp_path: Path):  # type: ignore[no-untyped-def]
    hosts: list[FakeHost] = []

    def make(*checkpoints, half=False, **kw):  # type: ignore[no-untyped-def]
        # fp16 (A1111's default) is faithful but CPU fp16 convolutions are ~10x slower: tests that do not check
        # dtypes run with --no-half
        kw.setdefault("extensions", [TEST_EXTENSION])
        if not half:
            kw["args"] = ["--no-half", *kw.get("args", [])]
        ckpts = checkpoints[0] if len(checkpoints) == 1 and isinstance(checkpoints[0], dict) else list(checkpoints)
        host = FakeHost.boot(tmp_path / f"host{len(hosts)}", ckpts, **kw)
        hosts.append(host)
        return host

    yield make
    for h in hosts:
        h.close()


def state(host: FakeHost):  # type: ignore[no-untyped-def]
    return host.ext_module("fake_ext_state")


def gen(host: FakeHost, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("prompt", "a photo of a cat")
    kw.setdefault("steps", STEPS)
    kw.setdefault("width", SIZE)
    kw.setdefault("height", SIZE)
    kw.setdefault("seed", 1234)
    return host.txt2img(**kw)


def label(host: FakeHost, family_seed: str) -> str:
    return f"[FAKE] {family_seed}"


# ---- routing and call shapes ---------------------------------------------------------------------------------------


@needs_fp16
def test_one_batched_call_per_step_with_fp16_timesteps(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), half=True, config={"sd_unet": "Automatic", "fake_ext_auto": ["sd1-s0"]})
    gen(host, batch_size=2)
    calls = state(host).calls
    assert len(calls) == STEPS  # cond and uncond in ONE call per sampler step
    for c in calls:
        assert c["x"] == (4, 4, 8, 8) and c["context"] == (4, 77, 768)
        assert c["t_dtype"] == torch.float16 and c["x_dtype"] == torch.float16
        assert c["kwargs"] == [] and c["y"] is None and c["n_args"] == 0
    routed = host.routed_calls
    assert len(routed) == STEPS and all(r["engine"] == "[FAKE] sd1-s0" for r in routed)
    assert all(r["timesteps_positional"] for r in routed)  # LDM passes timesteps positionally, context= keyword
    t = routed[0]["t_values"]
    assert t[0] == t[2] and 0 < t[0] <= 999  # cond rows then uncond rows, same (float) timestep
    assert any(v != int(v) for r in routed for v in r["t_values"])  # fractional timesteps


def test_no_half_gives_fp32_timesteps(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), config={"fake_ext_auto": ["sd1-s0"]})  # the fixture adds --no-half
    gen(host)
    assert {c["t_dtype"] for c in state(host).calls} == {torch.float32}
    assert host.sd_model.model.diffusion_model.dtype == torch.float32


def test_batch_cond_uncond_off_splits_calls(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), config={"fake_ext_auto": ["sd1-s0"]})
    gen(host, batch_size=2, override_settings={"batch_cond_uncond": False})
    calls = state(host).calls
    assert len(calls) == 2 * STEPS and {c["x"][0] for c in calls} == {2}


def test_different_context_lengths_split_unless_padded(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), config={"fake_ext_auto": ["sd1-s0"]})
    long_prompt = " ".join(f"word{i}" for i in range(80))  # 80 tokens -> 2 chunks -> 154 rows
    gen(host, prompt=long_prompt, negative_prompt="")
    calls = state(host).calls
    assert [c["context"] for c in calls[:2]] == [(1, 154, 768), (1, 77, 768)]  # cond rows, then uncond alone
    assert len(calls) == 2 * STEPS
    state(host).calls.clear()
    gen(host, prompt=long_prompt, override_settings={"pad_cond_uncond": True})
    calls = state(host).calls
    assert len(calls) == STEPS and calls[0]["context"] == (2, 154, 768)
    assert all(c["context"][1] % 77 == 0 for c in calls)


@needs_fp16
@pytest.mark.parametrize(("family", "y_width", "ctx"), [("sdxl-base", 2816, 2048), ("sdxl-refiner", 2560, 1280)])
def test_sdxl_passes_y_in_kwargs(boot, tiny_checkpoint, family, y_width, ctx) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint(family), half=True, config={"fake_ext_auto": [f"{family}-s0"]})
    gen(host, steps=1)
    calls = state(host).calls
    assert len(calls) == 1 and calls[0]["t_dtype"] == torch.float16
    assert all(c["kwargs"] == ["y"] and c["y"] == (2, y_width) and c["context"] == (2, 77, ctx) for c in calls)
    assert not any(r["timesteps_positional"] for r in host.routed_calls)  # sgm: every argument is a keyword
    assert host.sd_model.is_sdxl and not host.sd_model.is_sd1


def test_sdxl_size_embedding_depends_on_resolution(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sdxl-base"))
    sdc = host.m("prompt_parser").SdConditioning
    a = host.sd_model.get_learned_conditioning(sdc(["x"], width=64, height=64))
    b = host.sd_model.get_learned_conditioning(sdc(["x"], width=96, height=64))
    assert torch.equal(a["crossattn"], b["crossattn"]) and not torch.equal(a["vector"], b["vector"])
    assert torch.equal(a["vector"][:, :1280], b["vector"][:, :1280])
    neg = host.sd_model.get_learned_conditioning(sdc([""], width=64, height=64, is_negative_prompt=True))
    assert neg["crossattn"].abs().max() == 0 and neg["vector"][:, :1280].abs().max() == 0


def test_engine_output_equals_torch_output(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), config={"sd_unet": "Automatic"})
    torch_latents = gen(host).latents
    assert host.sd_unet.current_unet is None and state(host).calls == []
    engine_latents = gen(host, override_settings={"sd_unet": "[FAKE] sd1-s0"}).latents
    assert len(state(host).calls) == STEPS
    assert torch.equal(torch_latents, engine_latents)


def test_inpaint_model_gets_nine_channels(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1-inpaint"), config={"fake_ext_auto": ["sd1-inpaint-s0"]})
    gen(host)
    assert host.sd_model.model.conditioning_key == "hybrid"
    assert {c["x"] for c in state(host).calls} == {(2, 9, 8, 8)}


def test_v_model_uses_v_denoiser(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd2-v"))
    gen(host)
    assert host.sd_model.parameterization == "v" and host.sd_model.is_sd2
    kd = sys.modules["k_diffusion"]
    sampler = host.m("sd_samplers").create_sampler("Euler", host.sd_model)
    assert isinstance(sampler.model_wrap, kd.external.CompVisVDenoiser)


# ---- apply_unet semantics -------------------------------------------------------------------------------------------


def test_option_identity_after_list_unets_recreates(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), config={"sd_unet": "[FAKE] sd1-s0"})
    st = state(host)
    gen(host)
    gen(host)
    assert [e[0] for e in st.events if e[0] in ("create", "activate", "deactivate")] == ["create", "activate"]
    host.sd_unet.list_unets()  # new option objects, same labels
    gen(host)
    assert [e[0] for e in st.events if e[0] in ("create", "activate", "deactivate")] == \
        ["create", "activate", "deactivate", "create", "activate"]
    assert len(st.unets) == 2


def test_sd_unet_has_no_onchange_and_applies_at_next_generation(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), config={"sd_unet": "Automatic"})
    info = host.opts.data_labels["sd_unet"]
    assert info.default == "Automatic" and info.onchange is None and info.infotext is None
    assert host.m("shared_items").sd_unet_items() == ["Automatic", "[FAKE] sd1-s0", "None"]
    r = host.client().post("/sdapi/v1/options", json={"sd_unet": "[FAKE] sd1-s0"})
    assert r.status_code == 200 and host.opts.sd_unet == "[FAKE] sd1-s0"
    assert host.sd_unet.current_unet is None  # nothing happens until the next generation
    gen(host)
    assert host.sd_unet.current_unet.option.label == "[FAKE] sd1-s0"


def test_override_is_restored_but_engine_stays_active(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), config={"sd_unet": "Automatic"})
    gen(host, override_settings={"sd_unet": "[FAKE] sd1-s0"})
    assert host.opts.sd_unet == "Automatic"  # restored without callbacks
    assert host.sd_unet.current_unet is not None  # ...but the engine stays active until the next apply_unet()
    gen(host)
    assert host.sd_unet.current_unet is None
    assert ("deactivate", "[FAKE] sd1-s0") in state(host).events


def test_override_not_restored_when_key_missing_from_config(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), config={"CLIP_stop_at_last_layers": 1})
    gen(host, override_settings={"sd_unet": "None"})
    assert host.opts.data["sd_unet"] == "None"  # A1111 only restores keys already in config.json


def test_activation_offloads_torch_unet_and_none_moves_it_back(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), config={"sd_unet": "Automatic"})
    devices = host.m("devices")
    host.clear_trace()
    gc_before = devices.gc_calls
    host.sd_unet.apply_unet("[FAKE] sd1-s0")
    assert host.moves == [("UNetModel", "cpu")] and devices.gc_calls == gc_before + 1
    host.clear_trace()
    host.sd_unet.apply_unet("None")
    assert host.moves == [("UNetModel", str(devices.device))]
    assert ("deactivate", "[FAKE] sd1-s0") in state(host).events


def test_lowvram_skips_move_back(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), args=["--lowvram"])
    assert host.sd_model.lowvram
    host.sd_unet.apply_unet("[FAKE] sd1-s0")
    host.clear_trace()
    host.sd_unet.apply_unet("None")
    assert host.moves == []


def test_medvram_hook_moves_wrapper_to_device_on_call(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), args=["--medvram"], config={"sd_unet": "[FAKE] sd1-s0"})
    lowvram = host.m("lowvram")
    host.clear_trace()
    lowvram.module_in_gpu = None
    gen(host)
    assert host.sd_model.lowvram and lowvram.module_in_gpu is host.sd_model.model
    assert ("DiffusionWrapper", "cpu") in host.moves  # sd_model.model (with the UNet) sent to devices.device


def _without_yaml(src: Path, dst_dir: Path, stem: str) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / f"{stem}.safetensors"
    shutil.copy2(src, dst)
    return dst


def test_checkpoint_change_with_different_config_does_not_reapply(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    a, b = tiny_checkpoint("sd1", 0), tiny_checkpoint("sd1", 1)  # each has its own yaml: different configs
    host = boot(a, b, config={"sd_unet": "Automatic", "fake_ext_auto": ["sd1-s0", "sd1-s1"],
                              "sd_model_checkpoint": "sd1-s0.safetensors"})
    gen(host)
    assert host.sd_unet.current_unet.option.label == "[FAKE] sd1-s0"
    r = host.client().post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd1-s1.safetensors"})
    assert r.status_code == 200
    assert host.sd_model.sd_checkpoint_info.model_name == "sd1-s1"
    assert host.sd_unet.current_unet is None  # load_model path: apply_unet("None"), no re-apply
    gen(host)
    assert host.sd_unet.current_unet.option.label == "[FAKE] sd1-s1"


def test_checkpoint_change_with_same_config_reapplies(boot, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = _without_yaml(tiny_checkpoint("sd1", 0), tmp_path / "noyaml", "m0")
    b = _without_yaml(tiny_checkpoint("sd1", 1), tmp_path / "noyaml", "m1")
    host = boot(a, b, config={"sd_unet": "Automatic", "fake_ext_auto": ["m0", "m1"],
                              "sd_model_checkpoint": "m0.safetensors"})
    model = host.sd_model
    gen(host)
    host.sd_models.reload_model_weights(info=host.sd_models.get_closet_checkpoint_match("m1"))
    assert host.sd_model is model  # weights loaded in place
    assert host.sd_unet.current_unet.option.label == "[FAKE] m1"  # model_loaded -> apply_unet()
    assert [e for e in state(host).events if e[0] == "model_loaded"][-1] == ("model_loaded", "m1")


def test_checkpoint_override_and_model_name_rule(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot({"a.safetensors": tiny_checkpoint("sd1", 0), "sub/b.safetensors": tiny_checkpoint("sd1", 1)},
                config={"sd_unet": "Automatic", "fake_ext_auto": ["sub_b"], "sd_model_checkpoint": "a.safetensors"})
    names = {i.name: i.model_name for i in host.sd_models.checkpoints_list.values()}
    assert names == {"a.safetensors": "a", "sub/b.safetensors": "sub_b"}
    gen(host, override_settings={"sd_model_checkpoint": "sub/b.safetensors"})
    assert [e for e in state(host).events if e[0] == "process_batch"][-1][2] == "sub_b"
    assert host.opts.data["sd_model_checkpoint"] == host.sd_models.checkpoint_aliases["a"].title  # restored
    assert host.sd_model.sd_checkpoint_info.model_name == "sub_b"
    gen(host)
    assert host.sd_model.sd_checkpoint_info.model_name == "a"


# ---- processing --------------------------------------------------------------------------------------------------


def test_hires_fires_hooks_twice_and_runs_at_new_size(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), config={"fake_ext_auto": ["sd1-s0"]})
    p = gen(host, enable_hr=True, hr_scale=1.5, steps=2, denoising_strength=0.5)
    ev = state(host).events
    assert [e[3] for e in ev if e[0] == "after_extra_networks_activate"] == [False, True]
    assert [e[1] for e in ev if e[0] == "process_before_every_sampling"] == [(1, 4, 8, 8), (1, 4, 12, 12)]
    assert ("before_hr", 96, 96) in ev
    assert [c["x"] for c in state(host).calls] == [(2, 4, 8, 8)] * 2 + [(2, 4, 12, 12)] * 2
    assert p.latents.shape == (1, 4, 12, 12) and p.images[0].size == (96, 96)


def test_hires_resize_and_crop(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    p = gen(host, enable_hr=True, hr_resize_x=80, hr_resize_y=96, steps=2)
    assert p.latents.shape == (1, 4, 12, 10)
    assert "Hires resize: 80x96" in p.info


def test_n_iter_and_batch(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    p = gen(host, n_iter=2, batch_size=2, steps=2)
    assert p.latents.shape == (4, 4, 8, 8) and len(p.images) == 4
    assert [e[1] for e in state(host).events if e[0] == "before_process_batch"] == [0, 1]
    assert not torch.equal(p.latents[0], p.latents[1])  # different seeds in a batch
    again = gen(host, n_iter=2, batch_size=2, steps=2)
    assert torch.equal(p.latents, again.latents)  # deterministic for a fixed seed


def test_refiner_switch_loads_other_config_without_engine(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sdxl-base"), tiny_checkpoint("sdxl-refiner"),
                config={"sd_unet": "Automatic", "fake_ext_auto": ["sdxl-base-s0", "sdxl-refiner-s0"],
                        "sd_model_checkpoint": "sdxl-base-s0.safetensors"})
    p = gen(host, steps=4, refiner_checkpoint="sdxl-refiner-s0", refiner_switch_at=0.5)
    routed = host.routed_calls
    ys = [r["y"][1] for r in routed]
    assert ys[0] == 2816 and ys[-1] == 2560 and len(routed) == 4
    assert [r["engine"] for r in routed if r["y"][1] == 2560] == [None] * ys.count(2560)  # torch after the switch
    assert "Refiner: sdxl-refiner-s0" in p.info
    base_title = host.sd_models.checkpoint_aliases["sdxl-base-s0"].title
    assert host.opts.data["sd_model_checkpoint"] == base_title  # SkipWritingToConfig


def test_img2img_steps_and_latents(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    host = boot(tiny_checkpoint("sd1"), config={"fake_ext_auto": ["sd1-s0"]})
    img = Image.new("RGB", (SIZE, SIZE), (200, 30, 90))
    p = host.img2img(prompt="x", init_images=[img], denoising_strength=0.5, steps=4, width=SIZE, height=SIZE,
                     seed=1)
    assert len(state(host).calls) == 3  # t_enc = int(0.5 * 4) = 2 -> 3 sampler steps
    assert p.latents.shape == (1, 4, 8, 8)


def test_inpaint_img2img_with_mask(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    host = boot(tiny_checkpoint("sd1-inpaint"))
    img = Image.new("RGB", (SIZE, SIZE), (10, 200, 90))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, 32, 64))
    p = host.img2img(prompt="x", init_images=[img], mask=mask, denoising_strength=0.75, steps=4, width=SIZE,
                     height=SIZE, seed=1)
    assert {r["x"] for r in host.routed_calls} == {(2, 9, 8, 8)}
    assert p.latents.shape == (1, 4, 8, 8)


def test_comments_and_extra_generation_params(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    p = gen(host)
    assert p.comments == "fake ext was here\n"
    assert "Fake ext: on" in p.info
    import json

    assert json.loads(p.js())["extra_generation_params"]["Fake ext"] == "on"


def test_alwayson_script_args_mapping(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    gen(host)
    gen(host, alwayson_scripts={"fake unet ext": {"args": [False]}})
    setups = [e[1] for e in state(host).events if e[0] == "setup"]
    assert setups == [(True, "default"), (False, "default")]
    r = host.client().post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": SIZE, "height": SIZE,
                                                       "alwayson_scripts": {"nope": {"args": []}}})
    assert r.status_code == 422


# ---- API, settings, lifecycle -------------------------------------------------------------------------------------


def test_api_txt2img_and_auth(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), args=["--api-auth", "u:p"])
    client = host.client()
    assert client.get("/sdapi/v1/options").status_code == 401
    assert client.get("/fakeext/v1/ping").status_code == 200  # extension routes are not protected
    authed = host.client(auth=("u", "p"))
    r = authed.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": SIZE, "height": SIZE})
    assert r.status_code == 200
    body = r.json()
    assert len(body["images"]) == 1 and base64.b64decode(body["images"][0])[:4] == b"\x89PNG"
    assert '"sampler_name": "Euler"' in body["info"]
    bad = authed.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "sampler_name": "No Such Sampler"})
    assert bad.status_code == 400
    models = authed.get("/sdapi/v1/sd-models").json()
    assert models[0]["model_name"] == "sd1-s0" and models[0]["config"].endswith("sd1-s0.yaml")
    assert authed.post("/sdapi/v1/options", json={"no_such_option": 1}).status_code == 500


def test_options_model_drops_ui_settings_in_nowebui(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    got = host.client().get("/sdapi/v1/options").json()
    assert got["fake_ext_import_time"] == 7 and "fake_ext_ui_setting" not in got
    assert host.opts.fake_ext_ui_setting == "x"  # registered, but OptionsModel was built before on_ui_settings
    host.close()
    host = boot(tiny_checkpoint("sd1"), ui=True, args=["--api"])
    got = host.client().get("/sdapi/v1/options").json()
    assert got["fake_ext_ui_setting"] == "x" and got["fake_ext_import_time"] == 7


def test_boot_order_nowebui_and_ui(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    kinds = [e[0] for e in state(host).events]
    assert kinds == ["list_unets", "model_loaded", "ui_settings", "before_ui", "app_started"]
    assert ("app_started", True) in state(host).events  # demo is None in --nowebui
    host.close()
    host = boot(tiny_checkpoint("sd1"), ui=True)
    kinds = [e[0] for e in state(host).events]
    assert kinds == ["list_unets", "model_loaded", "before_ui", "ui_settings", "app_started"]


def test_reload_ui_reexecutes_scripts_and_recreates_options(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"), config={"sd_unet": "[FAKE] sd1-s0"})
    gen(host)
    st = state(host)
    old_option = host.sd_unet.unet_options[0]
    host.reload_ui()
    assert st.loads == 2 and ("before_reload",) in st.events and ("script_unloaded",) in st.events
    assert st.events.index(("before_reload",)) < st.events.index(("script_unloaded",))
    # reload runs webui() again: a gradio demo when gradio is installed (A1111's own env), none without it
    assert st.events[-1] == ("app_started", host.m("ui").gradio() is None)
    assert host.sd_unet.unet_options[0] is not old_option
    assert len(host.script_callbacks.callback_map["callbacks_list_unets"]) == 1  # cleared, not duplicated
    assert host.client().get("/fakeext/v1/ping").json()["ok"]
    gen(host)
    assert [e[0] for e in st.events if e[0] in ("create", "activate", "deactivate")][-3:] == \
        ["deactivate", "create", "activate"]


def test_callback_errors_are_reported_not_raised(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))

    def boom(params):  # type: ignore[no-untyped-def]
        raise ValueError("boom")

    host.script_callbacks.on_cfg_denoiser(boom)
    gen(host, steps=1)
    assert any(isinstance(e, ValueError) for _, e in host.errors)


def test_close_restores_process_state(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    linear_forward = torch.nn.Linear.forward
    names = ("modules", "modules.shared", "ldm", "sgm", "networks", "fake_ext_state", "launch")
    before = {n: sys.modules.get(n) for n in names}  # e.g. an installed `ldm` imported by another test
    host = boot(tiny_checkpoint("sd1"))
    assert torch.nn.Linear.forward is not linear_forward  # the Lora stand-in patched torch
    assert sys.modules["ldm"] is not before["ldm"]
    host.close()
    assert torch.nn.Linear.forward is linear_forward
    assert {n: sys.modules.get(n) for n in names} == before


# ---- LoRA stand-in ----------------------------------------------------------------------------------------------


def _write_lora(path: Path, rank: int = 2) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"  # -> diffusion_model_input_blocks_1_1_proj_in
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{key}.lora_down.weight": torch.randn(rank, 32, 1, 1, generator=g),
               f"{key}.lora_up.weight": torch.randn(32, rank, 1, 1, generator=g),
               f"{key}.alpha": torch.tensor(float(rank))}, str(path))


def test_lora_merges_lazily_and_persists(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    _write_lora(host.data_dir / "models" / "Lora" / "testlora.safetensors")
    base = gen(host).latents
    p = gen(host, prompt="a cat <lora:testlora:0.8:0.5>")
    networks = host.ext_module("networks")
    assert [(n.name, n.te_multiplier, n.unet_multiplier) for n in networks.loaded_networks] == \
        [("testlora", 0.8, 0.5)]
    layer = host.sd_model.network_layer_mapping["diffusion_model_input_blocks_1_1_proj_in"]
    assert layer is host.sd_model.model.diffusion_model.input_blocks[1][1].proj_in
    net_module = networks.loaded_networks[0].modules["diffusion_model_input_blocks_1_1_proj_in"]
    expected = layer.network_weights_backup + net_module.calc_updown(layer.network_weights_backup)[0]
    assert torch.allclose(layer.weight, expected)
    assert not torch.equal(p.latents, base)
    assert p.all_prompts == ["a cat <lora:testlora:0.8:0.5>"] and "Lora hashes: testlora" in p.info
    assert len(networks.loaded_networks) == 1  # still loaded (and merged) after the request
    gen(host)  # no lora: activate with [] clears the list; the next forward restores the backup
    assert networks.loaded_networks == [] and torch.equal(layer.weight, layer.network_weights_backup)
    missing = gen(host, prompt="x <lora:nope:1>")
    assert "Lora not found: nope" in missing.comments


def test_lora_hires_activates_hr_prompt_networks(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    host = boot(tiny_checkpoint("sd1"))
    _write_lora(host.data_dir / "models" / "Lora" / "testlora.safetensors")
    gen(host, prompt="a <lora:testlora:1>", enable_hr=True, hr_prompt="b", steps=1)
    acts = [e[2] for e in state(host).events if e[0] == "after_extra_networks_activate"]
    assert list(acts[0]) == ["lora"] and dict(acts[1]) == {}
    assert host.ext_module("networks").loaded_networks == []  # hires pass had no lora


def test_image_roundtrip_is_png(boot, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    host = boot(tiny_checkpoint("sd1"))
    r = host.client().post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 72, "height": 56})
    img = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert img.size == (72, 56)  # multiples of 8 that are not multiples of 64 work (resizing skips)
