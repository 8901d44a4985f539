"""Headless LoRA (`check --lora FILE:STRENGTH`): kohya LoRA/LoCon files refitted into an engine built from another
checkpoint of the family, against PyTorch with the same LoRA merged; bad files get clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdtrt.pipeline.build import build_engine
from sdtrt.pipeline.checkpoint import build_unet, open_checkpoint
from sdtrt.pipeline.lora import LoraError, LoraSpec, diffusers_to_compvis, lora_weights, read_lora
from sdtrt.profiles import Profile, Shape
from sdtrt.tools.check import check_engine
from sdtrt.tools.cli import main


def write_kohya(path: Path, sd: dict[str, torch.Tensor], layers: list[str], *, rank: int = 4, seed: int = 0,
                alpha: float | None = 2.0, names: dict[str, str] | None = None) -> Path:
    """A kohya-format LoRA/LoCon for the given module paths (Linear, 1x1 or kxk Conv)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        w = sd[f"{layer}.weight"]
        key = "lora_unet_" + (names or {}).get(layer, layer.replace(".", "_"))
        if w.dim() == 4:
            down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g)
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g)
        else:
            down, up = torch.randn(rank, w.shape[1], generator=g), torch.randn(w.shape[0], rank, generator=g)
        scale = w.std() / (rank * down.std() * up.std() * (w.shape[1] ** 0.5))
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down * scale.sqrt(), up * scale.sqrt()
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(alpha)
    out["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)  # ignored by the UNet
    save_file(out, str(path))
    return path


def layers_of(sd: dict[str, torch.Tensor]) -> list[str]:
    picks = [n for n in sd if n.endswith(("attn1.to_q.weight", "attn2.to_k.weight", "proj_in.weight",
                                          "in_layers.2.weight"))]
    return sorted(n[: -len(".weight")] for n in picks)[:8]


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache = tmp_path_factory.mktemp("lora-cache")
    out = build_engine(tiny_checkpoint("sd1", 0), [Profile.parse("1x64x64x75")], cache, backend="onnxruntime")
    work = tmp_path_factory.mktemp("loras")
    _, sd = open_checkpoint(tiny_checkpoint("sd1", 1))
    a = write_kohya(work / "a.safetensors", sd, layers_of(sd), seed=1)
    b = write_kohya(work / "b.safetensors", sd, layers_of(sd)[2:], seed=2, alpha=None)
    return cache, out.manifest.id, a, b


def test_two_loras_on_another_checkpoint_match_pytorch(setup, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    cache, engine_id, a, b = setup
    other = tiny_checkpoint("sd1", 1)  # not the checkpoint the engine was built from: refitted
    specs = [LoraSpec(a, 0.8), LoraSpec(b, -0.5)]
    rows = check_engine(cache, engine_id, other, [Shape.parse("1x64x64x75")], loras=specs, repeats=1)
    assert rows[0].rel_diff < 1e-4 and rows[0].max_abs_out > 0.1
    # the LoRAs change the UNet by far more than that tolerance
    info, sd = open_checkpoint(other)
    changed = lora_weights([(s, read_lora(s.path)) for s in specs], sd.keys(), lambda n: {k: sd[k] for k in n})
    assert len(changed) == len(layers_of(sd))
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 300.0]), torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        plain = build_unet(info.info, sd)(x, t, c)
        merged = build_unet(info.info, {**sd, **changed})(x, t, c)
    assert (merged - plain).abs().max() > 1e-2 * plain.abs().max()


def test_cli_check_with_lora(setup, tiny_checkpoint, capsys) -> None:  # type: ignore[no-untyped-def]
    cache, engine_id, a, _ = setup
    code = main(["check", engine_id, "--checkpoint", str(tiny_checkpoint("sd1", 1)), "--shape", "1x64x64x75",
                 "--lora", f"{a}:0.7", "--cache", str(cache), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out)["rows"][0]["rel_diff"] < 1e-4


def test_diffusers_style_names_map_like_a1111(setup, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert diffusers_to_compvis("down_blocks_0_attentions_0_proj_in") == "input_blocks_1_1_proj_in"
    assert diffusers_to_compvis("down_blocks_1_resnets_1_conv1") == "input_blocks_5_0_in_layers_2"
    assert diffusers_to_compvis("mid_block_resnets_1_conv2") == "middle_block_2_out_layers_3"
    assert diffusers_to_compvis("mid_block_attentions_0_transformer_blocks_0_attn1_to_q") == \
        "middle_block_1_transformer_blocks_0_attn1_to_q"
    assert diffusers_to_compvis("up_blocks_1_attentions_2_proj_out") == "output_blocks_5_1_proj_out"
    assert diffusers_to_compvis("down_blocks_1_downsamplers_0_conv") == "input_blocks_6_0_op"
    assert diffusers_to_compvis("up_blocks_0_upsamplers_0_conv") == "output_blocks_2_1_conv"
    assert diffusers_to_compvis("up_blocks_1_upsamplers_0_conv") == "output_blocks_5_2_conv"
    assert diffusers_to_compvis("time_embedding_linear_2") == "time_embed_2"
    del setup  # only for the tiny checkpoints
    _, sd = open_checkpoint(tiny_checkpoint("sd1", 0))
    layer = "input_blocks.1.1.proj_in"
    path = write_kohya(tmp_path / "d.safetensors", sd, [layer], names={layer: "down_blocks_0_attentions_0_proj_in"})
    changed = lora_weights([(LoraSpec(path), read_lora(path))], sd.keys(), lambda n: {k: sd[k] for k in n})
    assert list(changed) == [f"{layer}.weight"]


def test_spec_parsing() -> None:
    assert LoraSpec.parse("style.safetensors:0.8") == LoraSpec(Path("style.safetensors"), 0.8)
    assert LoraSpec.parse("style.safetensors:-1.5") == LoraSpec(Path("style.safetensors"), -1.5)
    assert LoraSpec.parse("C:\\loras\\s.safetensors:.5") == LoraSpec(Path("C:\\loras\\s.safetensors"), 0.5)
    assert LoraSpec.parse("C:\\loras\\s.safetensors") == LoraSpec(Path("C:\\loras\\s.safetensors"), 1.0)


def test_bad_lora_files_say_what_is_wrong(setup, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache, engine_id, a, _ = setup
    ckpt = tiny_checkpoint("sd1", 0)
    shape = [Shape.parse("1x64x64x75")]

    def run(path: Path) -> None:
        check_engine(cache, engine_id, ckpt, shape, loras=[LoraSpec(path)], repeats=1)

    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(a.read_bytes()[:-100])
    with pytest.raises(LoraError, match="t.safetensors"):
        run(truncated)
    _, xl = open_checkpoint(tiny_checkpoint("sdxl-base", 0))
    xl_layers = [n[:-7] for n in sorted(xl) if n.endswith("attn2.to_k.weight")][:2]
    with pytest.raises(LoraError, match="another model family"):
        run(write_kohya(tmp_path / "xl.safetensors", xl, xl_layers))
    _, sd = open_checkpoint(ckpt)
    with pytest.raises(LoraError, match="not in this UNet"):
        run(write_kohya(tmp_path / "u.safetensors", sd, layers_of(sd)[:1],
                        names={layers_of(sd)[0]: "input_blocks_42_1_proj_in"}))
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_input_blocks_1_1_proj_in.hada_w1_a": torch.zeros(2, 2)}, str(loha))
    with pytest.raises(LoraError, match="LoHa network.*WebUI"):
        run(loha)


def test_refit_bench_counts_on_a_small_unet(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """The benchmark's bookkeeping (its timings are reported, never asserted)."""
    from sdtrt.tools import bench_refit as bench
    from sdtrt.tools.tiny import TINY

    monkeypatch.setitem(bench.FULL_SPECS, "sd15", TINY["sd1"][0])
    r = bench.refit_bench("sd15", rank=4)
    assert r.lora_layers > 0 and r.weights_touched == r.lora_layers
    assert r.switch_weights_touched == r.lora_layers  # B's half plus A's other half restored
    assert r.bytes_touched > 0 and r.compute_s >= 0
    assert main(["bench", "refit", "--family", "sd15", "--rank", "4", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["refit"][0]["family"] == "sd15"
