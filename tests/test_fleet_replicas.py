"""A fleet end to end: three fake-A1111 1.10.1 replicas (each its own process, tests/fleet_replica.py) that never build
(SDTRT_BUILDS=off) share one engine cache through a READ-ONLY kernel mount (FUSE, tests/faultfs.py), while the
pre-build Job (`python -m sdtrt prebuild`, onnxruntime) writes the same folder through a second mount that lies like
NFS (every other rename reports EIO after it happened; flock locks nothing). Requests keep coming to every replica
throughout.

First a Job is frozen (SIGSTOP) in its ONNX export while the replicas boot, then killed with SIGKILL while they
serve: its temp folder and lock stay, nothing is listed, nothing loads, readiness stays 503 and the replicas keep
generating on PyTorch. Then a Job publishes the engine, and without a restart:
- "rescan" (SDTRT_RESCAN_S=3600) stays on PyTorch until POST /sdtrt/v1/rescan, then serves the engine at once;
- "self" (SDTRT_RESCAN_S=1) serves it by itself, from the first generation that starts SDTRT_RESCAN_S after the
  publish (it is ready on PyTorch all along, and its probe says when it serves the engine);
- "probe" (SDTRT_RESCAN_S=1, SDTRT_REQUIRE_ENGINE=1) is 503 until the engine is there, and gets no requests between
  the Job's start and its readiness flip (as a load balancer sends none to a replica that is not ready): the probe
  alone finds and loads the engine.
Every request succeeds, every image equals SD Unet None's (PyTorch) for the seed, no replica writes to the cache.
Figures: requests per replica, publish -> first engine call, the FUSE counts."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from faultfs import fuse_available, mounted
from reliability_cache_harness import report_figure

pytest.importorskip("fastapi")
pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=f"FUSE: {fuse_available()}")

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
STEPS = 3
PROFILE = "1x64x64x75"  # static: the onnxruntime build takes seconds
PACE_S = 0.25  # between two requests to one replica (two cores for three replicas, a Job and two FUSE servers)
RESCAN_S = 1.0
#: how late after the publish (seen in the backing folder) a look at the cache may still miss it
SLACK_S = 0.5
WAIT_S = 40.0  # any single wait; a run takes ~30 s
ENGINE_RE = re.compile(r"^sd1-onnxruntime-[0-9a-f]{16}$")


# ---- a replica process and its driver ------------------------------------------------------------------------
class Replica:
    """A fleet_replica.py process; `call` sends a command and waits for its answer (any thread)."""

    def __init__(self, name: str, workdir: Path, checkpoint: Path, cache: Path, env: dict[str, str]) -> None:
        self.name, self.env = name, env
        self.log = workdir.parent / f"{name}.log"
        workdir.mkdir(parents=True)
        full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "extension"), **env)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(TESTS / "fleet_replica.py"), str(workdir),
                                          str(checkpoint), str(cache)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True, env=full_env)
        self._ids = count()
        self._booted: queue.Queue[dict[str, Any]] = queue.Queue()
        self._waiting: dict[Any, queue.Queue[dict[str, Any]]] = {"boot": self._booted}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.boot_s: float | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            answer = json.loads(line)
            with self._lock:
                box = self._waiting.pop(answer["id"], None)
            if box is not None:
                box.put(answer)
        with self._lock:  # the process ended: whoever waits hears it now
            for box in self._waiting.values():
                box.put({"ok": False, "error": f"replica {self.name} exited ({self.proc.poll()}): "
                                               f"{self.log.read_text()[-1500:]}"})
            self._waiting.clear()

    def wait_boot(self) -> None:
        answer = self._booted.get(timeout=120)
        assert "boot_s" in answer, answer
        self.boot_s = answer["boot_s"]

    def call(self, op: str, timeout: float = 60, **fields: Any) -> dict[str, Any]:
        box: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            cid = next(self._ids)
            self._waiting[cid] = box
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"id": cid, "op": op, **fields}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as e:
            return {"ok": False, "error": f"replica {self.name} is gone: {e}"}
        try:
            return box.get(timeout=timeout)
        except queue.Empty:
            return {"ok": False, "error": f"replica {self.name}: no answer to {op} in {timeout} s"}

    def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        answer = self.call("http", method=method, path=path, json=body)
        assert "status" in answer, answer
        return answer["status"], answer["body"]

    def status(self) -> dict[str, Any]:
        code, body = self.http("GET", "/sdtrt/v1/status")
        assert code == 200, body
        return body

    def engine_rows(self) -> list[dict[str, Any]]:
        code, body = self.http("GET", "/sdtrt/v1/engines")
        assert code == 200, body
        return list(body["engines"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"id": "quit", "op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


@dataclass
class Driver:
    """Sends txt2img to one replica, one at a time, PACE_S apart, while `gate` is set, until stopped."""

    replica: Replica
    gate: threading.Event = field(default_factory=threading.Event)
    results: list[dict[str, Any]] = field(default_factory=list)
    idle: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.gate.set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.gate.is_set():
                self.idle.set()
                self.gate.wait(0.05)
                continue
            self.idle.clear()
            answer = self.replica.call("txt2img", steps=STEPS, seed=77)
            answer.setdefault("t0", time.time())
            self.results.append(answer)
            self.stop.wait(PACE_S)
        self.idle.set()

    def hold(self) -> None:
        """No more requests until `gate` is set again; returns once none is in flight."""
        self.gate.clear()
        self.idle.clear()
        assert self.idle.wait(WAIT_S), f"{self.replica.name}: a generation did not finish"

    def done(self) -> list[dict[str, Any]]:
        return list(self.results)


@dataclass
class Prober:
    """GET /sdtrt/v1/ready every 0.2 s, as a kubelet would: (time, status, body) each."""

    replica: Replica
    seen: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            code, body = self.replica.http("GET", "/sdtrt/v1/ready")
            self.seen.append((time.time(), code, body))
            self.stop.wait(0.2)

    def first(self, code: int, serving: str) -> float | None:
        """When a probe first answered `code` and said it serves on `serving`."""
        return next((t for t, c, body in list(self.seen) if c == code and body["serving"] == serving), None)


def wait_for(what: str, condition: Any, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---- the Job and the cache -----------------------------------------------------------------------------------
def start_job(plan: Path, models: Path, cache: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "extension"))
    return subprocess.Popen([sys.executable, "-m", "sdtrt", "prebuild", str(plan), "--models", str(models),
                             "--cache", str(cache), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def listing(folder: Path) -> list[tuple[str, int, int]]:
    """Every path under `folder` with its size and mtime: what a writer would change."""
    out = []
    for p in folder.rglob("*"):
        st = p.lstat()
        out.append((str(p.relative_to(folder)), 0 if p.is_dir() else st.st_size, st.st_mtime_ns))
    return sorted(out)


def engines_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ENGINE_RE.match(p.name))


def close_to(latents: list[float], reference: list[float]) -> bool:
    """The tolerance of tests/test_fleet.py: max |a - b| <= 1e-3 * max |reference|."""
    scale = max(abs(v) for v in reference)
    return len(latents) == len(reference) and max(abs(a - b) for a, b in zip(latents, reference)) <= 1e-3 * scale


# ---- the test ------------------------------------------------------------------------------------------------
REPLICAS = {  # name: environment
    "rescan": {"SDTRT_BUILDS": "off", "SDTRT_RESCAN_S": "3600"},
    "self": {"SDTRT_BUILDS": "off", "SDTRT_RESCAN_S": str(RESCAN_S)},
    "probe": {"SDTRT_BUILDS": "off", "SDTRT_RESCAN_S": str(RESCAN_S), "SDTRT_REQUIRE_ENGINE": "1"},
}


@pytest.mark.timeout(180)
def test_three_replicas_on_a_read_only_cache_switch_to_the_jobs_engine_without_a_restart(
        tiny_checkpoint: Any, tmp_path: Path, capsys: Any) -> None:
    t_start = time.monotonic()
    marks: dict[str, float] = {}  # the timeline, in seconds from the start

    def mark(what: str) -> None:
        marks[what] = round(time.monotonic() - t_start, 1)

    checkpoint = tiny_checkpoint("sd1")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"builds": [{"checkpoint": checkpoint.name, "profiles": [PROFILE],
                                            "backend": "onnxruntime"}]}))
    backing = tmp_path / "backing"
    (backing / "engines").mkdir(parents=True)  # the volume, provisioned empty
    replicas: list[Replica] = []
    drivers: list[Driver] = []
    probers: list[Prober] = []
    jobs: list[subprocess.Popen[str]] = []
    with mounted(backing, tmp_path / "ro", read_only=True) as ro, \
            mounted(backing, tmp_path / "rw", rename="lie-half", flock="noop") as rw:
        try:
            cache_ro, cache_rw, cache = ro.mount / "engines", rw.mount / "engines", backing / "engines"
            for name, env in REPLICAS.items():
                replicas.append(Replica(name, tmp_path / name / "host", checkpoint, cache_ro, env))
            # the first Job starts meanwhile; it is frozen (SIGSTOP) once its export runs and killed (SIGKILL)
            # there once the replicas serve: a node lost mid-build
            killed = start_job(plan, checkpoint.parent, cache_rw)
            jobs.append(killed)
            exporting = wait_for("the first Job's export to start", lambda: next(
                iter(cache.glob(".tmp-sd1-onnxruntime-*/onnx")), None) or killed.poll() is not None)
            os.kill(killed.pid, signal.SIGSTOP)
            assert killed.poll() is None and engines_in(cache) == [], \
                f"the first Job ended before it could be killed: {killed.communicate()}"
            found = re.match(r"\.tmp-(sd1-onnxruntime-[0-9a-f]{16})-", exporting.parent.name)
            assert found, exporting
            engine_id = found.group(1)
            mark("job_frozen_mid_build")
            for r in replicas:
                r.wait_boot()
            rescan, by_self, probe = replicas
            mark("booted")

            # ---- no engine yet: no replica builds, none lists the build in progress, readiness waits -------
            for r in replicas:
                code, body = r.http("POST", "/sdtrt/v1/engines", {"checkpoint": checkpoint.stem,
                                                                  "profiles": [PROFILE]})
                assert code == 409 and "SDTRT_BUILDS=off" in body["detail"] and "pre-build Job" in body["detail"]
                assert r.engine_rows() == [] and r.status()["counters"]["engine_calls"] == 0
            code, body = rescan.http("GET", "/sdtrt/v1/ready")
            assert code == 200 and body["serving"] == "pytorch" and not body["require_engine"]  # ready on PyTorch

            drivers = [Driver(r) for r in replicas]
            probers = [Prober(r) for r in (by_self, probe)]
            for worker in (*drivers, *probers):
                worker.thread.start()
            wait_for("the first generations", lambda: all(len(d.results) >= 2 for d in drivers))
            mark("first_generations")

            # ---- the first Job killed with SIGKILL mid-build ------------------------------------------------
            os.kill(killed.pid, signal.SIGKILL)
            assert killed.wait(10) == -signal.SIGKILL
            t_kill = time.time()
            mark("killed")
            assert engines_in(cache) == []
            left_by_kill = sorted(p.name for p in cache.iterdir())
            # every replica has looked at the cache since the kill (RESCAN_S), and POST /rescan finds nothing new
            wait_for("generations after the kill", lambda: all(
                any(g["t0"] > t_kill + RESCAN_S + SLACK_S for g in d.done()) for d in drivers[1:]))
            assert rescan.call("http", method="POST", path="/sdtrt/v1/rescan")["body"] == {"changed": False,
                                                                                         "engines": []}
            for r in replicas:
                assert r.engine_rows() == [], f"{r.name} lists what the killed Job left"
                assert r.status()["counters"]["engine_calls"] == 0 and r.status()["active"] is None
            mark("checked_after_kill")
            code, body = probe.http("GET", "/sdtrt/v1/ready")
            assert code == 503 and body["engine"] is None and "no engine for sd1-s0" in body["reasons"][0], body
            code, body = by_self.http("GET", "/sdtrt/v1/ready")
            assert code == 200 and body["engine"] is None and body["serving"] == "pytorch", body

            # ---- the Job that publishes; "probe" gets no requests from its start until it says it is ready --
            probe_driver = drivers[2]
            probe_driver.hold()
            probe_generations = probe.status()["generations"]
            t_hold = time.time()
            published: list[float] = []

            def watch() -> None:  # when the engine appears in the backing folder (a rename: all at once)
                while not published and time.monotonic() - t_start < 170:
                    if engines_in(cache):
                        published.append(time.time())
                    time.sleep(0.02)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            job = start_job(plan, checkpoint.parent, cache_rw)
            jobs.append(job)
            mark("job_started")
            out, err = job.communicate(timeout=120)
            assert job.returncode == 0, err
            report = json.loads(out)
            assert report["built"] == 1 and report["builds"][0]["id"] == engine_id, report
            watcher.join(5)
            assert published, "the Job exited 0 but no engine appeared"
            t_publish = published[0]
            after_job = listing(backing)  # what the Jobs wrote; nothing may change it from here on
            mark("job_exited")

            # "rescan": keeps PyTorch (its next look is an hour away) until POST /sdtrt/v1/rescan, then the engine
            wait_for("two generations on 'rescan' after the publish", lambda: sum(
                g["t0"] > t_publish + SLACK_S for g in drivers[0].done()) >= 2)
            t_rescan = time.time()
            answer = rescan.call("http", method="POST", path="/sdtrt/v1/rescan")
            t_rescanned = time.time()
            mark("rescanned")
            assert answer["status"] == 200 and answer["body"] == {"changed": True, "engines": [engine_id]}, answer

            # "probe": the probe alone flips it to ready, with the engine loaded and no generation run
            t_ready = wait_for("'probe' to turn ready", lambda: probers[1].first(200, "engine"))
            status = probe.status()
            assert status["generations"] == probe_generations and status["counters"]["engine_calls"] == 0
            assert status["active"]["loaded"] == [engine_id]
            probe_driver.gate.set()
            mark("probe_ready")

            # every replica runs three more generations after the moment it had to switch by: 'rescan' its
            # rescan, 'probe' its readiness, 'self' its SDTRT_RESCAN_S after the publish; all on the engine
            since = {"rescan": t_rescanned, "self": t_publish + RESCAN_S + SLACK_S, "probe": t_ready}
            wait_for("three generations on every replica after it had to switch", lambda: all(
                sum(g["t0"] > since[d.replica.name] for g in d.done()) >= 3 for d in drivers))
            for worker in (*drivers, *probers):
                worker.stop.set()
            for worker in (*drivers, *probers):
                worker.thread.join(WAIT_S)
            for d in drivers:
                late = [g.get("engine_calls") for g in d.done() if g["t0"] > since[d.replica.name]]
                assert set(late) == {STEPS}, (
                    f"{d.replica.name!r} did not serve the engine {since[d.replica.name] - t_publish:.1f} s after "
                    f"the publish ({d.replica.env}); engine calls of its generations since: {late}")
            t_serving_self = probers[0].first(200, "engine")
            assert t_serving_self is not None, f"'self' never said it serves the engine: {probers[0].seen[-1]}"
            mark("all_on_engine")

            # ---- still no replica builds, deletes or writes anything -------------------------------------
            for r in replicas:
                code, body = r.http("POST", "/sdtrt/v1/engines", {"checkpoint": checkpoint.stem,
                                                                  "profiles": ["1x128x128x75"]})
                assert code == 409 and "SDTRT_BUILDS=off" in body["detail"]
                assert r.http("DELETE", f"/sdtrt/v1/engines/{engine_id}")[0] == 409
                assert r.http("POST", f"/sdtrt/v1/engines/{engine_id}/rebuild")[0] == 409
                assert [(row["id"], row["ok"]) for row in r.engine_rows()] == [(engine_id, True)]
                status = r.status()  # every engine call counted was one of the driver's generations'
                driven = sum(g.get("engine_calls", 0) for g in drivers[replicas.index(r)].done())
                assert status["counters"]["engine_calls"] == driven > 0 and status["active"]["engines"] == [engine_id]
                assert status["counters"]["fallback_calls"] == 0 and status["counters"]["last_error"] is None, status
                code, body = r.http("GET", "/sdtrt/v1/ready")
                assert code == 200 and body["serving"] == "engine" and body["engine"] == engine_id, (r.name, body)

            # ---- the engine's images are PyTorch's for the seed, on each replica ---------------------------
            compared = {}
            for r in replicas:
                on_engine = r.call("txt2img", steps=STEPS, seed=77)
                reference = r.call("txt2img", steps=STEPS, seed=77, unet="None")
                assert on_engine.get("engine_calls") == STEPS and reference.get("engine_calls") == 0, \
                    (on_engine.get("error"), reference.get("error"))
                assert close_to(on_engine["latents"], reference["latents"]), r.name
                compared[r.name] = reference["latents"]

            assert all(close_to(latents, compared["rescan"]) for latents in compared.values())  # one checkpoint
            mark("compared")
            assert listing(backing) == after_job
        finally:
            print(f"timeline (s): {marks}", file=sys.stderr)  # shown with a failure
            for worker in (*drivers, *probers):
                worker.stop.set()
            for job in jobs:
                if job.poll() is None:
                    job.kill()
                    job.wait()
            for r in replicas:
                r.close()
    wall = time.monotonic() - t_start
    ro_stats, rw_stats = ro.stats(), rw.stats()  # final once unmounted (the FUSE server writes them on exit)

    # ---- what each replica did ---------------------------------------------------------------------------------
    figures: dict[str, Any] = {}
    for d in drivers:
        name, results = d.replica.name, d.done()
        failed = [g.get("error") for g in results if not g.get("ok")]
        assert failed == [], (name, failed[:3])
        calls = [g["engine_calls"] for g in results]
        assert set(calls) <= {0, STEPS}, (name, calls)  # whole generations on one or the other, never mixed
        first_engine = next(i for i, c in enumerate(calls) if c == STEPS)
        # PyTorch first, then the engine from one generation on, for good (no restart, no going back)
        assert first_engine > 0 and set(calls[:first_engine]) == {0} and set(calls[first_engine:]) == {STEPS}, \
            (name, calls)
        assert all(g["t0"] > t_publish for g in results[first_engine:first_engine + 1])
        assert all(close_to(g["latents"], compared[name]) for g in results), f"{name}: an image differs"
        first = results[first_engine]
        figures[name] = {"sent": len(results), "succeeded": len(results) - len(failed),
                         "on_pytorch": first_engine, "on_engine": len(results) - first_engine,
                         "switched_pytorch_to_engine": True,
                         # the generation that switched began (its UNet list rebuilt, the engine loaded) / ended
                         "publish_to_switching_generation_s": [round(first["t0"] - t_publish, 2),
                                                               round(first["t1"] - t_publish, 2)],
                         "boot_s": round(d.replica.boot_s or 0, 2)}
    rescan_results, _, probe_results = (d.done() for d in drivers)
    # "rescan" never looked by itself: PyTorch until the rescan, the engine from the first generation after it
    assert all(g["engine_calls"] == 0 for g in rescan_results if g["t0"] < t_rescan)
    assert sum(g["t0"] > t_publish + SLACK_S and g["engine_calls"] == 0 for g in rescan_results) >= 2
    assert next(g for g in rescan_results if g["t0"] > t_rescanned)["engine_calls"] == STEPS
    # "probe": no generation from the hold until it turned ready (the probe alone), then the engine from the first
    assert not [g for g in probe_results if t_hold <= g["t0"] <= t_ready]
    assert all(g["t1"] < t_publish for g in probe_results if g["t0"] < t_hold)
    assert next(g for g in probe_results if g["t0"] > t_ready)["engine_calls"] == STEPS
    # readiness: "probe" 503 until the engine existed, then 200 on the engine for good; "self" 200 all along,
    # on PyTorch, then on the engine for good
    for prober, flipped, waiting in zip(probers, (t_serving_self, t_ready), ((200, "pytorch"), (503, "pytorch"))):
        before = [(code, body["serving"], body["engine"]) for t, code, body in prober.seen if t < t_publish - 0.1]
        after = [(code, body["serving"]) for t, code, body in prober.seen if t >= flipped]
        assert before and set(before) == {(*waiting, None)}, (prober.replica.name, before)
        assert after and set(after) == {(200, "engine")}, (prober.replica.name, after)
        figures[prober.replica.name]["publish_to_probe_says_engine_s"] = round(flipped - t_publish, 2)
    # the replicas read the engine through the read-only mount and never even tried to change anything there
    assert ro_stats["reads"] > 0 and ro_stats["refused_read_only"] == 0, ro_stats
    assert ro_stats["writes"] == ro_stats["renames"] == ro_stats["flocks"] == 0, ro_stats
    # the cache holds what the Jobs wrote (unchanged since the good one ended): the engine, the lock, and the killed
    # Job's temp folder unless the good Job removed it (it removes those nothing touched for an hour)
    orphan = [n for n in left_by_kill if n.startswith(f".tmp-{engine_id}-")]
    assert len(orphan) == 1 and set(left_by_kill) == {".locks", *orphan}, left_by_kill
    top = sorted({p.split("/")[1] for p, _, _ in after_job if p.count("/") >= 1})
    assert engine_id in top and set(top) <= {".locks", *orphan, engine_id}, top

    for name, fig in figures.items():
        report_figure(capsys, f"fleet replica {name}", **fig, env=REPLICAS[name])
    report_figure(capsys, "fleet FUSE read-only mount (replicas)", **ro_stats)
    report_figure(capsys, "fleet FUSE writable mount (Jobs)", **rw_stats)
    report_figure(capsys, "fleet run", wall_s=round(wall, 1), timeline_s=marks,
                  killed_job_left=left_by_kill, engine=engine_id, cache_after=top)
