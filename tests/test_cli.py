"""The command line end to end on real files: export, build, list, check, delete, demo, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdtrt.tools.cli import main

EXT = Path(__file__).resolve().parents[1] / "extension"
PROFILE = "1x64x64x75:2x128x192x150:4x256x256x150"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One engine per family in a shared cache, built through the CLI."""
    cache = tmp_path_factory.mktemp("cache")
    ids: dict[str, str] = {}

    def get(family: str) -> tuple[Path, str]:
        if family not in ids:
            code = main(["build", str(tiny_checkpoint(family)), "--backend", "onnxruntime", "--profile", PROFILE,
                         "--cache", str(cache), "--json"])
            assert code == 0
        return cache, ids.setdefault(family, _last_id(cache, family))

    return get


def _last_id(cache: Path, family: str) -> str:
    from sdtrt.storage.registry import Registry

    ids = [s.id for s in Registry(cache).list() if s.manifest and s.manifest.key.family == family]
    assert len(ids) == 1
    return ids[0]


@pytest.mark.parametrize("family", ["sd1", "sd1-inpaint", "sd2", "sd2-v", "sdxl-base", "sdxl-refiner"])
def test_check_matches_pytorch_through_the_cli(family: str, built, tiny_checkpoint, capsys) -> None:
    cache, engine_id = built(family)
    code, out, err = run(capsys, "check", engine_id, "--checkpoint", str(tiny_checkpoint(family)),
                         "--shape", "1x64x64x75", "--shape", "2x136x200x150", "--shape", "4x256x248x75",
                         "--cache", str(cache), "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [r["shape"] for r in rows] == ["1x64x64x75", "2x136x200x150", "4x256x248x75"]
    for r in rows:
        assert r["max_abs_out"] > 0.5
        assert r["max_abs_diff"] <= 1e-4 * r["max_abs_out"]
        assert r["torch_ms"] > 0 and r["engine_ms"] > 0


def test_build_prints_the_id_and_reuses_identical_engines(built, tiny_checkpoint, capsys) -> None:
    cache, engine_id = built("sd1")
    code, out, _ = run(capsys, "build", str(tiny_checkpoint("sd1")), "--backend", "onnxruntime",
                       "--profile", PROFILE, "--cache", str(cache))
    assert code == 0 and out.strip() == engine_id
    # another checkpoint of the same architecture gets the same (refittable) engine, not a new build
    code, out, _ = run(capsys, "build", str(tiny_checkpoint("sd1", seed=7)), "--backend", "onnxruntime",
                       "--profile", PROFILE, "--cache", str(cache), "--json")
    assert json.loads(out)["id"] == engine_id and json.loads(out)["built"] is False


def test_check_refits_another_checkpoint_of_the_family(built, tiny_checkpoint, capsys) -> None:
    cache, engine_id = built("sd2-v")
    code, out, err = run(capsys, "check", engine_id, "--checkpoint", str(tiny_checkpoint("sd2-v", seed=5)),
                         "--shape", "2x128x128x75", "--cache", str(cache), "--json")
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    assert row["max_abs_diff"] <= 1e-4 * row["max_abs_out"]


def test_list_and_delete(built, tiny_checkpoint, capsys, tmp_path: Path) -> None:
    cache, engine_id = built("sd1")
    code, out, _ = run(capsys, "list", "--cache", str(cache), "--json")
    engines = {e["id"]: e for e in json.loads(out)["engines"]}
    assert engines[engine_id]["ok"] and engines[engine_id]["family"] == "sd1"
    assert engines[engine_id]["profiles"] == [PROFILE] and engines[engine_id]["size"] > 0
    # delete in a private copy of the cache so other tests keep their engine
    import shutil

    private = tmp_path / "cache"
    shutil.copytree(cache, private)
    code, _, _ = run(capsys, "delete", engine_id, "--cache", str(private))
    assert code == 0 and not (private / engine_id).exists()
    code, _, err = run(capsys, "delete", engine_id, "--cache", str(private))
    assert code == 1 and engine_id in err
    code, _, err = run(capsys, "delete", "../../etc", "--cache", str(private))
    assert code == 1 and "error:" in err


def test_truncated_engine_is_stale_and_never_loaded(built, tiny_checkpoint, capsys, tmp_path: Path) -> None:
    import shutil

    cache, engine_id = built("sd1")
    private = tmp_path / "cache"
    shutil.copytree(cache, private)
    engine_file = next((private / engine_id).glob("*.onnx"))
    engine_file.write_bytes(engine_file.read_bytes()[:1000])
    code, out, _ = run(capsys, "list", "--cache", str(private), "--json")
    entry = next(e for e in json.loads(out)["engines"] if e["id"] == engine_id)
    assert entry["ok"] is False and "size" in entry["reason"]
    code, _, err = run(capsys, "check", engine_id, "--checkpoint", str(tiny_checkpoint("sd1")),
                       "--shape", "1x64x64x75", "--cache", str(private))
    assert code == 1 and "error:" in err and "Traceback" not in err


def test_hand_edited_manifest_is_stale(built, capsys, tmp_path: Path) -> None:
    import shutil

    cache, engine_id = built("sd1")
    private = tmp_path / "cache"
    shutil.copytree(cache, private)
    path = private / engine_id / "manifest.json"
    doc = json.loads(path.read_text())
    doc["key"]["profiles"] = ["1x64x64x75:2x128x192x150:8x2048x2048x150"]
    path.write_text(json.dumps(doc))
    code, out, _ = run(capsys, "list", "--cache", str(private), "--json")
    entry = next(e for e in json.loads(out)["engines"] if e["id"] == engine_id)
    assert entry["ok"] is False and "edited" in entry["reason"]


def test_shape_outside_the_profile_is_a_clear_error(built, tiny_checkpoint, capsys) -> None:
    cache, engine_id = built("sd1")
    code, _, err = run(capsys, "check", engine_id, "--checkpoint", str(tiny_checkpoint("sd1")),
                       "--shape", "8x512x512x75", "--cache", str(cache))
    assert code == 1 and "outside every profile" in err


def test_wrong_family_checkpoint_is_refused(built, tiny_checkpoint, capsys) -> None:
    cache, engine_id = built("sd1")
    code, _, err = run(capsys, "check", engine_id, "--checkpoint", str(tiny_checkpoint("sd2")),
                       "--shape", "1x64x64x75", "--cache", str(cache))
    assert code == 1 and "another architecture" in err


def test_bad_inputs_exit_nonzero_with_a_message(tiny_checkpoint, capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, "build", str(tiny_checkpoint("sd1")), "--backend", "onnxruntime",
                         "--profile", "1x513x512x75", "--cache", str(tmp_path), "--json")
    assert code == 1 and out == "" and "multiple of 8" in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model at all" * 10)
    code, out, err = run(capsys, "build", str(bad), "--backend", "onnxruntime", "--profile", "1x512x512x75",
                         "--cache", str(tmp_path / "c"))
    assert code == 1 and "safetensors" in err
    assert not (tmp_path / "c").exists() or not any(p for p in (tmp_path / "c").iterdir() if not p.name.startswith("."))
    code, _, err = run(capsys, "build", str(tiny_checkpoint("sd1")), "--backend", "tensorrt",
                       "--profile", "1x512x512x75", "--cache", str(tmp_path / "d"))
    assert code == 1 and "tensorrt" in err and "Traceback" not in err


def test_export_writes_onnx_and_weight_names(tiny_checkpoint, capsys, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "export", str(tiny_checkpoint("sdxl-base")), "--out", str(tmp_path / "x"),
                       "--dtype", "float32", "--json")
    assert code == 0
    data = json.loads(out)
    assert Path(data["onnx"]).is_file() and data["family"] == "sdxl-base"
    weights = json.loads((tmp_path / "x" / "weights.json").read_text())
    assert len(weights) == data["weights"] and "label_emb.0.0.weight" in weights


def test_demo_runs_as_a_fresh_process(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(EXT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "sdtrt", "demo", "--json"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["rows"]) == 3
    assert all(r["max_abs_diff"] <= 1e-4 * r["max_abs_out"] for r in data["rows"])
    assert not (tmp_path / ".cache" / "sd-webui-trt").exists()  # the demo leaves no engine cache behind


def test_gc_removes_dead_build_leftovers_and_keeps_engines(built, capsys, tmp_path: Path) -> None:
    """`gc` runs the registry's cleanup: a dead build's temp folder and an orphan plan go, the engine stays."""
    import shutil

    cache, engine_id = built("sd1")
    private = tmp_path / "cache"
    shutil.copytree(cache, private)
    dead = private / f".tmp-{engine_id}-otherhost-4242-deadbeef"
    dead.mkdir()
    (dead / "engine.plan").write_bytes(b"half a plan")
    orphan = private / ("sd1-orphan-" + "0" * 16)
    orphan.mkdir()
    (orphan / "model.onnx").write_bytes(b"no manifest")
    code, out, _ = run(capsys, "gc", "--cache", str(private), "--json")
    assert json.loads(out)["removed"] == []  # both are fresh: a live build or a copy in progress looks like this
    code, out, _ = run(capsys, "gc", "--cache", str(private), "--older-than", "0", "--json")
    assert code == 0
    assert sorted(json.loads(out)["removed"]) == sorted([dead.name, orphan.name])
    assert not dead.exists() and not orphan.exists()
    code, out, _ = run(capsys, "list", "--cache", str(private), "--json")
    engines = {e["id"]: e for e in json.loads(out)["engines"]}  # the shared cache may hold other tests' engines
    assert engines[engine_id]["ok"] and orphan.name not in engines
    code, out, _ = run(capsys, "gc", "--cache", str(private))
    assert code == 0 and "nothing to remove" in out
