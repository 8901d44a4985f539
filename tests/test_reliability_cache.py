"""The engine cache under faults, with figures (at the registry level).

Every test uses a fake `produce` that writes bytes (tests/reliability_cache_harness.py), so no backend or GPU is
involved. Processes are forked from this pre-imported test process, so a trial costs milliseconds. With
SDTRT_LONG=1 (CI) the full trial counts run: one engine per key, 200 + 50 trials of 4 processes x 8 threads; crash
safety, 500 SIGKILLs; I/O faults, every injectable call site of a build with every errno; without it, small counts.
Each of these tests prints a
`FIGURE` line (and appends it to $SDTRT_FIGURES when set).
"""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import stat
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from reliability_cache_harness import (
    LEASE_S,
    LONG,
    PLAN_BYTES,
    SOURCE,
    Injector,
    audit,
    make_key,
    make_produce,
    plan_bytes,
    plan_is_whole,
    read_only,
    report_figure,
    trials,
    where,
)
from sdtrt.backends.base import BackendInfo, BuildResult
from sdtrt.errors import BuildError, CacheNotWritable, EngineNotFound, ManifestError, SdtrtError, StaleEngine
from sdtrt.fsutil import FileLock
from sdtrt.storage.lease import Heartbeat, Liveness
from sdtrt.storage.manifest import Manifest
from sdtrt.storage.registry import Registry

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:  # pragma: no cover - hypothesis is a test extra
    HAVE_HYPOTHESIS = False

CTX = mp.get_context("fork")
KEY = make_key()
EID = KEY.engine_id()
OTHER = make_key(family="sd2")
needs_proc_fd = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="fault injection maps fds via /proc")


def _noop_lock(fd: int, op: int, *args: Any) -> None:
    """flock as on Lustre/GPFS/some NFS mounts: 'silently succeeds for every caller'."""


def _silence_lock() -> None:
    fcntl.flock = _noop_lock  # type: ignore[assignment]
    fcntl.lockf = _noop_lock  # type: ignore[assignment]


# ==== one engine per key: many processes and threads ============================================================


def _g1_process(cache: str, noop_lock: bool, barrier: Any, counter: str, out: Any, threads: int) -> None:
    try:
        if noop_lock:
            _silence_lock()
        reg = Registry(cache, lease_s=LEASE_S)
        produce = make_produce(counter=Path(counter), sleep=0.005)
        gate = threading.Barrier(threads)
        results: list[tuple[str, str]] = []

        def worker() -> None:
            try:
                gate.wait(10)
                results.append(("ok", reg.build(KEY, SOURCE, produce, lock_timeout=30).to_json()))
            except BaseException as e:  # noqa: BLE001 - every outcome goes to the parent
                results.append(("error", repr(e)))

        barrier.wait(timeout=30)
        workers = [threading.Thread(target=worker) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        out.put(results)
    except BaseException as e:  # noqa: BLE001
        out.put([("error", f"process: {e!r}")])


@pytest.mark.timeout(330)
def test_many_processes_and_threads_publish_exactly_one_engine(tmp_path: Path, capsys: Any) -> None:
    procs, threads = 4, 8
    locked, noop = trials(200, 12), trials(50, 4)
    barrier, out = CTX.Barrier(procs), CTX.Queue()
    stats: dict[str, Any] = {"locked": Counter(), "noop": Counter()}
    bad: list[str] = []
    t0 = time.monotonic()
    for trial in range(locked + noop):
        mode = "locked" if trial < locked else "noop"
        cache, counter = tmp_path / f"cache{trial}", tmp_path / f"calls{trial}"
        counter.touch()
        ps = [
            CTX.Process(target=_g1_process, args=(str(cache), mode == "noop", barrier, str(counter), out, threads))
            for _ in range(procs)
        ]
        for p in ps:
            p.start()
        results = [r for _ in ps for r in out.get(timeout=90)]
        for p in ps:
            p.join(30)
        builds = len(counter.read_text().split())
        a = audit(cache)
        manifests = {text for kind, text in results if kind == "ok"}
        errors = [text for kind, text in results if kind != "ok"]
        s = stats[mode]
        s["trials"] += 1
        s["builds"] += builds
        s["at_most_one_build"] += builds <= 1
        s["raced"] += builds >= 2
        s["corrupt_plans"] += len(a.partial)
        s["unparsable_manifests"] += len(a.unreadable_manifests)
        s["engines_not_exactly_one"] += a.engines != [EID]
        s["callers_disagreeing"] += len(manifests) != 1
        s["errors"] += len(errors)
        s["temps_left"] += len(a.temps)
        s["quarantined"] += len(a.quarantined)
        if errors or len(results) != procs * threads or a.engines != [EID] or len(manifests) != 1 or a.partial:
            bad.append(f"trial {trial} ({mode}): {builds} builds, {a}, errors {errors[:3]}")
        elif Registry(cache).verify(EID).to_json() != next(iter(manifests)):
            bad.append(f"trial {trial}: callers got a manifest that is not the published one")
        shutil.rmtree(cache)
    wall = time.monotonic() - t0
    figures = {mode: {k: int(v) for k, v in sorted(s.items())} for mode, s in stats.items()} | {
        "processes": procs,
        "threads": threads,
        "wall_s": round(wall, 1),
    }
    figures["locked_at_most_one_build_pct"] = round(100 * stats["locked"]["at_most_one_build"] / locked, 1)
    report_figure(capsys, "one engine per key", **figures)
    assert bad == [], bad[:5]
    for mode in ("locked", "noop"):
        s = stats[mode]
        assert s["corrupt_plans"] == s["unparsable_manifests"] == s["engines_not_exactly_one"] == 0
        assert s["errors"] == s["temps_left"] == s["quarantined"] == s["callers_disagreeing"] == 0
    assert stats["locked"]["at_most_one_build"] >= 0.95 * locked
    # The no-op lock really let builds race (else these trials would show nothing): one rename still won.
    assert stats["noop"]["raced"] >= noop / 2, stats["noop"]


# ==== crash safety: SIGKILL at random points ==================================================================


def _g2_child(cache: str, kill_at: int | None, note: str, noop_lock: bool, chunks: int, pause: float) -> None:
    """Build; with kill_at > 0 SIGKILL ourselves at the kill_at-th profiler event (a call or return of sdtrt or the
    fake backend, or a C call they make: any point of the build), writing where it was to `note` first; with
    kill_at == 0 write the phase of every event to `note` instead (the calibration kill points are drawn from)."""
    if noop_lock:
        _silence_lock()
    reg = Registry(cache, lease_s=LEASE_S)
    produce = make_produce(chunks=chunks, pause=pause)
    events = 0
    seen: list[str] = []
    ours: dict[str, bool] = {}

    def profiler(frame: Any, event: str, arg: Any) -> None:
        nonlocal events
        file = frame.f_code.co_filename
        if file not in ours:
            ours[file] = os.sep + "sdtrt" + os.sep in file or file.endswith("reliability_cache_harness.py")
        if not ours[file]:  # only our code's calls and returns and the C calls it makes (os.write, rename...):
            return  # library internals (thread start-up waits) vary run to run and would shift the points
        events += 1
        if kill_at == 0:
            seen.append(_stratum(where(frame)))
        elif kill_at and events >= kill_at:
            fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, where(frame).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)

    if kill_at is not None:
        sys.setprofile(profiler)
    reg.build(KEY, SOURCE, produce, lock_timeout=30)
    sys.setprofile(None)
    if kill_at == 0:
        Path(note).write_text("\n".join(seen))


def _stratum(chain: str) -> str:
    """'Publisher.build > Publisher._build_new > atomic_write_bytes > write_all > x' -> the first four names."""
    return " > ".join(p.rsplit(".", 1)[-1] for p in chain.split(" > ")[:4])


def _phase(chain: str) -> str:
    """'Publisher.build > Publisher._build_new > Publisher._seal > sha256_and_size' -> '_build_new > _seal'."""
    return " > ".join(_stratum(chain).split(" > ")[1:3]) or "build"


@pytest.mark.timeout(330)
def test_sigkill_at_random_points_never_exposes_partial_state(tmp_path: Path, capsys: Any) -> None:
    total = trials(500, 40)
    rng = random.Random(20260611)
    chunks, pause = 6, 0.002
    note = str(tmp_path / "note")
    # Calibrate: the phase of every profiler event of one build, and an unkilled child's lifetime (for timers).
    # Kill points are stratified: a phase (the first four functions down from Publisher.build) is drawn uniformly,
    # then an event inside it, so the few events of publishing get as many kills as the many of JSON encoding.
    calib = tmp_path / "calib"
    p = CTX.Process(target=_g2_child, args=(str(calib), 0, note, False, chunks, pause))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    event_phases = Path(note).read_text().split("\n")
    events = len(event_phases)
    strata: dict[str, list[int]] = {}
    for i, phase in enumerate(event_phases):
        strata.setdefault(phase, []).append(i + 1)
    shutil.rmtree(calib)
    lifetimes = []
    for _ in range(5):
        t = time.monotonic()
        p = CTX.Process(target=_g2_child, args=(str(calib), None, note, False, chunks, pause))
        p.start()
        p.join(30)
        lifetimes.append(time.monotonic() - t)
        shutil.rmtree(calib)
    lifetime = statistics.median(lifetimes)

    c: Counter[str] = Counter()
    phases: Counter[str] = Counter()
    strata_hit: set[str] = set()
    reclaim: list[float] = []
    bad: list[str] = []
    t0 = time.monotonic()
    attempt = 0
    while c["kills"] < total and attempt < 3 * total:
        attempt += 1
        cache = tmp_path / f"c{attempt}"
        point = attempt % 5 != 0  # 4 in 5 kills at a profiler point, 1 in 5 from a timer (lands mid-syscall too)
        noop_lock = attempt % 7 == 0
        kill_at = rng.choice(strata[rng.choice(sorted(strata))]) if point else None
        if os.path.exists(note):
            os.unlink(note)
        child = CTX.Process(target=_g2_child, args=(str(cache), kill_at, note, noop_lock, chunks, pause))
        child.start()
        if not point:
            time.sleep(rng.uniform(0, lifetime))
            try:
                os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            except ProcessLookupError:
                pass
        child.join(30)
        if child.exitcode != -signal.SIGKILL:
            c["finished_before_kill"] += 1
            shutil.rmtree(cache, ignore_errors=True)
            continue
        c["kills"] += 1
        c["point_kills" if point else "timer_kills"] += 1
        if point:
            chain = Path(note).read_text() if os.path.exists(note) else "?"
            phases[_phase(chain)] += 1
            strata_hit.add(_stratum(chain))
        before = audit(cache)
        c["visible_partial"] += len(before.partial)
        c["unreadable_manifests"] += len(before.unreadable_manifests)
        c["orphan_temps_seen"] += len(before.temps)
        c["killed_after_publish"] += before.engines == [EID]
        c["unexpected_entries"] += len(before.other) + len(before.quarantined) + (before.engines not in ([], [EID]))
        # Restart: a new build recovers, at once (the dead holder's flock went with it), within the lease.
        t = time.monotonic()
        try:
            reg = Registry(cache, lease_s=LEASE_S)
            m = reg.build(KEY, SOURCE, make_produce(), lock_timeout=30)
            reclaim.append(time.monotonic() - t)
            recovered = reg.verify(EID) == m and plan_is_whole((cache / EID / "unet.plan").read_bytes())
        except SdtrtError as e:
            recovered = False
            bad.append(f"kill {c['kills']}: restart failed: {e}")
        c["recovered"] += recovered
        removed = reg.cleanup(max_age_s=0)  # one pass
        after = audit(cache)
        c["temps_after_one_cleanup"] += len(after.temps)
        c["removed_by_cleanup"] += len(removed)
        if before.partial or before.unreadable_manifests or after.temps or not recovered or after.engines != [EID]:
            bad.append(f"kill {c['kills']} ({'point ' + str(kill_at) if point else 'timer'}): {before} -> {after}")
        shutil.rmtree(cache)
    wall = time.monotonic() - t0
    report_figure(
        capsys,
        "crash safety",
        **dict(sorted(c.items())),
        max_restart_s=round(max(reclaim), 3),
        lease_s=LEASE_S,
        profiler_events_per_build=events,
        strata=len(strata),
        strata_hit=len(strata_hit & set(strata)),
        phases=dict(phases.most_common()),
        wall_s=round(wall, 1),
    )
    assert c["kills"] == total, c
    assert bad == [], bad[:5]
    assert c["visible_partial"] == c["unreadable_manifests"] == c["unexpected_entries"] == 0
    assert c["recovered"] == total and c["temps_after_one_cleanup"] == 0
    assert max(reclaim) < LEASE_S
    assert c["orphan_temps_seen"] > 0 and c["removed_by_cleanup"] >= c["orphan_temps_seen"]
    # The kills really spread over the build: inside the backend, sealing, writing the manifest and publishing.
    if LONG:
        hit = " ".join(phases)
        assert all(phase in hit for phase in ("produce", "_seal", "atomic_write_bytes", "_publish")), phases
        assert len(strata_hit & set(strata)) >= 0.9 * len(strata), sorted(set(strata) - strata_hit)


# ---- a lock whose holder is gone, hung, or never locked ----------------------------------------------


def _slow_holder(cache: str, started: Any, sleep: float, counter: str, skew_s: float = 0.0) -> None:
    if skew_s:  # this host's clock is off: its heartbeats are stamped with skewed times
        real_utime = os.utime

        def skewed_utime(path: Any, times: Any = None, **kw: Any) -> None:
            t = time.time() + skew_s
            real_utime(path, (t, t), **kw)

        os.utime = skewed_utime  # type: ignore[assignment]
    produce = make_produce(counter=Path(counter), sleep=sleep, on_start=started.set)
    Registry(cache, lease_s=LEASE_S).build(KEY, SOURCE, produce, lock_timeout=60)


@pytest.mark.timeout(60)
def test_lock_of_a_hung_holder_is_taken_over_after_one_lease(tmp_path: Path) -> None:
    """A SIGSTOPped holder keeps its flock (as a dead NFS client's lock lingers) and stops beating: the waiter
    builds after one lease, not after lock_timeout; when the holder resumes, it uses the waiter's engine."""
    cache, counter = tmp_path / "cache", tmp_path / "calls"
    started = CTX.Event()
    holder = CTX.Process(target=_slow_holder, args=(str(cache), started, 3.0, str(counter)))
    holder.start()
    assert started.wait(20)
    os.kill(holder.pid, signal.SIGSTOP)  # type: ignore[arg-type]
    try:
        held = FileLock(Registry(cache).lock_path(EID))
        assert not held.acquire(0)  # the lock really is still held
        phases: list[str] = []
        t0 = time.monotonic()
        m = Registry(cache, lease_s=LEASE_S).build(
            KEY, SOURCE, make_produce(counter=counter), lock_timeout=60, progress=lambda ph, f: phases.append(ph)
        )
        waited = time.monotonic() - t0
    finally:
        os.kill(holder.pid, signal.SIGCONT)  # type: ignore[arg-type]
    holder.join(30)
    assert holder.exitcode == 0
    assert LEASE_S * 0.9 <= waited <= LEASE_S + 2.0, waited  # bounded by one lease, not by lock_timeout (60 s)
    assert any("no heartbeat" in ph for ph in phases)
    assert len(counter.read_text().split()) == 2  # both built; the holder's publish lost and used ours
    a = audit(cache)
    assert a.engines == [EID] and not a.partial and not a.temps
    assert Registry(cache).verify(EID) == m


@pytest.mark.timeout(60)
@pytest.mark.parametrize("skew_s", [0.0, -86400.0, 86400.0], ids=["no-skew", "holder-behind-1d", "holder-ahead-1d"])
def test_live_holder_is_never_doubled_even_with_clock_skew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, skew_s: float
) -> None:
    """Row 17: a build that beats is waited for, however long it takes past the lease, whatever the clocks say:
    the holder stamps its heartbeats a day off, and the waiter's own wall clock is a day off the other way."""
    cache, counter = tmp_path / "cache", tmp_path / "calls"
    started = CTX.Event()
    build_s = 2.5 * LEASE_S
    holder = CTX.Process(target=_slow_holder, args=(str(cache), started, build_s, str(counter), skew_s))
    holder.start()
    assert started.wait(20)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - (skew_s or 3600.0))
    t0 = time.monotonic()
    m = Registry(cache, lease_s=LEASE_S).build(KEY, SOURCE, make_produce(counter=counter), lock_timeout=60)
    waited = time.monotonic() - t0
    monkeypatch.undo()
    holder.join(30)
    assert holder.exitcode == 0
    assert len(counter.read_text().split()) == 1  # only the holder built: no second holder
    assert waited >= build_s - 1.0
    assert Registry(cache).verify(EID) == m and audit(cache).temps == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["flock-noop", "flock-unsupported"])
def test_without_working_flock_nothing_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """No lock to reclaim where flock is a no-op or unsupported: a second builder starts at once (duplicate work,
    one engine) and never waits for a holder that is stopped."""
    cache, counter = tmp_path / "cache", tmp_path / "calls"
    started = CTX.Event()
    holder = CTX.Process(target=_slow_holder, args=(str(cache), started, 30.0, str(counter)))
    holder.start()
    assert started.wait(20)
    os.kill(holder.pid, signal.SIGSTOP)  # type: ignore[arg-type]
    try:
        if mode == "flock-noop":
            monkeypatch.setattr(fcntl, "flock", _noop_lock)
        else:

            def unsupported(fd: int, op: int) -> None:
                raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

            monkeypatch.setattr(fcntl, "flock", unsupported)
        t0 = time.monotonic()
        m = Registry(cache, lease_s=LEASE_S).build(KEY, SOURCE, make_produce(counter=counter), lock_timeout=60)
        assert time.monotonic() - t0 < 1.0
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
        holder.join(10)
    reg = Registry(cache)
    assert reg.verify(EID) == m
    assert len(reg.cleanup(max_age_s=0)) == 1 and audit(cache).temps == []


@pytest.mark.timeout(60)
def test_lookups_never_take_the_build_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """While another process holds the lock of an engine it builds, every lookup a request
    thread makes (get, status, verify, list, writable, build of an engine that exists) returns within 1 s and
    never touches a lock."""
    cache, counter = tmp_path / "cache", tmp_path / "calls"
    reg = Registry(cache, lease_s=LEASE_S)
    ready = reg.build(OTHER, SOURCE, make_produce())
    started = CTX.Event()
    holder = CTX.Process(target=_slow_holder, args=(str(cache), started, 30.0, str(counter)))
    holder.start()
    assert started.wait(20)
    acquires: list[str] = []
    real_acquire = FileLock.acquire

    def spy(self: FileLock, *args: Any, **kwargs: Any) -> bool:
        acquires.append(str(self.path))
        return real_acquire(self, *args, **kwargs)

    monkeypatch.setattr(FileLock, "acquire", spy)
    latencies: list[float] = []
    errors: list[str] = []

    def lookups() -> None:
        deadline = time.monotonic() + trials(3.0, 1.5)
        while time.monotonic() < deadline:
            for call in (
                lambda: reg.get(ready.id),
                lambda: reg.status(ready.id),
                lambda: reg.verify(ready.id),
                lambda: reg.list(),
                lambda: reg.writable(),
                lambda: reg.build(OTHER, SOURCE, make_produce()),
                lambda: reg.status(EID),  # being built elsewhere: not found, at once
            ):
                t = time.monotonic()
                try:
                    call()
                except EngineNotFound:
                    pass
                except Exception as e:  # noqa: BLE001
                    errors.append(repr(e))
                latencies.append(time.monotonic() - t)

    threads = [threading.Thread(target=lookups) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        monkeypatch.undo()
        assert FileLock(reg.lock_path(EID)).acquire(0) is False  # the build lock was held all along
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
        holder.join(10)
    report_figure(
        capsys,
        "lookup-latency",
        calls=len(latencies),
        max_ms=round(1000 * max(latencies), 1),
        lock_acquires=len(acquires),
    )
    assert errors == [] and acquires == []
    assert max(latencies) < 1.0


# ==== I/O faults: injected write/fsync/rename/mkdir failures ====================================================

ERRNOS = {
    "open": (errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT),
    "write": (errno.ENOSPC, errno.EIO, errno.EDQUOT),
    "fsync": (errno.ENOSPC, errno.EIO),
    "mkdir": (errno.ENOSPC, errno.EIO, errno.EROFS, errno.EACCES),
    "rename": (errno.ENOSPC, errno.EIO, errno.EROFS),
    "replace": (errno.ENOSPC, errno.EIO),
    "link": (errno.ENOSPC, errno.EIO),
}
SCENARIOS = ("fresh", "replace-corrupt", "first-build")


def _setup(root: Path, scenario: str) -> tuple[Manifest | None, bytes | None]:
    """fresh: another engine is published; replace-corrupt: also a corrupt copy of the one to build (a bit
    flip, so build must quarantine it); first-build: the cache folder does not exist yet."""
    if scenario == "first-build":
        return None, None
    reg = Registry(root)
    old = reg.build(OTHER, SOURCE, make_produce())
    corrupt = None
    if scenario == "replace-corrupt":
        reg.build(KEY, SOURCE, make_produce())
        plan = root / EID / "unet.plan"
        raw = bytearray(plan.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        plan.write_bytes(bytes(raw))
        corrupt = bytes(raw)
    return old, corrupt


def _calls(tmp_path: Path, scenario: str) -> list[tuple[str, int, str]]:
    root = tmp_path / "calibrate"
    _setup(root, scenario)
    inj = Injector(root)
    with inj.installed():
        Registry(root).build(KEY, SOURCE, make_produce())
    shutil.rmtree(root)
    return [(c.op, c.index, c.site) for c in inj.calls]


@needs_proc_fd
@pytest.mark.timeout(300)
def test_every_injected_io_failure_fails_cleanly(tmp_path: Path, capsys: Any) -> None:
    c: Counter[str] = Counter()
    per_op: Counter[str] = Counter()
    bad: list[str] = []
    sites: set[str] = set()
    t0 = time.monotonic()
    for scenario in SCENARIOS:
        calls = _calls(tmp_path, scenario)
        for op, index, site in calls:
            errs = ERRNOS[op] if LONG or scenario == "fresh" else ERRNOS[op][:1]
            for err in errs:
                root = tmp_path / f"{scenario}-{op}{index}-{err}"
                old, corrupt = _setup(root, scenario)
                reg = Registry(root)
                inj = Injector(root, fail=(op, index), error=err)
                outcome: BaseException | None = None
                with inj.installed():
                    try:
                        reg.build(KEY, SOURCE, make_produce())
                    except BaseException as e:  # noqa: BLE001 - judged below
                        outcome = e
                what = f"{scenario} {op}#{index} {errno.errorcode[err]} at {site}"
                c["injections"] += 1
                per_op[op] += 1
                sites.add(f"{op} at {site}")
                if inj.injected is None:
                    bad.append(f"{what}: the call was not reached")
                    continue
                a = audit(root)
                published = EID in a.engines and (corrupt is None or (root / EID / "unet.plan").read_bytes() != corrupt)
                if outcome is None:
                    c["tolerated"] += 1  # only where failing is harmless by design
                    if not ("FileLock" in inj.injected.site or inj.injected.existed):
                        bad.append(f"{what}: the build succeeded although the failure was not a tolerated one")
                    if not published:
                        bad.append(f"{what}: succeeded without publishing")
                else:
                    c["failed_cleanly"] += 1
                    if not isinstance(outcome, BuildError):
                        bad.append(f"{what}: raised {outcome!r}, not a BuildError")
                    elif os.strerror(err) not in str(outcome):
                        bad.append(f"{what}: message does not name the cause: {outcome}")
                    elif (
                        err in (errno.EROFS, errno.EACCES)
                        and not published
                        and not isinstance(outcome, CacheNotWritable)
                    ):
                        bad.append(f"{what}: a read-only error should raise CacheNotWritable: {outcome!r}")
                    if published:
                        c["failed_after_publish"] += 1
                        if "published and complete" not in str(outcome):
                            bad.append(f"{what}: engine published but the error says otherwise: {outcome}")
                # Invariants whatever happened: no temp bytes, old engine loadable, nothing partial.
                c["temp_bytes"] += a.temp_bytes + len(a.temps)
                if a.temps or a.other:
                    bad.append(f"{what}: left {a.temps + a.other}")
                if old is not None and reg.verify(old.id) != old:
                    bad.append(f"{what}: the old engine changed")
                partial = [e for e in a.partial if not (e == EID and corrupt is not None)]
                if partial or a.unreadable_manifests:
                    bad.append(f"{what}: partial {partial}, unreadable {a.unreadable_manifests}")
                if (
                    corrupt is not None
                    and EID in a.engines
                    and not published
                    and ((root / EID / "unet.plan").read_bytes() != corrupt)
                ):
                    bad.append(f"{what}: the existing entry was modified in place")
                # And the next, uninjected build recovers.
                if reg.verify(reg.build(KEY, SOURCE, make_produce()).id) is None:
                    bad.append(f"{what}: no recovery")
                shutil.rmtree(root)
    wall = time.monotonic() - t0
    report_figure(
        capsys,
        "I/O faults",
        **dict(sorted(c.items())),
        per_op=dict(sorted(per_op.items())),
        call_sites=len(sites),
        wall_s=round(wall, 1),
    )
    assert bad == [], bad[:8]
    assert c["temp_bytes"] == 0
    assert {op for op in per_op} >= {"open", "write", "fsync", "mkdir", "rename", "replace"}
    assert c["failed_cleanly"] > c["tolerated"] > 0


@needs_proc_fd
@pytest.mark.timeout(60)
def test_short_writes_still_publish_whole_files(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    inj = Injector(root, short_writes=True)
    with inj.installed():
        m = Registry(root).build(KEY, SOURCE, make_produce())
    assert sum(1 for call in inj.calls if call.op == "write") > 10  # every write was cut short and continued
    assert Registry(root).verify(m.id) == m and audit(root).partial == []


def test_real_disk_full_from_dev_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from the kernel (/dev/full, man 4 full): once in the backend's plan write, once in the manifest's."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    root = tmp_path / "cache"
    reg = Registry(root)
    old = reg.build(OTHER, SOURCE, make_produce())

    def produce(out: Path) -> BuildResult:
        os.symlink("/dev/full", out / "unet.plan")
        with open(out / "unet.plan", "wb") as f:
            f.write(plan_bytes(os.urandom(16)))
        return BuildResult(["unet.plan"], "stripped", "refit")

    with pytest.raises(BuildError, match="No space left on device.*disk holding the engine cache .* is full"):
        reg.build(KEY, SOURCE, produce)
    assert audit(root).temps == [] and reg.verify(old.id) == old and EID not in audit(root).engines

    import tempfile

    real_mkstemp = tempfile.mkstemp

    def full_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, path = real_mkstemp(*args, **kwargs)
        os.close(fd)
        os.unlink(path)
        os.symlink("/dev/full", path)
        return os.open("/dev/full", os.O_WRONLY), path

    monkeypatch.setattr(tempfile, "mkstemp", full_mkstemp)
    with pytest.raises(BuildError, match="No space left on device"):
        reg.build(KEY, SOURCE, make_produce())
    monkeypatch.undo()
    a = audit(root)
    assert a.temps == [] and a.temp_bytes == 0 and EID not in a.engines and reg.verify(old.id) == old


@needs_proc_fd
@pytest.mark.timeout(60)
def test_no_manifest_before_the_plan_is_durable(tmp_path: Path) -> None:
    """Row 15: the order of a build's durable steps, from its system calls: every engine file is fsynced before
    the manifest is created; the manifest is written to a temp name, fsynced and renamed; the folder is fsynced
    before it is published by one rename; the cache folder is fsynced after. Nothing is ever written under the
    final name."""
    root = tmp_path / "cache"
    inj = Injector(root)
    with inj.installed():
        m = Registry(root).build(KEY, SOURCE, make_produce())
    final = str(root / EID)
    calls = inj.calls

    def first(pred: Any) -> int:
        return next(i for i, call in enumerate(calls) if pred(call))

    [publish] = [i for i, call in enumerate(calls) if call.op == "rename" and call.path.startswith(str(root / ".tmp-"))
                 and not call.path.startswith(str(root / ".tmp-probe-"))]  # (the writability probe renames too)
    tmp = calls[publish].path
    manifest_created = first(lambda call: call.op == "open" and "/.manifest.json." in call.path)
    for entry in m.files:
        assert first(lambda call, n=entry.name: call.op == "fsync" and call.path == f"{tmp}/{n}") < manifest_created
    manifest_fsync = first(lambda call: call.op == "fsync" and "/.manifest.json." in call.path)
    manifest_replace = first(lambda call: call.op == "replace" and call.path.startswith(f"{tmp}/.manifest.json."))
    assert manifest_created < manifest_fsync < manifest_replace < publish
    assert any(call.op == "fsync" and call.path == tmp for call in calls[manifest_replace:publish])
    assert any(call.op == "fsync" and call.path == str(root) for call in calls[publish + 1 :])
    assert not any(call.path.startswith(final) for call in calls[:publish])  # nothing under the final name before
    assert calls[publish + 1 :] and all(call.op == "fsync" for call in calls[publish + 1 :])

    # And when making a plan durable fails, no manifest is ever created.
    shutil.rmtree(root)
    plan_fsync = next(
        call.index for call in calls if call.op == "fsync" and call.path.endswith("/unet.plan") and call.path != final
    )
    inj = Injector(root, fail=("fsync", plan_fsync), error=errno.EIO)
    with inj.installed(), pytest.raises(BuildError, match="Input/output error"):
        Registry(root).build(KEY, SOURCE, make_produce())
    assert inj.injected is not None and inj.injected.path.endswith("unet.plan")
    assert not any("manifest.json" in call.path for call in inj.calls)
    assert audit(root).engines == [] and audit(root).temps == []


# ==== read-only cache =================================================================================


@pytest.mark.timeout(60)
def test_read_only_cache_serves_and_refuses_builds_up_front(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    reg = Registry(root, lease_s=LEASE_S)
    old = reg.build(OTHER, SOURCE, make_produce())
    assert reg.writable()
    held = FileLock(reg.lock_path(EID))
    assert held.acquire(0)  # another replica builds this id: a read-only replica must not wait for it
    before = sorted((str(p), p.lstat().st_mtime_ns) for p in root.rglob("*"))
    produced: list[Path] = []
    try:
        with read_only(root) as refused:
            assert reg.writable() is False
            assert reg.verify(old.id) == old and reg.get(old.id) == old and [s.ok for s in reg.list()] == [True]
            assert reg.build(OTHER, SOURCE, make_produce()) == old  # present: served, nothing written
            t0 = time.monotonic()
            with pytest.raises(CacheNotWritable, match="not writable .*Read-only file system.*still served") as info:
                reg.build(KEY, SOURCE, lambda out: produced.append(out))  # type: ignore[arg-type,func-returns-value]
            assert time.monotonic() - t0 < 1.0 and produced == []  # refused before the lock and the backend
            assert isinstance(info.value, BuildError) and isinstance(info.value, SdtrtError)
            assert reg.cleanup(max_age_s=0) == []  # nothing to do, and no crash
            assert refused  # the refusals really came from the simulated read-only mount
    finally:
        held.release()
    assert sorted((str(p), p.lstat().st_mtime_ns) for p in root.rglob("*")) == before


@pytest.mark.timeout(60)
def test_read_only_cache_with_real_permissions(tmp_path: Path) -> None:
    """chmod 0555, where permissions apply (not for root: root is checked by the simulation above)."""
    root = tmp_path / "cache"
    reg = Registry(root)
    old = reg.build(OTHER, SOURCE, make_produce())
    os.chmod(root, 0o555)
    try:
        try:
            os.mkdir(root / "probe")
        except PermissionError:
            pass
        else:
            os.rmdir(root / "probe")
            pytest.skip("permissions do not stop this user (root?): covered by the simulated read-only mount")
        assert not reg.writable()
        assert reg.verify(old.id) == old and reg.build(OTHER, SOURCE, make_produce()) == old
        with pytest.raises(CacheNotWritable, match="Permission denied"):
            reg.build(KEY, SOURCE, make_produce())
    finally:
        os.chmod(root, 0o755)
    assert audit(root).engines == [old.id]


def test_writable_probe_for_a_cache_not_made_yet(tmp_path: Path) -> None:
    assert Registry(tmp_path / "a" / "b").writable() and not (tmp_path / "a").exists()


# ==== engines of another backend version or GPU =========================================================


@pytest.mark.parametrize(
    ("built", "current"),
    [
        ({"backend_version": "10.13.0"}, BackendInfo("tensorrt", "10.14.1", "NVIDIA A100", "8.0")),
        (
            {"compute_capability": "8.6", "device": "NVIDIA RTX A6000"},
            BackendInfo("tensorrt", "10.13.0", "NVIDIA A100", "8.0"),
        ),
    ],
    ids=["tensorrt-version", "compute-capability"],
)
def test_foreign_engine_is_stale_not_loaded_and_rebuild_is_offered(
    tmp_path: Path, built: dict[str, Any], current: BackendInfo
) -> None:
    root = tmp_path / "cache"
    reg = Registry(root)
    foreign_key = make_key(**built)
    foreign = reg.build(foreign_key, SOURCE, make_produce())  # as if built by another replica, then shared
    [status] = reg.list(current)
    assert not status.ok and status.stale and status.manifest == foreign
    assert current.version in (status.reason or "") and foreign_key.backend_version in (status.reason or "")
    with pytest.raises(StaleEngine, match="rebuild it for this machine") as info:
        reg.verify(foreign.id, current)
    assert not isinstance(info.value, ManifestError)
    # Rebuilding for this machine makes another engine: the foreign one stays (other replicas may use it).
    here = make_key(
        backend_version=current.version, device=current.device, compute_capability=current.compute_capability
    )
    m = reg.build(here, SOURCE, make_produce())
    assert m.id != foreign.id and reg.verify(m.id, current) == m
    assert reg.verify(foreign.id) == foreign and audit(root).quarantined == []
    assert {s.id: (s.ok, s.stale) for s in reg.list(current)} == {foreign.id: (False, True), m.id: (True, False)}


def test_damaged_engine_is_not_reported_stale(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "cache")
    m = reg.build(KEY, SOURCE, make_produce())
    (reg.engine_dir(m.id) / "unet.data").unlink()
    [status] = reg.list(BackendInfo("tensorrt", "10.14.1", "NVIDIA A100", "8.0"))
    assert not status.ok and not status.stale and "missing" in (status.reason or "")


# ==== garbage manifests ==========================================================================


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink-outside", "symlink-dev-zero", "empty"])
@pytest.mark.timeout(20)
def test_manifest_that_is_not_a_regular_file_is_skipped_without_hanging(tmp_path: Path, kind: str) -> None:
    """A FIFO would block open() forever, /dev/zero would never end, a symlink would read outside the cache."""
    reg = Registry(tmp_path / "cache")
    m = reg.build(KEY, SOURCE, make_produce())
    path = reg.manifest_path(m.id)
    secret = tmp_path / "secret.json"
    secret.write_text(m.to_json())  # a valid manifest outside the cache: must still not be followed
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink-outside":
        os.symlink(secret, path)
    elif kind == "symlink-dev-zero":
        os.symlink("/dev/zero", path)
    else:
        path.touch()
    [status] = reg.list()
    assert not status.ok and status.manifest is None and status.reason
    with pytest.raises(ManifestError):
        reg.verify(m.id)


if HAVE_HYPOTHESIS:
    _leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    _json = st.recursive(
        _leaf,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )
    _EXAMPLES = trials(2000, 150)

    @pytest.fixture(scope="module")
    def valid_manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
        return Registry(tmp_path_factory.mktemp("m") / "cache").build(KEY, SOURCE, make_produce())

    @settings(max_examples=_EXAMPLES, deadline=None)
    @given(raw=st.binary(max_size=2000) | st.text(max_size=500).map(str.encode))
    def test_any_bytes_parse_or_raise_only_manifest_error(raw: bytes) -> None:
        try:
            m = Manifest.from_json(raw)
        except ManifestError:
            return
        assert m.id == m.key.engine_id()

    @pytest.fixture(scope="module")
    def two_engines(tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, Manifest, Manifest]:
        reg = Registry(tmp_path_factory.mktemp("two") / "cache")
        return reg, reg.build(KEY, SOURCE, make_produce()), reg.build(OTHER, SOURCE, make_produce())

    @settings(max_examples=trials(300, 40), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def test_truncated_or_garbled_manifest_on_disk_never_breaks_list(
        two_engines: tuple[Registry, Manifest, Manifest], data: Any
    ) -> None:
        reg, m, other = two_engines
        text = m.to_json().encode()
        how = data.draw(st.sampled_from(["truncate", "garble", "replace"]))
        if how == "truncate":
            raw = text[: data.draw(st.integers(0, len(text) - 1))]
        elif how == "garble":
            i = data.draw(st.integers(0, len(text) - 1))
            raw = text[:i] + data.draw(st.binary(min_size=1, max_size=8)) + text[i + 1 :]
        else:
            raw = data.draw(st.binary(max_size=500))
        path = reg.manifest_path(m.id)
        path.write_bytes(raw)
        try:
            statuses = {s.id: s for s in reg.list()}  # never raises
            assert statuses[other.id].ok  # the other entries are unaffected
            if statuses[m.id].ok:
                # list() is shallow (sizes, not hashes): a garbled sha256 digit passes it, and the deep check
                # that loading runs must catch it. Only a manifest that still describes these files exactly
                # may pass verify().
                try:
                    assert reg.verify(m.id).files == m.files
                except StaleEngine as e:
                    assert "sha256" in str(e)
                    garbled = Manifest.from_json(raw)  # what list() accepted: same names and sizes, other hash
                    assert [(f.name, f.size) for f in garbled.files] == [(f.name, f.size) for f in m.files]
                    assert [f.sha256 for f in garbled.files] != [f.sha256 for f in m.files]
            else:
                with pytest.raises(StaleEngine):
                    reg.verify(m.id)
        finally:
            path.write_bytes(text)

    def _paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        out = [prefix]
        if isinstance(d, dict):
            for k, v in d.items():
                out += _paths(v, prefix + (k,))
        elif isinstance(d, list):
            for i, v in enumerate(d):
                out += _paths(v, prefix + (i,))
        return out

    @settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def test_missing_extra_or_wrong_type_fields_raise_only_manifest_error(
        valid_manifest: Manifest, data: Any
    ) -> None:
        d = valid_manifest.to_dict()
        for _ in range(data.draw(st.integers(1, 3))):
            path = data.draw(st.sampled_from(_paths(d)))
            *parents, last = path or ("",)
            target: Any = d
            for p in parents:
                target = target[p]
            action = data.draw(st.sampled_from(["delete", "retype", "add"]))
            if not path:
                d = data.draw(_json)
                break
            if action == "delete" and isinstance(target, (dict, list)):
                del target[last]
            elif action == "retype":
                target[last] = data.draw(_json)
            elif isinstance(target, dict):
                target[data.draw(st.text(max_size=6))] = data.draw(_json)
            if not isinstance(d, dict):
                break
        try:
            parsed = Manifest.from_dict(d)
        except ManifestError:
            return
        assert parsed.id == parsed.key.engine_id()  # whatever is accepted is self-consistent
        assert json.loads(parsed.to_json())  # and writes back

    @settings(max_examples=trials(500, 60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(extra=st.dictionaries(st.text(min_size=1, max_size=8), _json, min_size=1, max_size=3), where_=st.data())
    def test_unknown_keys_are_ignored(valid_manifest: Manifest, extra: dict[str, Any], where_: Any) -> None:
        d = valid_manifest.to_dict()
        section = where_.draw(st.sampled_from(["top", "key", "file"]))
        target = d if section == "top" else d["key"] if section == "key" else d["files"][0]
        known = set(target)
        target.update({k: v for k, v in extra.items() if k not in known})
        assert Manifest.from_dict(d) == valid_manifest


# ==== orphans ===========================================================================================


def test_orphans_are_never_served_and_removed_by_gc_after_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "cache"
    reg = Registry(root)
    good = reg.build(OTHER, SOURCE, make_produce())
    # orphan plan: an engine folder with a plan and no manifest
    orphan_plan = make_key(family="orphan-plan").engine_id()
    (root / orphan_plan).mkdir()
    (root / orphan_plan / "unet.plan").write_bytes(plan_bytes(os.urandom(16)))
    # orphan manifest: a valid manifest whose files are gone
    orphan_manifest = reg.build(make_key(family="orphan-manifest"), SOURCE, make_produce())
    for f in orphan_manifest.files:
        (root / orphan_manifest.id / f.name).unlink()
    # kept: a damaged engine (build() quarantines those), a quarantine, an operator's folder, a foreign file
    damaged = reg.build(make_key(family="damaged"), SOURCE, make_produce())
    with open(root / damaged.id / "unet.plan", "r+b") as f:
        f.truncate(100)
    (root / ".quarantine-x-20260101T000000Z-ab").mkdir()
    (root / "logs").mkdir()
    (root / "notes.txt").write_text("operator notes")
    for eid in (orphan_plan, orphan_manifest.id):
        with pytest.raises(StaleEngine):
            reg.verify(eid)
        with pytest.raises(StaleEngine):
            reg.get(eid)
    status = {s.id: s for s in reg.list()}
    assert not status[orphan_plan].ok and not status[orphan_manifest.id].ok and status[good.id].ok
    # Within the grace period nothing goes, even with this host's clock a day ahead (ages use the file system's).
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 86400)
    assert reg.cleanup(max_age_s=3600) == []
    monkeypatch.undo()
    assert reg.cleanup(max_age_s=0) == sorted([orphan_plan, orphan_manifest.id])
    left = sorted(os.listdir(root))
    assert left == sorted([".locks", ".quarantine-x-20260101T000000Z-ab", damaged.id, good.id, "logs", "notes.txt"])
    assert reg.verify(good.id) == good
    with pytest.raises(EngineNotFound):
        reg.get(orphan_plan)


def test_gc_keeps_a_folder_being_copied_in_even_with_old_mtimes(tmp_path: Path) -> None:
    """`cp -a` of an engine preserves mtimes: the ctime (which cannot be set back) keeps it inside the grace."""
    root = tmp_path / "cache"
    reg = Registry(root)
    eid = make_key(family="copied").engine_id()
    (root / eid).mkdir(parents=True)
    (root / eid / "unet.plan").write_bytes(b"x")
    old = time.time() - 7 * 86400
    os.utime(root / eid / "unet.plan", (old, old))
    os.utime(root / eid, (old, old))
    assert reg.cleanup(max_age_s=3600) == [] and (root / eid / "unet.plan").exists()


def test_cleanup_age_uses_the_file_system_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 17 for cleanup: a foreign host's live build (touched now) survives this host's clock being a day
    ahead; a temp folder untouched for two hours goes even with this host's clock a day behind."""
    root = tmp_path / "cache"
    reg = Registry(root)
    reg.build(OTHER, SOURCE, make_produce())
    live = root / f".tmp-{EID}-otherhost-1-abcd"
    live.mkdir()
    dead = root / f".tmp-{EID}-otherhost-2-abcd"
    dead.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(dead, (two_hours_ago, two_hours_ago))
    real_time = time.time
    for skew in (86400, -86400):
        monkeypatch.setattr(time, "time", lambda s=skew: real_time() + s)
        removed = reg.cleanup(max_age_s=3600)
        monkeypatch.undo()
        assert live.exists()
        assert removed == ([dead.name] if skew == 86400 else [])
    assert not dead.exists()


# ==== the final name already exists =====================================================================


def test_publication_race_loser_never_overwrites_the_winner(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    winner: list[Manifest] = []
    at_win: list[list[tuple[str, int, int, bytes]]] = []

    def snapshot() -> list[tuple[str, int, int, bytes]]:
        d = root / EID
        return [(p.name, p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.iterdir())]

    def produce_and_lose(out: Path) -> BuildResult:
        result = make_produce()(out)
        # Meanwhile another replica (no working lock between us) publishes the same id.
        winner.append(Registry(root, locking=False).build(KEY, SOURCE, make_produce()))
        at_win.append(snapshot())
        return result

    m = Registry(root).build(KEY, SOURCE, produce_and_lose)
    assert m == winner[0]  # the loser returns the winner's engine...
    assert snapshot() == at_win[0] and audit(root).temps == []  # ...the winner's files untouched, its copy gone
    assert Registry(root).build(KEY, SOURCE, make_produce()) == m and snapshot() == at_win[0]


@pytest.mark.parametrize("kind", ["file", "symlink-to-engine", "empty-dir-with-junk"])
def test_foreign_entry_under_the_final_name_is_moved_aside_not_overwritten(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "cache"
    reg = Registry(root)
    elsewhere = Registry(tmp_path / "elsewhere").build(KEY, SOURCE, make_produce())
    target = tmp_path / "elsewhere" / EID
    target_files = sorted((p.name, p.read_bytes()) for p in target.iterdir())
    root.mkdir()
    final = root / EID
    if kind == "file":
        final.write_bytes(b"not an engine")
    elif kind == "symlink-to-engine":
        os.symlink(target, final)
    else:
        final.mkdir()
        (final / "junk").write_bytes(b"junk")
    m = reg.build(KEY, SOURCE, make_produce())
    assert reg.verify(m.id) == m and final.is_dir() and not final.is_symlink()
    [moved] = audit(root).quarantined
    moved_path = root / moved
    if kind == "file":
        assert moved_path.read_bytes() == b"not an engine"
    elif kind == "symlink-to-engine":
        assert moved_path.is_symlink() and os.readlink(moved_path) == str(target)
    else:
        assert (moved_path / "junk").read_bytes() == b"junk"
    assert sorted((p.name, p.read_bytes()) for p in target.iterdir()) == target_files  # never followed
    assert Registry(tmp_path / "elsewhere").verify(elsewhere.id) == elsewhere


# ==== small units ================================================================================================


def test_lease_must_be_positive() -> None:
    for bad in (0, -1, float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="lease_s"):
            Registry("/nonexistent", lease_s=bad)  # type: ignore[arg-type]


def test_plan_checker_detects_mixed_and_cut_plans() -> None:
    a, b = plan_bytes(b"a" * 16), plan_bytes(b"b" * 16)
    assert plan_is_whole(a) and plan_is_whole(b)
    assert not plan_is_whole(a[: PLAN_BYTES // 2] + b[PLAN_BYTES // 2 :])
    assert not plan_is_whole(a[:-1]) and not plan_is_whole(b"")


def test_heartbeat_beats_on_every_path(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.touch()
    old = time.time() - 1000
    for p in (a, b):
        os.utime(p, (old, old))
    with Heartbeat(0.05) as beat:
        beat.add(a)
        beat.add(tmp_path / "gone")  # a path that vanished (published) does not stop the others
        os.utime(a, (old, old))
        beat.add(b)
        time.sleep(0.3)
    assert a.stat().st_mtime > old + 900 and b.stat().st_mtime > old + 900
    silent = Liveness(tmp_path, b, "x")
    assert silent.silent_for() < 0.5
    time.sleep(0.2)
    assert silent.silent_for() >= 0.2
    os.utime(b)
    assert silent.silent_for() < 0.1


def test_stat_mode_helper_is_not_confused_by_fifo_engine_file(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "cache")
    m = reg.build(KEY, SOURCE, make_produce())
    plan = reg.engine_dir(m.id) / "unet.plan"
    plan.unlink()
    os.mkfifo(plan)
    assert stat.S_ISFIFO(plan.lstat().st_mode)
    assert "not a regular file" in (reg.status(m.id).reason or "")
    with pytest.raises(StaleEngine):
        reg.verify(m.id)
