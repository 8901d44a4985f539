"""`python -m sdtrt prebuild PLAN`: a fleet's pre-build Job. Builds what a JSON plan names, reuses what is there
(a re-run changes nothing in the cache), reports every failing entry, and refuses a malformed plan before
building anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdtrt.backends import NAMES
from sdtrt.tools.prebuild import PlanError, parse_plan
from sdtrt.tools.tiny import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def _prebuild(plan: Path, models: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "extension"))
    return subprocess.run([sys.executable, "-m", "sdtrt", "prebuild", str(plan), "--models", str(models),
                           "--cache", str(cache), "--json"], check=False, capture_output=True, text=True, env=env, timeout=600)


def test_prebuild_builds_then_reuses_and_reports_each_failure(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_tiny_checkpoint("sd1", models / "Stable-diffusion", stem="sd1")
    cache = tmp_path / "engines"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"builds": [
        {"checkpoint": "Stable-diffusion/sd1.safetensors", "profiles": ["1x64x64x75"], "backend": "onnxruntime"},
        {"checkpoint": "Stable-diffusion/gone.safetensors", "profiles": ["1x64x64x75"], "backend": "onnxruntime"},
    ]}))
    first = _prebuild(plan, models, cache)
    assert first.returncode == 1, first.stderr  # one entry failed: the Job fails, after trying every entry
    data = json.loads(first.stdout)
    ok, gone = data["builds"]
    assert ok["built"] is True and ok["error"] is None
    assert (cache / ok["id"] / "manifest.json").is_file()
    assert gone["id"] is None and "gone.safetensors does not exist" in gone["error"]
    assert (data["built"], data["present"], data["failed"]) == (1, 0, 1)
    before = _listing(cache)

    plan.write_text(json.dumps({"builds": [json.loads(plan.read_text())["builds"][0]]}))
    # what a Job killed an hour ago on another node left (the Job is the only writer: it cleans up); a fresh one
    # may be a live build elsewhere and stays
    dead, fresh = cache / f".tmp-{ok['id']}-deadnode-7-0a1b2c3d", cache / f".tmp-{ok['id']}-livenode-8-4e5f6a7b"
    for d in (dead, fresh):
        d.mkdir()
        (d / "unet.onnx").write_bytes(b"x" * 1000)
    os.utime(dead / "unet.onnx", (time.time() - 7200,) * 2)
    os.utime(dead, (time.time() - 7200,) * 2)
    before = _listing(cache)
    again = _prebuild(plan, models, cache)
    assert again.returncode == 0, again.stderr
    data = json.loads(again.stdout)
    assert data["builds"][0]["id"] == ok["id"] and data["builds"][0]["built"] is False
    assert (data["built"], data["present"], data["failed"]) == (0, 1, 0)
    assert "removed 1 leftovers of dead builds" in again.stderr
    assert _listing(cache) == [e for e in before if not e[0].startswith(dead.name)]  # nothing else written


@pytest.mark.parametrize(("plan", "message"), [
    ([], "a plan is a JSON object"),
    ({"builds": [{"profiles": ["1x64x64x75"]}]}, "builds[0].checkpoint: a checkpoint file name is needed"),
    ({"builds": [{"checkpoint": "a"}]}, "builds[0].profiles: at least one profile"),
    ({"builds": [{"checkpoint": "a", "profiles": []}]}, "builds[0].profiles: at least one profile"),
    ({"builds": [{"checkpoint": "a", "profiles": ["1x64"]}]}, "builds[0]:"),
    ({"builds": [{"checkpoint": "a", "profiles": ["1x64x64x75"], "backend": "cuda"}]}, "builds[0].backend: 'cuda'"),
    ({"builds": [{"checkpoint": "a", "profiles": ["1x64x64x75"], "targets": ["sm7"]}]}, "'sm7' is not a GPU"),
    ({"builds": [{"checkpoint": "a", "profiles": ["1x64x64x75"], "refit": "yes"}]}, "builds[0].refit: true or false"),
    ({"builds": [{"checkpoint": "a", "profiles": ["1x64x64x75"], "dtype": "int8"}]}, "builds[0].dtype"),
    ({"builds": [{"checkpoint": "a", "profiles": ["1x64x64x75"], "profile": "x"}]}, "unknown field 'profile'"),
])
def test_a_malformed_plan_is_refused_with_the_entry_and_field(plan: object, message: str) -> None:
    with pytest.raises(PlanError) as e:
        parse_plan(plan, NAMES)
    assert message in str(e.value)


def test_a_plan_normalises_targets_and_defaults() -> None:
    (entry,) = parse_plan({"builds": [{"checkpoint": " a.safetensors ", "profiles": "1x64x64x75",
                                       "targets": ["8.9", "sm80", "89"]}]}, NAMES)
    assert (entry.checkpoint, entry.profiles, entry.targets) == ("a.safetensors", ("1x64x64x75",), ("sm80", "sm89"))
    assert (entry.backend, entry.refit, entry.controlnet, entry.dtype) == ("auto", True, False, None)


def test_an_unreadable_plan_fails_the_job_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    out = _prebuild(bad, tmp_path, tmp_path / "engines")
    assert out.returncode == 1 and f"the plan {bad} is not JSON" in out.stderr
    assert not (tmp_path / "engines").exists()  # nothing was created for a plan that was never read
