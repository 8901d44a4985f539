"""The fake host's Lora stand-in (tests/fake_a1111/extensions-builtin/Lora) against the REAL A1111 v1.10.1 one.

For every kind tests/lora_files.py writes, the same sequence of network sets (each kind at +0.8 and -0.6, several
networks at once, diffusers-style names, a text-encoder key, a wrong-family file, an inpaint conv_in pad, back to no
network) is merged into the same tiny UNet twice: by the fake in FakeHost, and by the real `networks.load_network`
+ `network_apply_weights` + `network_*.py` of $SDTRT_A1111_DIR/extensions-builtin/Lora, imported in A1111's own
Python with minimal stubs for `modules.*` (no WebUI start). After every step the whole UNet state dict and the
per-network error counts must agree. Skipped unless SDTRT_A1111_DIR is set.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import lora_files
from fakehost import FakeHost

EXTENSION = TESTS.parent / "extension"
LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)

#: Runs in A1111's Python: argv = a1111_root, extension dir, spec.json. Builds the UNet from sdtrt.tools.tiny's spec,
#: loads the base weights, then for every step sets `networks.loaded_networks` and calls the REAL
#: network_apply_weights on every module (as the patched forwards would), and saves the state dicts.
REAL_DRIVER = r'''
import json, os, sys, types
from types import SimpleNamespace
import torch
import safetensors.torch

a1111, ext, spec_path = sys.argv[1:4]
spec = json.load(open(spec_path))


def stub(name, **attrs):
    mod = types.ModuleType(name)
    mod.__path__ = []
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, mod)
    return mod


reported = []
stub("gradio", Warning=lambda *a, **k: None)
stub("modules")
stub("modules.sd_models", read_metadata_from_safetensors=lambda f: {},
     read_state_dict=lambda f, **k: safetensors.torch.load_file(f))
stub("modules.cache", cached_data_for_file=lambda subsection, title, filename, func: func())
stub("modules.errors", display=lambda e, task, **k: reported.append(task), report=lambda *a, **k: reported.append(a))
stub("modules.hashes", sha256_from_cache=lambda *a, **k: None, sha256=lambda *a, **k: None)
opts = SimpleNamespace(lora_preferred_name="Alias from file", lora_functional=False, lora_in_memory_limit=0,
                       lora_not_found_warning_console=False, lora_not_found_gradio_warning=False,
                       lora_bundled_ti_to_infotext=True)
stub("modules.shared", opts=opts, sd_model=None, walk_files=lambda *a, **k: iter(()),
     cmd_opts=SimpleNamespace(lora_dir=spec["lora_dir"], lyco_dir_backcompat=spec["lora_dir"]))
stub("modules.devices", cpu=torch.device("cpu"), device=torch.device("cpu"), dtype=torch.float32,
     torch_gc=lambda: None, cond_cast_unet=lambda x: x)
stub("modules.models")
stub("modules.models.sd3")
stub("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (torch.nn.Linear,), {}))
stub("modules.scripts", scripts_txt2img=None)
stub("modules.sd_hijack", model_hijack=SimpleNamespace(comments=[], embedding_db=SimpleNamespace(
    word_embeddings={}, expected_shape=-1, skipped_embeddings={}, register_embedding=lambda *a: None,
    register_embedding_by_name=lambda *a: None)))
stub("modules.textual_inversion")
stub("modules.textual_inversion.textual_inversion", create_embedding_from_data=lambda *a, **k: None)
stub("modules.patches", patch=lambda *a, **k: None, undo=lambda *a, **k: None, original=lambda *a, **k: None)

sys.path[:0] = [os.path.join(a1111, "extensions-builtin", "Lora"), ext]
import network
import networks
from sdtrt.tools.tiny import TINY
from sdtrt.models.torch_unet import UNetModel

networks.extra_network_lora = SimpleNamespace(errors={})
assert networks.__file__.startswith(a1111), networks.__file__

unet = UNetModel(TINY[spec["family"]][0]).eval().requires_grad_(False)
unet.load_state_dict(safetensors.torch.load_file(spec["base"]))
wrapper = torch.nn.Module()
wrapper.diffusion_model = unet
sd_model = SimpleNamespace(is_sdxl=False, cond_stage_model=torch.nn.Module(), model=wrapper)
sys.modules["modules.shared"].sd_model = sd_model
networks.assign_network_names_to_compvis_modules(sd_model)

cache = {}
out, errors = {}, []
for i, step in enumerate(spec["steps"]):
    networks.loaded_networks.clear()
    networks.extra_network_lora.errors.clear()
    for name, te, un in step:
        if name not in cache:
            filename = os.path.join(spec["lora_dir"], name + ".safetensors")
            cache[name] = networks.load_network(name, network.NetworkOnDisk(name, filename))
        net = cache[name]
        net.te_multiplier, net.unet_multiplier, net.dyn_dim = te, un, None
        networks.loaded_networks.append(net)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm,
                              torch.nn.MultiheadAttention)):
                networks.network_apply_weights(m)
    out.update({f"{i}/{k}": v.clone().contiguous() for k, v in unet.state_dict().items()})
    errors.append(dict(networks.extra_network_lora.errors))
safetensors.torch.save_file(out, spec["out"])
json.dump({"errors": errors, "reported": [str(r) for r in reported]}, open(spec["out"] + ".json", "w"))
'''


def _steps() -> list[list[tuple[str, float, float]]]:
    steps: list[list[tuple[str, float, float]]] = []
    for kind in lora_files.KINDS:
        steps += [[(f"k-{kind}", 0.8, 0.8)], [(f"k-{kind}", -0.6, -0.6)]]
    steps += [
        [],
        [("k-lora", 0.8, 0.8), ("k-ia3", 0.5, 0.5)],
        [("k-ia3", 0.5, 0.5), ("k-lora", 0.8, 0.8)],
        [("k-dora", 0.7, 0.7), ("k-oft", 0.6, 0.6), ("k-glora", 0.4, 0.4)],
        [("k-full-all", 1.0, 1.0), ("k-norm", 0.7, 0.7), ("k-boft", 0.6, 0.6)],
        [("d-locon", 0.8, 0.8), ("d-loha", 0.5, 0.5), ("d-lokr", 0.5, 0.5)],
        [("d-oft-lycoris", 0.8, 0.8), ("d-boft", 0.5, 0.5), ("d-lora-cp", 0.5, 0.5)],
        [("k-te", 0.8, 0.3)],
        [("b-wide", 1.0, 1.0)],
        [("b-unknown", 1.0, 1.0), ("k-lora", 0.8, 0.8)],
        [("k-loha", 0.8, 0.8)],
        [],
    ]
    return steps


def _write_files(lora_dir: Path, base: dict[str, torch.Tensor], inpaint_source: dict[str, torch.Tensor]) -> None:
    for kind in lora_files.KINDS:
        lora_files.write_lora(lora_dir / f"k-{kind}.safetensors", base, kind)
    lora_files.write_lora(lora_dir / "k-full-all.safetensors", base, "full", layers="all", seed=1)
    for kind in ("locon", "loha", "lokr", "oft-lycoris", "boft", "lora-cp"):
        lora_files.write_lora(lora_dir / f"d-{kind}.safetensors", base, kind, diffusers_names=True, seed=2)
    lora_files.write_lora(lora_dir / "k-te.safetensors", base, "lora", te_dim=768, seed=3)
    lora_files.write_broken_lora(lora_dir / "b-wide.safetensors", "wrong-family", base)
    lora_files.write_broken_lora(lora_dir / "b-unknown.safetensors", "unknown-keys")
    lora_files.write_lora(lora_dir / "k-in.safetensors", inpaint_source, "locon", layers="conv+conv_in", seed=4)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd1-inpaint"])
def test_fake_lora_matches_real_a1111(a1111_install, tiny_checkpoint, tmp_path: Path, family: str) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("einops")
    host = FakeHost.boot(tmp_path / "host", [tiny_checkpoint(family)], args=["--no-half"], config={"sd_unet": "None"})
    try:
        networks = host.ext_module("networks")
        unet = host.sd_model.model.diffusion_model
        base = {k: v.clone().contiguous() for k, v in unet.state_dict().items()}
        lora_dir = host.data_dir / "models" / "Lora"
        lora_dir.mkdir(parents=True, exist_ok=True)
        source = base
        if family == "sd1-inpaint":  # a 4-channel LoRA on the 9-channel inpaint UNet: conv_in's update is padded
            source = {k: v[:, :4].contiguous() if k == "input_blocks.0.0.weight" else v for k, v in base.items()}
        _write_files(lora_dir, base, source)
        steps = _steps()
        if family == "sd1-inpaint":
            steps = [[("k-in", 0.8, 0.8)], [("k-in", -0.5, -0.5)], [("k-locon", 0.5, 0.5)], []]
        networks.list_available_networks()

        fake_out: list[dict[str, torch.Tensor]] = []
        fake_errors: list[dict[str, int]] = []
        for step in steps:
            networks.load_networks([n for n, _, _ in step], [t for _, t, _ in step], [u for _, _, u in step],
                                   [None] * len(step))
            networks.extra_network_lora.errors.clear()
            with torch.no_grad():
                for m in unet.modules():
                    if isinstance(m, LAYER_TYPES):  # what the patched forwards do
                        networks.network_apply_weights(m)
            fake_out.append({k: v.clone() for k, v in unet.state_dict().items()})
            fake_errors.append(dict(networks.extra_network_lora.errors))
    finally:
        host.close()

    base_path = tmp_path / "base.safetensors"
    save_file(base, str(base_path))
    spec = {"family": family, "base": str(base_path), "lora_dir": str(lora_dir), "steps": steps,
            "out": str(tmp_path / "real.safetensors")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run([str(a1111_install.python), "-c", REAL_DRIVER, str(a1111_install.root), str(EXTENSION),
                        str(tmp_path / "spec.json")], check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    real = load_file(spec["out"])
    real_meta = json.loads(Path(spec["out"] + ".json").read_text())

    for i, step in enumerate(steps):
        keys = {k.split("/", 1)[1] for k in real if k.startswith(f"{i}/")}
        assert keys == set(fake_out[i]), (step, keys ^ set(fake_out[i]))
        changed = 0
        for k in sorted(keys):
            where = f"step {i} {step} {k}"
            torch.testing.assert_close(fake_out[i][k], real[f"{i}/{k}"], rtol=2e-5, atol=2e-6,
                                       msg=lambda m, where=where: f"{where}: {m}")
            changed += k not in base or not torch.equal(fake_out[i][k], base[k])
        assert real_meta["errors"][i] == fake_errors[i], (step, real_meta["errors"][i], fake_errors[i])
        if step and not step[0][0].startswith("b-"):
            assert changed, step  # the step did something
        if not step:
            assert changed == 0
