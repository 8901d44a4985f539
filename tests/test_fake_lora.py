"""The fake host's built-in Lora stand-in with every network type A1111 v1.10.1 loads (tests/lora_files.py writes
them): each kind merges into the torch UNet and changes the latents, merged weights equal base + an independently
computed update (lora/locon/lora-ab/dora/ia3/glora/full/norm), A -> B -> A restores bit-exactly, negative strengths,
two networks at once (applied sequentially), diffusers-style names, text-encoder keys ignored, broken files, the
inpaint 4 -> 9 channel pad, and `lora_functional`. The same files are checked against the REAL A1111 modules in
tests/integration/test_real_lora_parity.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora_files
from fakehost import FakeHost

pytest.importorskip("fastapi")
pytest.importorskip("einops")

STEPS = 2
SIZE = 64
KINDS = lora_files.KINDS
MIN_EFFECT = 0.02  # relative change of the latents a network at 0.8 must cause (they cause ~0.2)

_cache: dict = {}


class Env:
    def __init__(self, host: FakeHost, base_sd: dict[str, torch.Tensor]) -> None:
        self.host = host
        self.base_sd = base_sd
        self.lora_dir = host.data_dir / "models" / "Lora"
        self.base_latents = self.gen().latents

    @property
    def networks(self):  # type: ignore[no-untyped-def]
        return self.host.ext_module("networks")

    @property
    def unet(self) -> torch.nn.Module:
        return self.host.sd_model.model.diffusion_model

    def layer(self, path: str) -> torch.nn.Module:
        return self.host.sd_model.network_layer_mapping[lora_files.sd_key(path)]

    def gen(self, prompt: str = "x", **kw):  # type: ignore[no-untyped-def]
        return self.host.txt2img(prompt=prompt, steps=STEPS, width=SIZE, height=SIZE, seed=77, **kw)

    def write(self, name: str, kind: str, **kw) -> Path:  # type: ignore[no-untyped-def]
        path = self.lora_dir / f"{name}.safetensors"
        if not path.exists():
            lora_files.write_lora(path, self.base_sd, kind, **kw)
        return path

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.unet.state_dict().items()}


def _env(tiny_checkpoint, tmp_path_factory, family: str = "sd1") -> Env:  # type: ignore[no-untyped-def]
    env = _cache.get(family)
    if env is None or env.host.closed:
        host = FakeHost.boot(tmp_path_factory.mktemp(f"lora-{family}"), [tiny_checkpoint(family)], args=["--no-half"],
                             config={"sd_unet": "None"})
        base = {k: v.clone() for k, v in host.sd_model.model.diffusion_model.state_dict().items()}
        env = _cache[family] = Env(host, base)
    return env


@pytest.fixture
def env(tiny_checkpoint, tmp_path_factory):  # type: ignore[no-untyped-def]
    e = _env(tiny_checkpoint, tmp_path_factory)
    yield e
    e.gen()  # leave no network merged for the next test


@pytest.fixture(scope="module", autouse=True)
def _close_hosts():  # type: ignore[no-untyped-def]
    yield
    for e in _cache.values():
        e.host.close()
    _cache.clear()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_base(env: Env) -> None:
    for k, v in env.weights().items():
        assert torch.equal(v, env.base_sd[k]), k
    assert set(env.weights()) == set(env.base_sd)


# ---- expected updates, computed from the file independently of the stand-in ---------------------------------------


def expected_update(kind: str, w: dict[str, torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
                    mult: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(new weight, new bias) for one layer."""
    shape = weight.shape
    if kind in ("lora", "locon", "dora", "lora-ab"):
        down = w["lora_A.weight" if kind == "lora-ab" else "lora_down.weight"]
        up = w["lora_B.weight" if kind == "lora-ab" else "lora_up.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        if kind == "lora-ab":
            pass  # A1111 drops alpha (and scale, bias, dora_scale) of lora_A/lora_B modules
        elif "scale" in w:
            delta = (delta + w["bias"]) * w["scale"]
        else:
            delta = delta * (w["alpha"] / down.shape[0])
        if kind == "dora":
            merged = weight + delta
            col = merged.transpose(0, 1).reshape(shape[1], -1).norm(dim=1)
            col = col.reshape(1, shape[1], *[1] * (len(shape) - 2))
            delta = merged * w["dora_scale"] / col - weight
        return weight + mult * delta, bias
    if kind == "ia3":
        v = w["weight"]
        return weight + mult * (weight * (v[None, :] if bool(w["on_input"]) else v[:, None])), bias
    if kind == "glora":
        delta = w["b2.weight"] @ w["b1.weight"] + weight @ w["a2.weight"] @ w["a1.weight"]
        return weight + mult * delta, bias
    if kind == "full":
        return weight + mult * w["diff"], (bias + mult * w["diff_b"]) if "diff_b" in w else bias
    if kind == "norm":
        return weight + mult * w["w_norm"], bias + mult * w["b_norm"]
    raise AssertionError(kind)


def file_modules(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in load_file(str(path)).items():
        prefix, _, part = k.partition(".")
        out.setdefault(prefix, {})[part] = v
    return out


# ---- every kind ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_kind_merges_changes_latents_and_restores(env: Env, kind: str) -> None:
    env.write(f"k-{kind}", kind)
    targets = lora_files.target_layers(env.base_sd, kind)
    p = env.gen(f"x <lora:k-{kind}:0.8>")
    assert "Networks with errors" not in p.comments, p.comments
    [net] = env.networks.loaded_networks
    assert sorted(net.modules) == sorted(lora_files.sd_key(t) for t in targets)  # every key mapped
    for t in targets:  # every targeted layer merged, clearly
        layer = env.layer(t)
        assert rel(layer.weight, env.base_sd[f"{t}.weight"]) > 0.05, t
        assert layer.network_current_names == (("k-" + kind, 0.8, 0.8, None),)
    untouched = [k for k in env.base_sd if k.rsplit(".", 1)[0] not in targets]
    now = env.weights()
    assert all(torch.equal(now[k], env.base_sd[k]) for k in untouched)
    assert rel(p.latents, env.base_latents) > MIN_EFFECT

    neg = env.gen(f"x <lora:k-{kind}:-0.8>")
    assert rel(neg.latents, env.base_latents) > MIN_EFFECT and rel(neg.latents, p.latents) > MIN_EFFECT

    again = env.gen()  # no network: the next forward of each layer restores its backup
    assert env.networks.loaded_networks == []
    assert_base(env)
    assert torch.equal(again.latents, env.base_latents)


@pytest.mark.parametrize("kind", ["lora", "locon", "lora-ab", "dora", "ia3", "glora", "full", "norm"])
@pytest.mark.parametrize("mult", [0.8, -0.6])
def test_merged_weights_match_independent_maths(env: Env, kind: str, mult: float) -> None:
    path = env.write(f"k-{kind}", kind)
    modules = file_modules(path)
    env.gen(f"x <lora:k-{kind}:{mult}>")
    now = env.weights()
    for t in lora_files.target_layers(env.base_sd, kind):
        w = modules[lora_files.network_key(t, kind)]
        weight, bias = env.base_sd[f"{t}.weight"], env.base_sd.get(f"{t}.bias")
        exp_w, exp_b = expected_update(kind, w, weight, bias, mult)
        torch.testing.assert_close(now[f"{t}.weight"], exp_w, rtol=1e-5, atol=1e-6, msg=t)
        if exp_b is not None:
            torch.testing.assert_close(now[f"{t}.bias"], exp_b, rtol=1e-5, atol=1e-6, msg=t)


def test_a_b_a_restores_bit_exactly(env: Env) -> None:
    env.write("k-loha", "loha")
    env.write("k-full", "full", layers="all")
    a = env.gen("x <lora:k-loha:0.8>")
    wa = env.weights()
    b = env.gen("x <lora:k-full:0.7>")
    assert rel(b.latents, a.latents) > MIN_EFFECT
    a2 = env.gen("x <lora:k-loha:0.8>")
    for k, v in env.weights().items():
        assert torch.equal(v, wa[k]), k
    assert torch.equal(a2.latents, a.latents)
    env.gen("x <lora:k-loha:0.5>")  # same network, another strength: re-merged from the backup
    env.gen("x <lora:k-loha:0.8>")
    for k, v in env.weights().items():
        assert torch.equal(v, wa[k]), k


def test_two_networks_apply_sequentially(env: Env) -> None:
    """Each calc_updown sees the weight after the previous network (ia3 / glora / dora / oft depend on it)."""
    lora_path = env.write("k-lora", "lora")
    ia3_path = env.write("k-ia3", "ia3")
    p = env.gen("x <lora:k-lora:0.8> <lora:k-ia3:0.5>")
    assert [n.name for n in env.networks.loaded_networks] == ["k-lora", "k-ia3"]
    lora_mods, ia3_mods = file_modules(lora_path), file_modules(ia3_path)
    now = env.weights()
    both = set(lora_files.target_layers(env.base_sd, "lora")) & set(lora_files.target_layers(env.base_sd, "ia3"))
    assert both
    for t in both:
        w1, _ = expected_update("lora", lora_mods[lora_files.network_key(t)], env.base_sd[f"{t}.weight"], None, 0.8)
        w2, _ = expected_update("ia3", ia3_mods[lora_files.network_key(t)], w1, None, 0.5)
        torch.testing.assert_close(now[f"{t}.weight"], w2, rtol=1e-5, atol=1e-6, msg=t)
    single = env.gen("x <lora:k-lora:0.8>")
    assert rel(p.latents, single.latents) > MIN_EFFECT
    swapped = env.gen("x <lora:k-ia3:0.5> <lora:k-lora:0.8>")  # order matters for ia3 after lora
    assert not torch.equal(swapped.latents, p.latents)


def test_unet_multiplier_and_te_entry(env: Env) -> None:
    env.write("k-te", "lora", te_dim=768)
    env.write("k-lora", "lora")
    te = env.gen("x <lora:k-te:0.8>")
    plain = env.gen("x <lora:k-lora:0.8>")
    [net] = env.networks.loaded_networks
    assert all(k.startswith("diffusion_model_") for k in net.modules)
    assert torch.equal(te.latents, plain.latents)  # same seed, same UNet modules; the text-encoder key matched nothing
    off = env.gen("x <lora:k-lora:0.8:0>")  # te 0.8, unet 0: the UNet modules use the unet multiplier
    assert torch.equal(off.latents, env.base_latents)


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr", "full", "boft", "oft-lycoris"])
def test_diffusers_names_map_like_compvis_names(env: Env, kind: str) -> None:
    env.write(f"k-{kind}", kind)
    env.write(f"d-{kind}", kind, diffusers_names=True)
    names = file_modules(env.lora_dir / f"d-{kind}.safetensors")
    assert any(n.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")) for n in names)
    a = env.gen(f"x <lora:k-{kind}:0.8>")
    wa = env.weights()
    b = env.gen(f"x <lora:d-{kind}:0.8>")
    assert len(env.networks.loaded_networks[0].modules) == len(lora_files.target_layers(env.base_sd, kind))
    for k, v in env.weights().items():
        assert torch.equal(v, wa[k]), k
    assert torch.equal(a.latents, b.latents)


def test_kohya_oft_has_no_diffusers_names(env: Env) -> None:
    with pytest.raises(ValueError, match="compvis"):
        lora_files.write_lora(env.lora_dir / "bad.safetensors", env.base_sd, "oft", diffusers_names=True)


def test_broken_files(env: Env) -> None:
    lora_files.write_broken_lora(env.lora_dir / "b-trunc.safetensors", "truncated", env.base_sd)
    lora_files.write_broken_lora(env.lora_dir / "b-wide.safetensors", "wrong-family", env.base_sd)
    lora_files.write_broken_lora(env.lora_dir / "b-unknown.safetensors", "unknown-keys")
    n_errors = len(env.host.errors)
    p = env.gen("x <lora:b-trunc:1>")
    assert env.networks.loaded_networks == [] and len(env.host.errors) > n_errors  # errors.display, not loaded
    assert torch.equal(p.latents, env.base_latents)
    p = env.gen("x <lora:b-wide:1>")
    assert "Networks with errors: b-wide" in p.comments, p.comments
    assert torch.equal(p.latents, env.base_latents)  # every layer failed: nothing merged
    assert_base(env)
    p = env.gen("x <lora:b-unknown:1>")
    assert [len(n.modules) for n in env.networks.loaded_networks] == [0]
    assert torch.equal(p.latents, env.base_latents) and "error" not in p.comments
    p = env.gen("x <lora:nope:1>")
    assert "Lora not found: nope" in p.comments


def test_lora_functional_matches_merge(env: Env) -> None:
    env.write("k-lora", "lora")  # (functional mode ignores a module's `bias` key: no "locon" here)
    merged = env.gen("x <lora:k-lora:0.8>")
    functional = env.gen("x <lora:k-lora:0.8>", override_settings={"lora_functional": True})
    # The same maths in another order (W x + dW x against (W + dW) x): fp32 rounding, grown over the sampler's
    # steps, differs per element with the CPU's kernels (seen: 2.4e-4 on one AMD EPYC); a wrong merge or a lost
    # LoRA moves the latents by the LoRA's whole effect, which must stay far above the tolerance.
    scale = merged.latents.abs().max().item()
    tolerance = 1e-4 * scale
    diff = (functional.latents - merged.latents).abs().max().item()
    effect = (merged.latents - env.base_latents).abs().max().item()
    print(f"functional vs merged {diff:.3g}, LoRA effect {effect:.3g}, tolerance {tolerance:.3g}")
    assert diff <= tolerance, f"functional differs from merged by {diff} (latents of magnitude {scale})"
    assert effect > 20 * tolerance, f"the LoRA barely changes the latents ({effect}): the comparison says nothing"


def test_inpaint_pads_conv_in_update(tiny_checkpoint, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    sd1 = _env(tiny_checkpoint, tmp_path_factory, "sd1")
    sd1_base = sd1.base_sd
    env = _env(tiny_checkpoint, tmp_path_factory, "sd1-inpaint")
    path = lora_files.write_lora(env.lora_dir / "k-in.safetensors", sd1_base, "full", layers="conv+conv_in")
    diff = load_file(str(path))["lora_unet_input_blocks_0_0.diff"]
    assert diff.shape[1] == 4 and env.base_sd["input_blocks.0.0.weight"].shape[1] == 9
    env.gen("x <lora:k-in:0.5>")
    w = env.weights()["input_blocks.0.0.weight"]
    base = env.base_sd["input_blocks.0.0.weight"]
    torch.testing.assert_close(w[:, :4], base[:, :4] + 0.5 * diff)
    assert torch.equal(w[:, 4:], base[:, 4:])
    env.gen()
    assert_base(env)
