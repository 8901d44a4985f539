"""The engine cache on storage that lies like NFS, EFS or an S3 mount, through a real kernel mount (FUSE, see
tests/faultfs.py): renames that report failure after they happened, flock that locks nothing, no rename at all,
a full disk, slow reads, builders killed with SIGKILL mid-publish while readers list and load. Whatever happens:
nothing corrupt, nothing partial ever listed or loaded, one engine per key, clear errors.

The figures (FIGURE lines) are the counts of what was injected and what the readers saw."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from faultfs import fuse_available, mounted
from reliability_cache_harness import (
    LEASE_S,
    PLAN_BYTES,
    SOURCE,
    audit,
    make_key,
    make_produce,
    plan_is_whole,
    report_figure,
    trials,
)
from sdtrt.errors import BuildError, CacheCannotRename
from sdtrt.storage.registry import Registry

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=f"FUSE: {fuse_available()}")

KEY = make_key()
ROOT = Path(__file__).resolve().parents[1]


def _cache(fs: Any) -> Path:
    return fs.mount / "engines"


@pytest.mark.timeout(120)
def test_renames_that_report_failure_after_succeeding_still_publish_delete_and_quarantine(tmp_path: Path,
                                                                                            capsys: Any,
                                                                                            caplog: Any) -> None:
    with mounted(tmp_path / "backing", tmp_path / "mnt", rename="lie") as fs:
        cache = _cache(fs)
        reg = Registry(cache)
        with caplog.at_level("WARNING", logger="sdtrt.storage.publish"):
            m = reg.build(KEY, SOURCE, make_produce())  # the probe's rename, the manifest's and the publish "fail"
        # the storage's lie is told in the log (an operator's sign of NFS-like caching), and the engine is used
        assert [r.getMessage() for r in caplog.records if m.id in r.getMessage() and "although it happened"
                in r.getMessage()], caplog.text
        assert reg.verify(m.id) == m
        assert plan_is_whole((cache / m.id / "unet.plan").read_bytes())
        assert reg.build(KEY, SOURCE, make_produce()) == m  # found, not rebuilt
        seen = audit(fs.backing / "engines")  # judged from the backing folder: no client cache in the way
        assert (seen.engines, seen.partial, seen.temps) == ([m.id], [], [])
        other = reg.build(make_key(device="NVIDIA L40S", compute_capability="8.9"), SOURCE, make_produce())
        reg.delete(other.id)
        assert not (fs.backing / "engines" / other.id).exists()
        moved = reg.quarantine(m.id)
        assert moved.name.startswith(".quarantine-") and (fs.backing / "engines" / moved.name).is_dir()
        assert not (fs.backing / "engines" / m.id).exists()
        stats = fs.stats()
    report_figure(capsys, "lying renames", renames=stats["renames"], reported_failed_after_succeeding=stats["renames_lied"])
    assert stats["renames_lied"] >= 6 and stats["renames_lied"] == stats["renames"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("refusal", ["ENOSYS", "EPERM", "EXDEV"])
def test_a_file_system_that_cannot_rename_is_refused_up_front_and_still_serves(tmp_path: Path, refusal: str) -> None:
    # an engine published elsewhere (by a machine whose storage renames) is there already
    elsewhere = Registry(tmp_path / "backing" / "engines").build(KEY, SOURCE, make_produce())
    before = sorted(os.listdir(tmp_path / "backing" / "engines"))
    with mounted(tmp_path / "backing", tmp_path / "mnt", rename=refusal) as fs:
        reg = Registry(_cache(fs))
        assert not reg.writable()
        with pytest.raises(CacheCannotRename) as e:
            reg.build(make_key(device="NVIDIA L4", compute_capability="8.9"), SOURCE, make_produce())
        assert "cannot rename" in str(e.value) and "S3" in str(e.value) and str(_cache(fs)) in str(e.value)
        assert [s.id for s in reg.list()] == [elsewhere.id] and reg.verify(elsewhere.id) == elsewhere  # served
        assert sorted(os.listdir(fs.backing / "engines")) == before  # the refusal left nothing behind

        # the pre-build Job refuses at start, naming the reason, before exporting anything
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"builds": [{"checkpoint": "x.safetensors", "profiles": ["1x64x64x75"]}]}))
        out = subprocess.run([sys.executable, "-m", "sdtrt", "prebuild", str(plan), "--cache", str(_cache(fs))],
                             capture_output=True, text=True, timeout=120, check=False,
                             env=dict(os.environ, PYTHONPATH=str(ROOT / "extension")))
        assert out.returncode == 1 and "cannot rename" in out.stderr, out.stderr
        assert sorted(os.listdir(fs.backing / "engines")) == before
        assert fs.stats()["renames_refused"] >= 3


@pytest.mark.timeout(120)
def test_a_full_disk_midway_publishes_nothing_and_the_next_build_succeeds(tmp_path: Path, capsys: Any) -> None:
    with mounted(tmp_path / "backing", tmp_path / "mnt") as fs:
        reg = Registry(_cache(fs))
        reg.writable()  # the folder exists before the budget starts
        _cache(fs).mkdir(exist_ok=True)
        fs.set(enospc_after=PLAN_BYTES // 2)
        with pytest.raises(BuildError) as e:
            reg.build(KEY, SOURCE, make_produce(chunks=4))
        assert os.strerror(errno.ENOSPC) in str(e.value) and "full" in str(e.value)
        assert "nothing was published" in str(e.value)
        seen = audit(fs.backing / "engines")
        assert (seen.engines, seen.temps, seen.temp_bytes) == ([], [], 0)
        fs.set(enospc_after=None)
        m = reg.build(KEY, SOURCE, make_produce())
        assert reg.verify(m.id) == m
        report_figure(capsys, "disk full", enospc_injected=fs.stats()["enospc"], published_after_space_freed=1)


# ---- many builders and readers, flock that locks nothing, lying renames, slow reads, SIGKILL ------------------
def _builder(cache: str, device: str, out: Any) -> None:
    reg = Registry(cache, lease_s=LEASE_S)
    m = reg.build(make_key(device=device), SOURCE, make_produce(chunks=8, pause=0.02), lock_timeout=30)
    out.put(("built", device, m.id, m.files[0].sha256))


def _reader(cache: str, stop: Any, out: Any) -> None:
    """What a serving replica does: list, then load (read every byte of) each engine listed as ok."""
    reg = Registry(cache, lease_s=LEASE_S)
    listed = loaded = bad = 0
    problems: list[str] = []
    while not stop.is_set():
        for status in reg.list():
            if not status.ok:
                continue
            listed += 1
            try:
                m = reg.verify(status.id)  # the full check a load makes: sizes and hashes
                data = (Path(cache) / status.id / m.files[0].name).read_bytes()
            except Exception as e:  # noqa: BLE001 - a listed engine that fails to load is what we look for
                bad += 1
                problems.append(f"{status.id}: {e}")
                continue
            loaded += 1
            if not plan_is_whole(data):
                bad += 1
                problems.append(f"{status.id}: a partial plan was loaded")
    out.put(("read", listed, loaded, bad, problems[:5]))


@pytest.mark.timeout(300)
def test_racing_builders_killed_mid_publish_never_expose_a_partial_engine(tmp_path: Path, capsys: Any) -> None:
    ctx = mp.get_context("fork")
    rng = random.Random(4321)
    devices = ["NVIDIA A100", "NVIDIA L40S", "NVIDIA H100"]
    n_builders = trials(24, 9)
    with mounted(tmp_path / "backing", tmp_path / "mnt", flock="noop", rename="lie-half", read_delay_s=0.001) as fs:
        cache = str(_cache(fs))
        Registry(cache).writable()
        out = ctx.Queue()
        stop = ctx.Event()
        readers = [ctx.Process(target=_reader, args=(cache, stop, out)) for _ in range(2)]
        for r in readers:
            r.start()
        builders, killed = [], 0
        t0 = time.monotonic()
        for i in range(n_builders):
            p = ctx.Process(target=_builder, args=(cache, devices[i % 3], out))
            p.start()
            builders.append(p)
            if i % 3 == 2:  # every third one dies somewhere in its build or publish
                time.sleep(rng.uniform(0.02, 0.25))
                os.kill(p.pid, signal.SIGKILL)
                killed += 1
        for p in builders:
            p.join(120)
        for device in devices:  # whatever the kills left, each engine gets built by someone
            _builder(cache, device, out)
        time.sleep(0.3)
        stop.set()
        for r in readers:
            r.join(60)
        wall = time.monotonic() - t0
        results = []
        while len([x for x in results if x[0] == "read"]) < len(readers):
            results.append(out.get(timeout=30))
        while not out.empty():
            results.append(out.get())
        stats = fs.stats()
        exit_codes = [p.exitcode for p in builders]
        Registry(str(fs.backing / "engines")).cleanup(max_age_s=0)  # what the killed builders left (dead pids)
        seen = audit(fs.backing / "engines")

    built = [x for x in results if x[0] == "built"]
    reads = [x for x in results if x[0] == "read"]
    by_device: dict[str, set[tuple[str, str]]] = {}
    for _, device, engine_id, digest in built:
        by_device.setdefault(device, set()).add((engine_id, digest))
    listed, loaded, bad = (sum(r[i] for r in reads) for i in (1, 2, 3))
    sigkilled = sum(c == -signal.SIGKILL for c in exit_codes)
    report_figure(capsys, "NFS-like race", builders=n_builders, sigkilled_mid_build=sigkilled, finished=len(built),
                  listed=listed, loaded=loaded, partial_or_failed_loads=bad, renames_lied=stats["renames_lied"],
                  flocks_ignored=stats["flocks_ignored"], slow_reads=stats["slow_reads"], wall_s=round(wall, 1))
    assert bad == 0, [r[4] for r in reads]
    assert loaded > 0  # the readers did load engines while builders raced
    assert sigkilled > 0 and sorted(c for c in exit_codes if c != -signal.SIGKILL) == [0] * (n_builders - sigkilled)
    # every builder of one key got the same engine (the one published), whoever won the race
    assert sorted(by_device) == sorted(devices) and all(len(v) == 1 for v in by_device.values()), by_device
    assert sorted(seen.engines) == sorted(next(iter(v))[0] for v in by_device.values())
    assert (seen.partial, seen.unreadable_manifests, seen.temps) == ([], [], [])
    assert stats["flocks_ignored"] > 0 and stats["renames_lied"] > 0
