"""Fleet mode on the real A1111 1.10.1: two replicas over one read-only engine cache that a pre-build Job fills.

Both replicas are started as the container starts them, through `deploy/docker/entrypoint.sh serve` (the model
folder, the start-up checkpoint, the API credentials from SDTRT_API_AUTH_FILE (read by the extension's preload.py)
and SDTRT_CACHE come from the environment;
WEBUI_EXTRA_ARGS adds what the harness passes for an offline CPU run and the replica's own `--data-dir`, where the
extension is linked in as for every other test here). Both run with SDTRT_BUILDS=off over the same cache, mounted
read-only through tests/faultfs.py (the serving pods' read-only volume); the pre-build Job
(`entrypoint.sh prebuild`, backend onnxruntime) writes into the folder behind that mount. Replica A has
SDTRT_REQUIRE_ENGINE=1; replica B keeps every fleet default (SDTRT_RESCAN_S 10).

From the fixture's start to the last test, one sender thread per replica keeps posting the same small txt2img
(64x64, Euler, 3 steps, one seed), each with /sdtrt/v1/status read before and after (the sender is the only
client that generates, so the difference is that generation's own UNet calls), and a prober polls /sdtrt/v1/ready
every second without credentials, as a kubelet would. The tests, in file order, check:

1. both replicas refuse builds (POST /sdtrt/v1/engines with credentials -> 409 naming the pre-build Job) and
   nothing appears in the cache;
2. before any engine exists, A is not ready (/ready 503, `probe.sh ready` exits 1) and B is ready on PyTorch
   (200, serving "pytorch");
3. a pre-build Job killed with SIGKILL during its ONNX export leaves its temp folder, and neither replica lists or
   loads anything (A after POST /sdtrt/v1/rescan, B after more than SDTRT_RESCAN_S of generations); every
   generation still answers, on PyTorch;
4. after a complete Job, A serves the engine from the first txt2img posted after POST /sdtrt/v1/rescan, and B
   within 30 s of the publish without any call but its generations (B's /ready is not polled in that window, so
   only its generations can make it look; no rescan is ever posted to B); A's /ready turns 200 and
   `probe.sh ready` exits 0; B stays ready, now serving the engine; every generation is all engine or all PyTorch;
5. the engine's images equal PyTorch's (the same request before the engine existed; tolerance as in
   test_real_webui_sdtrt.py), and every PyTorch image of both replicas is the same;
6. no request of the senders failed; the figures (requests per replica, seconds from the publish to each
   replica's first engine generation, the ready flip) are printed.

Skipped without SDTRT_A1111_DIR (conftest) or FUSE (/dev/fuse, fusermount3 and mfusepy in the runner's Python).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from faultfs import fuse_available, mounted

from .a1111_host import DEFAULT_CONFIG, REPO_ROOT, A1111Install, WebUIHost, clean_env, decode_image, png_pixels
from .conftest import _HOSTS
from .test_real_webui_sdtrt import MAX_8BIT_DIFF, MAX_DIFFERING_FRACTION, PROFILE, compare

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(fuse_available() is not None, reason=f"FUSE: {fuse_available()}")]

ENTRYPOINT = REPO_ROOT / "deploy" / "docker" / "entrypoint.sh"
PROBE = REPO_ROOT / "deploy" / "docker" / "probe.sh"
#: What A1111 needs offline on CPU beyond what the entrypoint passes (as a1111_host.WebUIHost.command() has it).
CPU_ARGS = "--skip-torch-cuda-test --use-cpu all --no-half --precision full --server-name 127.0.0.1"
USER, PASSWORD = "fleet", "s3cret-Pass"
STEPS = 3
SEED = 4242
PAYLOAD = {"prompt": "a photo of a lighthouse", "steps": STEPS, "width": 64, "height": 64, "sampler_name": "Euler",
           "seed": SEED, "cfg_scale": 7, "batch_size": 1, "n_iter": 1}
#: Between two generations of one sender (leaves the 2 cores some room for the Job).
SENDER_PAUSE_S = 0.5
PROBE_EVERY_S = 1.0
#: B must serve an engine this soon after its publish, with no call but generations (the issue's "done when").
PICKUP_LIMIT_S = 30.0
#: The fleet default B runs with; the tests wait longer than this for B to have looked at the cache.
B_RESCAN_S = 10.0
JOB_TIMEOUT_S = 600.0


# ---- the replicas, started through the container's entrypoint --------------------------------------------------
class EntrypointHost(WebUIHost):
    """A WebUI started by `deploy/docker/entrypoint.sh serve` (its flags from the environment in `env`); the data
    dir is prepared by the harness as for every other test (config.json, the extension linked in)."""

    def command(self) -> list[str]:
        # WEBUI_PORT is known only at start (WebUIHost.start picks a free port, then asks for the command)
        return ["env", f"WEBUI_PORT={self.port}", "sh", str(ENTRYPOINT), "serve"]


@dataclass
class Record:
    """One generation of a sender: its txt2img and the counters around it."""

    replica: str
    t_post: float  # monotonic: just before the txt2img was posted
    t_end: float  # its answer
    statuses: list[int]  # status, txt2img, status (-1: no answer)
    engine_calls: int | None = None
    fallback_calls: int | None = None
    pixels: bytes | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(s == 200 for s in self.statuses)


class Sender(threading.Thread):
    """Keeps posting PAYLOAD to one replica until stopped."""

    def __init__(self, name: str, host: WebUIHost) -> None:
        super().__init__(name=f"sender-{name}", daemon=True)
        self.replica, self.host = name, host
        self.records: list[Record] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.records.append(self.one())
            self.halt.wait(SENDER_PAUSE_S)

    def _call(self, method: str, path: str, body: Any, statuses: list[int]) -> Any:
        try:
            status, out = self.host.request(method, path, body, timeout=300)
        except OSError as e:  # refused, reset, timed out
            statuses.append(-1)
            raise RuntimeError(f"{method} {path}: {type(e).__name__}: {e}") from e
        statuses.append(status)
        if status != 200:
            raise RuntimeError(f"{method} {path} -> {status}: {str(out)[:500]}")
        return out

    def one(self) -> Record:
        statuses: list[int] = []
        t_post = t_end = time.monotonic()
        try:
            before = self._call("GET", "/sdtrt/v1/status", None, statuses)["counters"]
            t_post = time.monotonic()
            out = self._call("POST", "/sdapi/v1/txt2img", PAYLOAD, statuses)
            t_end = time.monotonic()
            after = self._call("GET", "/sdtrt/v1/status", None, statuses)["counters"]
            pixels = png_pixels(decode_image(out["images"][0]))[3]
            return Record(self.replica, t_post, t_end, statuses, after["engine_calls"] - before["engine_calls"],
                          after["fallback_calls"] - before["fallback_calls"], pixels)
        except Exception as e:  # noqa: BLE001 - every failure is a record; the last test reports them
            return Record(self.replica, t_post, time.monotonic(), statuses, error=f"{type(e).__name__}: {e}")

    def after(self, t: float) -> list[Record]:
        return [r for r in list(self.records) if r.t_post > t]

    def wait_for(self, t: float, what: str, timeout: float, *, engine: bool = False) -> Record:
        """The first record posted after `t` (with engine calls, when `engine`); fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            for r in self.after(t):
                if not engine or (r.engine_calls or 0) > 0:
                    return r
            if time.monotonic() > deadline or not self.is_alive():
                pytest.fail(f"replica {self.replica}: no {what} within {timeout:.0f}s; "
                            f"since then: {[(r.statuses, r.engine_calls, r.error) for r in self.after(t)]}")
            time.sleep(0.1)


@dataclass
class Sample:
    replica: str
    t: float
    status: int  # -1: no answer
    body: Any


class Prober(threading.Thread):
    """GET /sdtrt/v1/ready on each replica every PROBE_EVERY_S, with no credentials (as a kubelet probes)."""

    def __init__(self, hosts: dict[str, WebUIHost]) -> None:
        super().__init__(name="ready-prober", daemon=True)
        self.hosts = hosts
        self.paused: set[str] = set()
        self.samples: list[Sample] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for name, host in self.hosts.items():
                if name in self.paused:
                    continue
                try:
                    status, body = host.request("GET", "/sdtrt/v1/ready", auth=None, timeout=30)
                except OSError as e:
                    status, body = -1, f"{type(e).__name__}: {e}"
                self.samples.append(Sample(name, time.monotonic(), status, body))
            self.halt.wait(PROBE_EVERY_S)

    def of(self, name: str) -> list[Sample]:
        return [s for s in list(self.samples) if s.replica == name]


@dataclass
class Fleet:
    install: A1111Install
    models: Path
    checkpoint: Path
    backing: Path  # what the pre-build Job writes
    mount: Path  # the read-only view the replicas serve from (SDTRT_CACHE)
    fs: Any
    auth_file: Path
    a: WebUIHost
    b: WebUIHost
    senders: dict[str, Sender]
    prober: Prober
    work: Path
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def hosts(self) -> dict[str, WebUIHost]:
        return {"A": self.a, "B": self.b}

    def engines_in_backing(self) -> list[str]:
        from sdtrt.storage.key import ENGINE_DIR_RE

        return sorted(n for n in os.listdir(self.backing) if ENGINE_DIR_RE.match(n))

    def probe(self, host: WebUIHost, what: str) -> subprocess.CompletedProcess[str]:
        env = clean_env({"WEBUI_PORT": str(host.port), "SDTRT_API_AUTH_FILE": str(self.auth_file)})
        return subprocess.run(["sh", str(PROBE), what], env=env, capture_output=True, text=True, timeout=60,
                              check=False)

    def start_job(self, name: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
        """The pre-build Job: `entrypoint.sh prebuild` with the plan, writing into the backing folder."""
        plan = self.work / "plan.json"
        plan.write_text(json.dumps({"builds": [{"checkpoint": f"Stable-diffusion/{self.checkpoint.name}",
                                                "profiles": [PROFILE], "backend": "onnxruntime"}]}))
        env = clean_env({"WEBUI_DIR": str(self.install.root), "WEBUI_PYTHON": str(self.install.python),
                         "MODELS_DIR": str(self.models), "SDTRT_CACHE": str(self.backing),
                         "SDTRT_PREBUILD_PLAN": str(plan), "WEBUI_DRY_RUN": "0"})
        out, err = self.work / f"{name}.out", self.work / f"{name}.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(["sh", str(ENTRYPOINT), "prebuild"], cwd=str(self.work), env=env, stdout=o,
                                    stderr=e, stdin=subprocess.DEVNULL, start_new_session=True)
        return proc, out, err

    def ready(self, host: WebUIHost) -> tuple[int, Any]:
        return host.request("GET", "/sdtrt/v1/ready", auth=None, timeout=60)


def replica_env(fleet_env: dict[str, str], data_dir: Path, *, require_engine: bool) -> dict[str, str]:
    return {**fleet_env, "SDTRT_REQUIRE_ENGINE": "1" if require_engine else "",
            "WEBUI_EXTRA_ARGS": f"{CPU_ARGS} --data-dir {data_dir}"}


@pytest.fixture(scope="module")
def fleet(a1111_install: A1111Install, tiny_webui_checkpoint: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("fleet")
    if any(c.isspace() for c in str(work)):
        pytest.skip(f"the temp folder {work} has white space: WEBUI_EXTRA_ARGS is split on it")
    # MODELS_DIR as the image mounts it: Stable-diffusion/ holds the checkpoint (the session's tiny model)
    models = work / "models"
    models.mkdir()
    (models / "Stable-diffusion").symlink_to(tiny_webui_checkpoint.parent, target_is_directory=True)
    checkpoint = models / "Stable-diffusion" / tiny_webui_checkpoint.name
    auth_file = work / "api-auth"
    auth_file.write_text(f"{USER}:{PASSWORD}\n")
    backing, mount = work / "engines", work / "engines-ro"
    config = {**DEFAULT_CONFIG, "sdtrt_enabled": True, "sdtrt_fallback": "pytorch", "sdtrt_backend": "auto"}
    with contextlib.ExitStack() as stack:
        fs = stack.enter_context(mounted(backing, mount, read_only=True))
        fleet_env = {"WEBUI_DIR": str(a1111_install.root), "WEBUI_PYTHON": str(a1111_install.python),
                     "MODELS_DIR": str(models), "WEBUI_CKPT": checkpoint.name, "WEBUI_UI": "0",
                     "SDTRT_CACHE": str(mount), "SDTRT_API_AUTH_FILE": str(auth_file), "SDTRT_BUILDS": "off",
                     "SDTRT_RESCAN_S": "", "WEBUI_DRY_RUN": "0"}
        hosts = {}
        for name, require in (("A", True), ("B", False)):
            data_dir = work / f"replica-{name.lower()}"
            hosts[name] = EntrypointHost(a1111_install, data_dir, checkpoint=checkpoint, config=config,
                                         auth=(USER, PASSWORD),
                                         env=replica_env(fleet_env, data_dir, require_engine=require))
        for host in hosts.values():
            _HOSTS.append(host)
            stack.callback(lambda h=host: (h.stop(), h in _HOSTS and _HOSTS.remove(h)))
        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:  # both start at once (~1 min each on 2 cores)
            for f in [pool.submit(h.start) for h in hosts.values()]:
                f.result()
        started = time.monotonic() - t0
        senders = {name: Sender(name, host) for name, host in hosts.items()}
        prober = Prober(hosts)
        fl = Fleet(a1111_install, models, checkpoint, backing, mount, fs, auth_file, hosts["A"], hosts["B"],
                   senders, prober, work)
        fl.figures["start_s"] = {name: round(h.start_seconds or 0, 1) for name, h in hosts.items()}
        fl.figures["both_started_s"] = round(started, 1)
        print(f"replicas started through entrypoint.sh serve in {started:.1f}s "
              f"(A {hosts['A'].start_seconds:.1f}s, B {hosts['B'].start_seconds:.1f}s)")
        for thread in (*senders.values(), prober):
            thread.start()

        def halt() -> None:
            for thread in (*senders.values(), prober):
                thread.halt.set()
            for thread in (*senders.values(), prober):
                thread.join(timeout=330)

        stack.callback(halt)
        yield fl


# ---- tests, in order ---------------------------------------------------------------------------------------------
def test_entrypoint_started_both_replicas_in_fleet_mode(fleet: Fleet) -> None:
    for name, host in fleet.hosts.items():
        log = host.log_text_since_start()
        assert f"{ENTRYPOINT} serve" in log, name
        # A1111 prints its arguments ("Launching API server with arguments: ..." with --nowebui)
        launched = next(line for line in log.splitlines() if line.startswith("Launching ") and "arguments:" in line)
        for flag in ("--nowebui", "--listen", "--ckpt-dir", "--data-dir", "--use-cpu"):
            assert flag in launched, (name, flag, launched)
        # the credentials come from the file through the extension's preload.py: never on the command line or logged
        assert "--api-auth" not in launched and PASSWORD not in log, name
        status = host.get("/sdtrt/v1/status")
        assert status["cache_dir"] == str(fleet.mount), (name, status["cache_dir"])  # SDTRT_CACHE, read-only
        assert not host.extension_errors(), (name, host.extension_errors())
        # --api-auth from SDTRT_API_AUTH_FILE: no credentials, no answer (A1111's routes and ours)
        assert host.request("GET", "/sdtrt/v1/status", auth=None)[0] == 401, name
        assert host.request("GET", "/sdapi/v1/memory", auth=None)[0] == 401, name
        live = fleet.probe(host, "live")
        assert live.returncode == 0, (name, live.stderr)
    assert fleet.ready(fleet.a)[1]["require_engine"] is True and fleet.ready(fleet.a)[1]["builds"] is False
    assert fleet.ready(fleet.b)[1]["require_engine"] is False and fleet.ready(fleet.b)[1]["builds"] is False


def test_builds_answer_409_on_both_replicas_and_nothing_is_written(fleet: Fleet) -> None:
    body = {"checkpoint": fleet.checkpoint.stem, "profiles": [PROFILE], "backend": "onnxruntime"}
    for name, host in fleet.hosts.items():
        status, answer = host.request("POST", "/sdtrt/v1/engines", body)
        assert status == 409, (name, status, answer)
        assert answer["error"] == "BuildsOff" and "pre-build Job" in answer["detail"], (name, answer)
        assert host.get("/sdtrt/v1/status")["building"] == [], name
    assert os.listdir(fleet.backing) == [], "a replica with SDTRT_BUILDS=off wrote into the cache"
    print("builds refused with 409 on A and B; the cache is still empty")


def test_before_any_engine_a_is_not_ready_and_b_is_ready_on_pytorch(fleet: Fleet) -> None:
    for sender in fleet.senders.values():
        first = sender.wait_for(0.0, "generation", 300)
        assert first.ok and first.engine_calls == 0 and first.fallback_calls == 0, first
    status, body = fleet.ready(fleet.a)
    assert status == 503 and body["ready"] is False and body["serving"] == "pytorch", body
    assert any("no engine" in r for r in body["reasons"]), body
    probe = fleet.probe(fleet.a, "ready")
    assert probe.returncode == 1 and "503" in probe.stderr, (probe.returncode, probe.stderr)
    status, body = fleet.ready(fleet.b)
    assert status == 200 and body["ready"] is True and body["serving"] == "pytorch" and body["reasons"] == [], body
    probe = fleet.probe(fleet.b, "ready")
    assert probe.returncode == 0, probe.stderr
    print(f"before the Job: A /ready 503 ({body['checkpoint']}), probe.sh ready rc {probe.returncode} on B")


def test_a_build_job_killed_mid_export_leaves_nothing_listed_or_loaded(fleet: Fleet) -> None:
    t0 = time.monotonic()
    proc, out, err = fleet.start_job("job-killed")
    exporting = None
    deadline = t0 + JOB_TIMEOUT_S
    while exporting is None:
        tmp = [p for p in fleet.backing.glob(".tmp-*") if (p / "onnx").is_dir()]
        if tmp:
            exporting = tmp[0]
            break
        if proc.poll() is not None:
            pytest.fail(f"the Job ended (rc {proc.returncode}) before its export could be caught: "
                        f"{out.read_text()}\n{err.read_text()[-3000:]}")
        assert time.monotonic() < deadline, "the Job never began its export"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the Job's pod is OOM-killed / evicted mid-way
    assert proc.wait(timeout=60) == -signal.SIGKILL
    t_kill = time.monotonic()
    left = sorted(os.listdir(fleet.backing))
    print(f"Job killed {t_kill - t0:.1f}s after its start, during its export; the cache holds {left} "
          f"({sum(f.stat().st_size for f in fleet.backing.rglob('*') if f.is_file())} bytes)")
    assert fleet.engines_in_backing() == [], f"an engine was published before the kill: {left}"
    assert any(n.startswith(".tmp-") for n in left), left  # the kill really left a half-built engine behind

    status, answer = fleet.a.request("POST", "/sdtrt/v1/rescan", {})
    assert status == 200 and answer["engines"] == [], answer
    # B is sent no call: its generations look at the cache at most every SDTRT_RESCAN_S; after that long, one has
    fleet.senders["B"].wait_for(t_kill + B_RESCAN_S + 2, "generation", 120)
    for name, host in fleet.hosts.items():
        assert host.get("/sdtrt/v1/engines")["engines"] == [], name
        status_report = host.get("/sdtrt/v1/status")
        assert status_report["active"] is None, (name, status_report["active"])
        done = fleet.senders[name].after(t_kill)
        assert done and all(r.ok and r.engine_calls == 0 for r in done), \
            (name, [(r.statuses, r.engine_calls, r.error) for r in done])
    status, body = fleet.ready(fleet.a)
    assert status == 503 and body["loaded"] is False and body["engine"] is None, body
    status, body = fleet.ready(fleet.b)
    assert status == 200 and body["serving"] == "pytorch", body


def test_published_engine_is_served_by_a_after_rescan_and_by_b_within_30s(fleet: Fleet) -> None:
    fleet.prober.paused.add("B")  # in B's pickup window only its generations may make it look at the cache
    try:
        t0 = time.monotonic()
        proc, out, err = fleet.start_job("job")
        t_pub = None
        while proc.poll() is None or t_pub is None:
            if t_pub is None and any((fleet.backing / n / "manifest.json").is_file()
                                     for n in fleet.engines_in_backing()):
                t_pub = time.monotonic()
            if proc.poll() is not None and t_pub is None:
                break
            assert time.monotonic() < t0 + JOB_TIMEOUT_S, "the Job did not finish"
            time.sleep(0.02)
        rc = proc.wait()
        assert rc == 0, f"the Job failed (rc {rc}): {out.read_text()}\n{err.read_text()[-3000:]}"
        assert t_pub is not None
        job = json.loads(out.read_text())
        assert job["built"] == 1 and job["failed"] == 0, job
        engine_id = job["builds"][0]["id"]
        assert fleet.engines_in_backing() == [engine_id]
        print(f"after the Job the cache holds {sorted(os.listdir(fleet.backing))}")
        fleet.figures["job_s"] = round(time.monotonic() - t0, 1)

        # A: a rescan at once (what a deploy hook would post), then the next generation is on the engine
        status, answer = fleet.a.request("POST", "/sdtrt/v1/rescan", {})
        t_rescan = time.monotonic()
        assert status == 200 and engine_id in answer["engines"], answer
        first_a = fleet.senders["A"].wait_for(t_rescan, "generation", 300)
        assert first_a.ok and first_a.engine_calls == STEPS and first_a.fallback_calls == 0, first_a
        first_a_engine = fleet.senders["A"].wait_for(t_pub, "engine generation", 300, engine=True)

        # B: no call but its generations; it must serve the engine within 30 s of the publish
        first_b = fleet.senders["B"].wait_for(t_pub, "engine generation", PICKUP_LIMIT_S + 60, engine=True)
        b_s = first_b.t_end - t_pub
        fleet.figures.update(a_first_engine_s=round(first_a_engine.t_end - t_pub, 2),
                             a_rescan_after_publish_s=round(t_rescan - t_pub, 2), b_first_engine_s=round(b_s, 2))
        print(f"engine {engine_id} published {t_pub - t0:.1f}s into the Job (Job {fleet.figures['job_s']}s); "
              f"first engine generation: A {first_a_engine.t_end - t_pub:.2f}s after the publish (rescan posted "
              f"{t_rescan - t_pub:.2f}s after it), B {b_s:.2f}s after it (posted {first_b.t_post - t_pub:.2f}s)")
        assert b_s <= PICKUP_LIMIT_S, f"B served its first engine call {b_s:.1f}s after the publish"
    finally:
        fleet.prober.paused.discard("B")

    # A's readiness flips; probe.sh agrees
    deadline = time.monotonic() + 120
    while not [s for s in fleet.prober.of("A") if s.t > t_pub and s.status == 200]:
        assert time.monotonic() < deadline, f"A never became ready: {fleet.prober.of('A')[-3:]}"
        time.sleep(0.2)
    flip = min(s.t for s in fleet.prober.of("A") if s.t > t_pub and s.status == 200)
    fleet.figures["a_ready_flip_s"] = round(flip - t_pub, 2)
    assert all(s.status == 503 for s in fleet.prober.of("A") if s.t < t_pub), "A was ready before its engine"
    b_before = [s for s in fleet.prober.of("B") if s.t < t_pub]
    assert b_before and all(s.status == 200 and s.body["serving"] == "pytorch" for s in b_before), b_before
    status, body = fleet.ready(fleet.a)
    assert status == 200 and body["loaded"] is True and body["engine"] == engine_id and body["reasons"] == [], body
    probe = fleet.probe(fleet.a, "ready")
    assert probe.returncode == 0, probe.stderr
    status, body = fleet.ready(fleet.b)
    assert status == 200 and body["serving"] == "engine" and body["engine"] == engine_id, body
    print(f"A /ready flipped to 200 {flip - t_pub:.2f}s after the publish; probe.sh ready rc 0")

    for name, host in fleet.hosts.items():
        rows = host.get("/sdtrt/v1/engines")["engines"]
        assert [(r["id"], r["ok"]) for r in rows] == [(engine_id, True)], (name, rows)
        assert host.get("/sdtrt/v1/status")["active"]["engines"] == [engine_id], name
        # never half a generation on the engine: all of its calls, or none before the pickup
        calls = [(r.engine_calls, r.fallback_calls) for r in fleet.senders[name].records if r.ok]
        assert set(calls) <= {(0, 0), (STEPS, 0)}, (name, calls)
    for name, first in (("A", first_a_engine), ("B", first_b)):
        later = fleet.senders[name].after(first.t_post)
        assert all(r.ok and r.engine_calls == STEPS for r in later), \
            (name, [(r.statuses, r.engine_calls, r.error) for r in later])
        before = [r for r in fleet.senders[name].records if r.t_post < t_pub]
        assert all(r.engine_calls == 0 for r in before if r.ok), name
    fleet.figures["engine_id"] = engine_id


def test_engine_images_equal_pytorch(fleet: Fleet) -> None:
    torch_images = [r.pixels for s in fleet.senders.values() for r in s.records if r.ok and r.engine_calls == 0]
    engine_images = [r.pixels for s in fleet.senders.values() for r in s.records if r.ok and r.engine_calls]
    assert torch_images and engine_images
    reference = torch_images[0]
    assert reference is not None and len(set(reference)) > 8, "constant image"
    assert all(p == reference for p in torch_images), "PyTorch images differ between generations or replicas"
    worst, frac = 0, 0.0
    for pixels in engine_images:
        assert pixels is not None
        w, f = compare(reference, pixels)
        worst, frac = max(worst, w), max(frac, f)
    fleet.figures.update(engine_vs_pytorch_max_diff=worst, engine_vs_pytorch_differing=round(frac, 5),
                         engine_images_identical=len(set(engine_images)) == 1)
    print(f"{len(engine_images)} engine images vs PyTorch's: max 8-bit diff {worst}, differing values {frac:.4%}; "
          f"{len(torch_images)} PyTorch images identical")
    assert worst <= MAX_8BIT_DIFF and frac <= MAX_DIFFERING_FRACTION, (worst, frac)


def test_no_request_failed_during_the_whole_test(fleet: Fleet) -> None:
    fleet.senders["A"].wait_for(time.monotonic(), "generation", 300)  # one more each, after everything above
    fleet.senders["B"].wait_for(time.monotonic(), "generation", 300)
    for thread in (*fleet.senders.values(), fleet.prober):
        thread.halt.set()
    for thread in (*fleet.senders.values(), fleet.prober):
        thread.join(timeout=330)
        assert not thread.is_alive(), thread.name
    per_replica = {}
    failures = []
    for name, sender in fleet.senders.items():
        recs = sender.records
        bad = [r for r in recs if not r.ok]
        failures += [(name, r.statuses, r.error) for r in bad]
        per_replica[name] = {"txt2img": len(recs), "failed": len(bad),
                             "on_engine": sum(1 for r in recs if r.ok and r.engine_calls),
                             "http_requests": sum(len(r.statuses) for r in recs)}
    probes = {name: {"probes": len(fleet.prober.of(name)),
                     "no_answer": sum(1 for s in fleet.prober.of(name) if s.status not in (200, 503))}
              for name in fleet.hosts}
    # The replicas never tried to change the read-only cache: a write of ours is refused, and the file system's
    # figures (written when it counts such a refusal) show it was the only one; the engine was read through it.
    with pytest.raises(OSError) as refused:
        (fleet.mount / "written-by-the-test").write_bytes(b"x")
    assert refused.value.errno == errno.EROFS, refused.value
    fs_stats = fleet.fs.stats()
    fleet.figures.update(requests=per_replica, ready_probes=probes, faultfs=fs_stats)
    print("fleet figures: " + json.dumps(fleet.figures, indent=1))
    assert not failures, failures
    assert all(p["no_answer"] == 0 for p in probes.values()), probes
    assert fs_stats["refused_read_only"] == 1 and fs_stats["writes"] == 0, fs_stats
    assert fs_stats["reads"] > 0, fs_stats
    assert all(v["txt2img"] > 0 and v["on_engine"] > 0 for v in per_replica.values()), per_replica
    # B's probes answered 200 all along (in its pickup window it was not probed)
    assert all(s.status == 200 for s in fleet.prober.of("B")), [s for s in fleet.prober.of("B") if s.status != 200]
