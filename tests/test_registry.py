"""The engine registry on real files: atomic publish, detection of damage, races between processes, crashes.

Every test uses a fake `produce` that writes bytes, so no backend or GPU is involved.
"""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

EXT = Path(__file__).resolve().parents[1] / "extension"
if str(EXT) not in sys.path:
    sys.path.insert(0, str(EXT))

from sdtrt.backends.base import BackendInfo, BuildResult
from sdtrt.errors import (
    BuildError,
    EngineNotFound,
    InvalidEngineId,
    ManifestError,
    ProfileError,
    SdtrtError,
    StaleEngine,
)
from sdtrt.fsutil import FileLock, LockTimeout, atomic_write_bytes, read_regular_file, sha256_and_size, sha256_file
from sdtrt.storage import inspection as inspection_mod
from sdtrt.storage import publish as publish_mod
from sdtrt.storage.key import EngineKey, validate_engine_id
from sdtrt.storage.lease import host_name
from sdtrt.storage.manifest import MANIFEST_NAME, Manifest
from sdtrt.storage.registry import Registry

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:  # pragma: no cover - hypothesis is a test extra
    HAVE_HYPOTHESIS = False

CTX = mp.get_context("fork")
PAYLOAD = bytes(range(256)) * 40  # 10240 bytes
DATA = b"external weights" * 100
SOURCE = {"name": "v1-5-pruned.safetensors", "sha256": "ab" * 32}
A100 = BackendInfo("tensorrt", "10.13.0", "NVIDIA A100", "8.0")
H100 = BackendInfo("tensorrt", "10.14.1", "NVIDIA H100", "9.0")


def make_key(**changes: Any) -> EngineKey:
    fields: dict[str, Any] = {
        "family": "sd1",
        "arch_hash": "0f" * 8,
        "io": {"in_channels": 4, "context_dim": 768, "y_dim": None},
        "profiles": ("1x512x512x75", "1x512x512x75:2x768x768x150:4x1024x1024x225"),
        "backend": "tensorrt",
        "backend_version": "10.13.0",
        "device": "NVIDIA A100",
        "compute_capability": "8.0",
        "refit_mode": "refit",
        "weights": "stripped",
        "export": {"dtype": "float16", "opset": 17, "exporter": "torch.onnx"},
    }
    fields.update(changes)
    return EngineKey(**fields)


def fake_produce(calls: list[Path] | None = None, *, sleep: float = 0.0, counter: Path | None = None):
    """A backend stand-in: writes a plan and an external-data file, optionally slowly, recording each call."""

    def produce(out: Path) -> BuildResult:
        if calls is not None:
            calls.append(out)
        if counter is not None:
            with open(counter, "a") as f:
                f.write(f"{os.getpid()}\n")
        (out / "unet.plan").write_bytes(PAYLOAD)
        time.sleep(sleep)
        (out / "unet.onnx.data").write_bytes(DATA)
        (out / "scratch.log").write_text("builder log, not part of the engine")
        return BuildResult(
            files=["unet.plan", "unet.onnx.data"], weights="stripped", refit_mode="refit", extra={"tactics": 3}
        )

    return produce


def side_dirs(root: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(prefix)) if root.exists() else []


def engine_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "cache")


@pytest.fixture
def built(reg: Registry) -> Manifest:
    return reg.build(make_key(), SOURCE, fake_produce())


# ---- ids and keys ------------------------------------------------------------------------------------------


def test_engine_id_is_stable_and_depends_on_every_key_field() -> None:
    key = make_key()
    eid = key.engine_id()
    assert eid.startswith("sd1-tensorrt-") and len(eid) == len("sd1-tensorrt-") + 16
    assert validate_engine_id(eid) == eid
    # Profile strings are normalized, so spelling does not create a second engine.
    assert make_key(profiles=[" 1X512x512x75", "1x512x512x75:2x768x768x150:4x1024x1024x225"]).engine_id() == eid
    assert EngineKey.from_dict(json.loads(json.dumps(key.to_dict()))).engine_id() == eid
    variants = [
        make_key(family="sdxl-base"),
        make_key(arch_hash="1f" * 8),
        make_key(io={"in_channels": 9}),
        make_key(profiles=("1x512x512x75",)),
        make_key(backend="tensorrt-rtx"),
        make_key(backend_version="10.14.1"),
        make_key(device="NVIDIA H100"),
        make_key(compute_capability="9.0"),
        make_key(weights="embedded"),
        make_key(refit_mode="none", weights="embedded"),
        make_key(export={"dtype": "float32"}),
        make_key(weights="embedded", checkpoint_sha256="cd" * 32),
    ]
    ids = {v.engine_id() for v in variants}
    assert len(ids) == len(variants) and eid not in ids
    assert make_key(family="SDXL Base!!", backend="TensorRT-RTX").engine_id().startswith("sdxl-base-tensorrt-rtx-")


def test_key_validation() -> None:
    with pytest.raises(ValueError, match="refit"):
        make_key(weights="stripped", refit_mode="none")
    with pytest.raises(ProfileError):
        make_key(profiles=("1x500x512x75",))
    with pytest.raises(ValueError, match="weights"):
        make_key(weights="some")
    with pytest.raises(ValueError, match="JSON"):
        make_key(export={"dtype": float("nan")})
    with pytest.raises(ValueError, match="profiles"):
        make_key(profiles="1x512x512x75")


@pytest.mark.parametrize(
    "bad", ["../x", "/etc", "a/b", "", "x\x00", "..", "a..b", "A", "a" * 129, ".tmp-x", "%2e%2e", "x\\y", " x", None, 3]
)
def test_invalid_ids_are_refused_and_nothing_outside_is_touched(tmp_path: Path, bad: Any) -> None:
    cache = tmp_path / "cache"
    reg = Registry(cache)
    reg.build(make_key(), SOURCE, fake_produce())
    canary = tmp_path / "x"
    canary.mkdir()
    (canary / MANIFEST_NAME).write_text("{}")
    (tmp_path / "etc").mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for call in (reg.get, reg.verify, reg.delete, reg.status, reg.quarantine, reg.engine_dir, reg.lock_path):
        with pytest.raises(InvalidEngineId, match="invalid engine id") as info:
            call(bad)
        assert isinstance(info.value, ValueError) and isinstance(info.value, EngineNotFound)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_registry_creation_touches_nothing(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "absent")
    assert reg.list() == [] and reg.cleanup(0) == []
    with pytest.raises(EngineNotFound, match="known engines: none"):
        reg.get(make_key().engine_id())
    assert not (tmp_path / "absent").exists()


# ---- publish and reuse -------------------------------------------------------------------------------------


def test_build_publishes_folder_with_matching_manifest(reg: Registry) -> None:
    calls: list[Path] = []
    progress: list[str] = []
    m = reg.build(make_key(), SOURCE, fake_produce(calls), progress=lambda phase, f: progress.append(phase))
    d = reg.engine_dir(m.id)
    assert m.id == make_key().engine_id() and d.is_dir()
    assert sorted(os.listdir(d)) == [MANIFEST_NAME, "unet.onnx.data", "unet.plan"]  # scratch.log not published
    on_disk = Manifest.from_json((d / MANIFEST_NAME).read_bytes())
    assert on_disk == m and on_disk.source_checkpoint == SOURCE and on_disk.extra == {"tactics": 3}
    for entry in m.files:
        assert entry.size == (d / entry.name).stat().st_size
        assert entry.sha256 == sha256_file(d / entry.name)
    assert [f.name for f in m.files] == ["unet.plan", "unet.onnx.data"]
    assert calls and not calls[0].exists()  # produce got a temp folder, gone after publishing
    assert side_dirs(reg.root, ".tmp-") == [] and progress[-1] == "published"
    assert reg.verify(m.id, A100) == m and reg.get(m.id) == m
    [status] = reg.list(A100)
    assert status.ok and status.reason is None and status.id == m.id and status.manifest == m


def test_second_build_returns_existing_without_producing(reg: Registry, built: Manifest) -> None:
    calls: list[Path] = []
    mtime = reg.manifest_path(built.id).stat().st_mtime_ns
    again = reg.build(make_key(), SOURCE, fake_produce(calls))
    assert again == built and calls == []
    assert reg.manifest_path(built.id).stat().st_mtime_ns == mtime  # never overwritten


def test_list_skips_unknown_files_and_side_folders(reg: Registry, built: Manifest) -> None:
    (reg.root / "README.txt").write_text("operator notes")
    (reg.root / "logs").mkdir()
    (reg.root / f".tmp-{built.id}-otherhost-1-abcd").mkdir()
    (reg.root / f".quarantine-{built.id}-20260101T000000Z-ab").mkdir()
    orphan = reg.root / "sd1-tensorrt-00000000000000ff"
    orphan.mkdir()
    (orphan / "unet.plan").write_bytes(b"x")
    statuses = {s.id: s for s in reg.list()}
    assert set(statuses) == {built.id, orphan.name}
    assert statuses[built.id].ok
    assert not statuses[orphan.name].ok and "no manifest.json" in (statuses[orphan.name].reason or "")


def test_folders_that_are_not_engines_are_never_touched(reg: Registry, built: Manifest) -> None:
    logs = reg.root / "logs"
    logs.mkdir()
    (logs / "today.txt").write_text("x")
    for call in (reg.get, reg.verify, reg.status, reg.delete, reg.quarantine):
        with pytest.raises(EngineNotFound, match=built.id):
            call("logs")
    assert (logs / "today.txt").read_text() == "x"


def test_list_does_not_hash(reg: Registry, built: Manifest, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: Any) -> Any:
        raise AssertionError("list() must not hash engine files")

    monkeypatch.setattr(inspection_mod, "sha256_and_size", boom)
    assert [s.ok for s in reg.list()] == [True]
    assert reg.status(built.id).ok


# ---- damage ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 1, len(PAYLOAD) // 2, len(PAYLOAD) - 1])
def test_truncated_file_is_reported_and_refused(reg: Registry, built: Manifest, keep: int) -> None:
    plan = reg.engine_dir(built.id) / "unet.plan"
    with open(plan, "r+b") as f:
        f.truncate(keep)
    [status] = reg.list()
    assert not status.ok and status.reason is not None
    assert f"unet.plan is {keep} bytes" in status.reason and f"size {len(PAYLOAD)}" in status.reason
    with pytest.raises(StaleEngine, match="size"):
        reg.verify(built.id)
    with pytest.raises(StaleEngine):
        reg.get(built.id)


def test_missing_file_is_reported(reg: Registry, built: Manifest) -> None:
    (reg.engine_dir(built.id) / "unet.onnx.data").unlink()
    assert "unet.onnx.data is missing" in (reg.status(built.id).reason or "")


def test_bit_flip_is_caught_by_verify_and_build_quarantines_and_rebuilds(reg: Registry, built: Manifest) -> None:
    plan = reg.engine_dir(built.id) / "unet.plan"
    raw = bytearray(plan.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    plan.write_bytes(bytes(raw))
    assert reg.status(built.id).ok  # cheap check: size is right
    with pytest.raises(StaleEngine, match="sha256"):
        reg.verify(built.id)
    assert reg.engine_dir(built.id).exists()  # verify never moves anything
    calls: list[Path] = []
    rebuilt = reg.build(make_key(), SOURCE, fake_produce(calls))
    assert len(calls) == 1 and reg.verify(rebuilt.id) == rebuilt
    [quarantined] = side_dirs(reg.root, ".quarantine-")
    assert quarantined.startswith(f".quarantine-{built.id}-")
    assert (reg.root / quarantined / "unet.plan").read_bytes() == bytes(raw)  # kept for inspection, not deleted
    assert reg.cleanup(0) == [] and (reg.root / quarantined).exists()


def test_invalid_final_folder_is_not_reused(reg: Registry) -> None:
    eid = make_key().engine_id()
    junk = reg.root / eid
    junk.mkdir(parents=True)
    (junk / "unet.plan").write_bytes(b"half")
    calls: list[Path] = []
    m = reg.build(make_key(), SOURCE, fake_produce(calls))
    assert calls and reg.verify(m.id) == m and len(side_dirs(reg.root, ".quarantine-")) == 1


def edit_manifest(reg: Registry, eid: str, edit: Callable[[dict[str, Any]], None]) -> None:
    path = reg.manifest_path(eid)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["key"].update(profiles=["2x512x512x75", d["key"]["profiles"][1]]),
        lambda d: d["key"].update(backend_version="10.14.1"),
        lambda d: d["key"].update(compute_capability="9.0"),
        lambda d: d["key"].update(weights="embedded"),
    ],
    ids=["profile", "backend_version", "compute_capability", "weights"],
)
def test_manifest_edited_by_hand_is_invalid(reg: Registry, built: Manifest, edit: Callable[..., None]) -> None:
    edit_manifest(reg, built.id, edit)
    [status] = reg.list()
    assert not status.ok and status.manifest is None
    assert "manifest was edited" in (status.reason or "") and built.id in (status.reason or "")
    with pytest.raises(ManifestError, match="edited"):
        reg.verify(built.id)


def test_manifest_with_wrong_sha_or_size_for_intact_file_is_refused(reg: Registry, built: Manifest) -> None:
    edit_manifest(reg, built.id, lambda d: d["files"][0].update(sha256="0" * 64))
    with pytest.raises(StaleEngine, match="sha256"):
        reg.verify(built.id)


def test_folder_renamed_by_hand_is_invalid(reg: Registry, built: Manifest) -> None:
    other = "sd1-tensorrt-0123456789abcdef"
    os.rename(reg.engine_dir(built.id), reg.root / other)
    assert "holds the manifest of" in (reg.status(other).reason or "")


GARBAGE = [
    b"",
    b"   \n",
    b"{",
    b"null",
    b"[]",
    b"\xff\xfe\x00garbage",
    b"[" * 100_000,
    b'{"schema": 1}',
    b'{"schema": "1"}',
    b'{"schema": 2}',
]


@pytest.mark.parametrize("raw", GARBAGE + ["truncated"], ids=range(len(GARBAGE) + 1))
def test_garbage_or_truncated_manifest_is_reported_never_raised(reg: Registry, built: Manifest, raw: Any) -> None:
    path = reg.manifest_path(built.id)
    if raw == "truncated":
        raw = path.read_bytes()[: len(path.read_bytes()) // 2]
    path.write_bytes(raw)
    [status] = reg.list()
    assert not status.ok and status.manifest is None and status.reason
    with pytest.raises(ManifestError):
        reg.verify(built.id)
    with pytest.raises(ManifestError):
        Manifest.from_json(raw)


def test_schema_mismatch_message(built: Manifest) -> None:
    d = built.to_dict()
    d["schema"] = 2
    with pytest.raises(ManifestError, match="schema 2 is not supported"):
        Manifest.from_dict(d)


REQUIRED = ["schema", "id", "key", "files", "source_checkpoint", "created", "build_seconds", "sdtrt_version"]
KEY_REQUIRED = [
    "family",
    "arch_hash",
    "io",
    "profiles",
    "backend",
    "backend_version",
    "device",
    "compute_capability",
    "refit_mode",
    "weights",
    "export",
]


@pytest.mark.parametrize("field", REQUIRED + [f"key.{f}" for f in KEY_REQUIRED])
def test_missing_field_is_rejected(built: Manifest, field: str) -> None:
    d = built.to_dict()
    target, name = (d["key"], field[4:]) if field.startswith("key.") else (d, field)
    del target[name]
    with pytest.raises(ManifestError, match=name):
        Manifest.from_dict(d)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("schema", True),
        ("schema", 1.0),
        ("id", 5),
        ("files", {}),
        ("files", []),
        ("build_seconds", "3"),
        ("build_seconds", -1),
        ("created", "yesterday"),
        ("source_checkpoint", "x.safetensors"),
        ("extra", []),
        ("key", []),
        ("key.profiles", "1x512x512x75"),
        ("key.profiles", [1]),
        ("key.io", [4]),
        ("key.compute_capability", 8.0),
        ("files.0.size", "10240"),
        ("files.0.size", True),
        ("files.0.sha256", "ABC"),
        ("files.0.name", "../unet.plan"),
        ("files.0.name", MANIFEST_NAME),
    ],
)
def test_wrong_types_are_rejected(built: Manifest, path: str, value: Any) -> None:
    d = built.to_dict()
    *parents, last = path.split(".")
    target: Any = d
    for p in parents:
        target = target[int(p)] if p.isdigit() else target[p]
    target[last] = value
    with pytest.raises(ManifestError):
        Manifest.from_dict(d)


def test_unknown_keys_are_ignored(built: Manifest) -> None:
    d = built.to_dict()
    d["future_field"] = {"x": 1}
    d["key"]["future_key_field"] = 1
    d["files"][0]["mode"] = "0644"
    assert Manifest.from_dict(d) == built
    assert Manifest.from_json(built.to_json()) == built


# ---- staleness ---------------------------------------------------------------------------------------------


def test_stale_when_backend_or_device_changes(reg: Registry, built: Manifest) -> None:
    status = reg.status(built.id, H100)
    assert not status.ok and status.manifest == built
    assert status.reason == (
        "built with tensorrt 10.13.0 on NVIDIA A100 (sm80); this machine has tensorrt 10.14.1 on NVIDIA H100 (sm90)"
    )
    assert reg.status(built.id, A100).ok and reg.status(built.id).ok
    assert not reg.status(built.id, BackendInfo("tensorrt-rtx", "1.1", "NVIDIA A100", "8.0")).ok
    assert [s.ok for s in reg.list(H100)] == [False]
    with pytest.raises(StaleEngine, match="10.14.1"):
        reg.verify(built.id, H100)


# ---- failures during a build -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc", [ValueError("builder exploded"), KeyboardInterrupt(), BuildError("out of memory"), ProfileError("bad")]
)
def test_produce_error_leaves_nothing(reg: Registry, exc: BaseException) -> None:
    def produce(out: Path) -> BuildResult:
        (out / "unet.plan").write_bytes(PAYLOAD[:100])
        raise exc

    wrapped = isinstance(exc, Exception) and not isinstance(exc, SdtrtError)
    with pytest.raises(BuildError if wrapped else type(exc)) as info:
        reg.build(make_key(), SOURCE, produce)
    if wrapped:  # foreign errors become BuildError with the cause; sdtrt's own (and KeyboardInterrupt) pass as is
        assert info.value.__cause__ is exc and "builder exploded" in str(info.value)
    else:
        assert info.value is exc
    assert engine_dirs(reg.root) == [] and side_dirs(reg.root, ".tmp-") == []


@pytest.mark.parametrize(
    ("result", "match"),
    [
        (BuildResult(["absent.plan"], "stripped", "refit"), "did not write"),
        (BuildResult([], "stripped", "refit"), "each engine file once"),
        (BuildResult(["unet.plan", "unet.plan"], "stripped", "refit"), "each engine file once"),
        (BuildResult(["../escape"], "stripped", "refit"), "plain file name"),
        (BuildResult(["link.plan"], "stripped", "refit"), "not a regular file"),
        (BuildResult(["unet.plan"], "embedded", "refit"), "asks for weights='stripped'"),
        ("not a result", "not a BuildResult"),
    ],
)
def test_bad_backend_results_are_not_published(reg: Registry, tmp_path: Path, result: Any, match: str) -> None:
    outside = tmp_path / "outside.plan"
    outside.write_bytes(b"secret")

    def produce(out: Path) -> Any:
        (out / "unet.plan").write_bytes(PAYLOAD)
        os.symlink(outside, out / "link.plan")
        return result

    with pytest.raises(BuildError, match=match):
        reg.build(make_key(), SOURCE, produce)
    assert engine_dirs(reg.root) == [] and side_dirs(reg.root, ".tmp-") == [] and outside.read_bytes() == b"secret"


@pytest.mark.parametrize("target", ["atomic_write_bytes", "fsync_dir", "rename"])
def test_io_error_while_publishing_publishes_nothing(
    reg: Registry, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    if target == "rename":
        monkeypatch.setattr(publish_mod.os, "rename", fail)
    else:
        monkeypatch.setattr(publish_mod, target, fail)
    with pytest.raises(BuildError, match="No space left") as info:
        reg.build(make_key(), SOURCE, fake_produce())
    assert isinstance(info.value.__cause__, OSError)
    monkeypatch.undo()
    assert engine_dirs(reg.root) == [] and side_dirs(reg.root, ".tmp-") == []


def test_bad_source_checkpoint_is_refused(reg: Registry) -> None:
    with pytest.raises(BuildError, match="source_checkpoint"):
        reg.build(make_key(), {"sha256": "x"}, fake_produce())


# ---- processes ---------------------------------------------------------------------------------------------


def _build_in_child(cache: str, locking: bool, barrier: Any, counter: str, sleep: float, out: Any) -> None:
    try:
        barrier.wait(timeout=10)
        m = Registry(cache, locking=locking).build(
            make_key(), SOURCE, fake_produce(sleep=sleep, counter=Path(counter)), lock_timeout=10
        )
        out.put(("ok", m.to_json()))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        out.put(("error", repr(e)))


def _run_builders(tmp_path: Path, n: int, locking: bool, sleep: float) -> tuple[list[str], int]:
    cache, counter = tmp_path / "cache", tmp_path / "calls.txt"
    counter.touch()
    barrier, out = CTX.Barrier(n), CTX.Queue()
    procs = [
        CTX.Process(target=_build_in_child, args=(str(cache), locking, barrier, str(counter), sleep, out))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    assert all(kind == "ok" for kind, _ in results), results
    return [text for _, text in results], len(counter.read_text().split())


def _assert_single_valid_engine(tmp_path: Path, manifests: list[str]) -> None:
    reg = Registry(tmp_path / "cache")
    assert engine_dirs(reg.root) == [make_key().engine_id()]
    assert len(set(manifests)) == 1  # every process got the winner's manifest
    assert reg.verify(make_key().engine_id()).to_json() == manifests[0]
    assert side_dirs(reg.root, ".tmp-") == [] and side_dirs(reg.root, ".quarantine-") == []


def test_concurrent_builds_with_lock_build_once(tmp_path: Path) -> None:
    manifests, produced = _run_builders(tmp_path, 4, locking=True, sleep=0.4)
    assert produced == 1
    _assert_single_valid_engine(tmp_path, manifests)


@pytest.mark.parametrize("mode", ["locking_off", "flock_is_noop"])
def test_concurrent_builds_without_working_lock_still_publish_one_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    if mode == "flock_is_noop":  # Lustre/GPFS: flock "silently succeeds for every caller"; forked children inherit it
        monkeypatch.setattr(fcntl, "flock", lambda fd, op: None)
    manifests, produced = _run_builders(tmp_path, 4, locking=mode != "locking_off", sleep=0.3)
    assert produced >= 2  # the race really happened: several processes built, one rename won
    _assert_single_valid_engine(tmp_path, manifests)


def _hanging_build(cache: str, started: Any, chunks: int, delay: float) -> None:
    def produce(out: Path) -> BuildResult:
        with open(out / "unet.plan", "wb") as f:
            for _ in range(chunks):
                f.write(PAYLOAD)
                f.flush()
                started.set()
                time.sleep(delay)
        return BuildResult(["unet.plan"], "stripped", "refit")

    Registry(cache).build(make_key(), SOURCE, produce)


def test_sigkill_mid_build_leaves_nothing_and_is_recoverable(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    started = CTX.Event()
    child = CTX.Process(target=_hanging_build, args=(str(cache), started, 1000, 0.05))
    child.start()
    assert started.wait(10)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join(10)
    reg = Registry(cache)
    [orphan] = side_dirs(cache, ".tmp-")
    assert f"-{child.pid}-" in orphan
    assert engine_dirs(cache) == [] and reg.list() == []
    t0 = time.monotonic()
    m = reg.build(make_key(), SOURCE, fake_produce(), lock_timeout=5)
    assert time.monotonic() - t0 < 2  # the kernel released the dead holder's flock: no waiting for the timeout
    assert reg.verify(m.id) == m
    assert reg.cleanup(max_age_s=3600) == []  # too young
    assert reg.cleanup(max_age_s=0) == [orphan]
    assert side_dirs(cache, ".tmp-") == [] and reg.verify(m.id) == m


def test_random_time_kills_never_expose_a_partial_engine(tmp_path: Path) -> None:
    rng = random.Random(1234)
    cache = tmp_path / "cache"
    reg = Registry(cache)
    eid = make_key().engine_id()
    for _ in range(6):
        started = CTX.Event()
        child = CTX.Process(target=_hanging_build, args=(str(cache), started, 8, 0.002))
        child.start()
        started.wait(10)
        time.sleep(rng.uniform(0, 0.03))
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(10)
        if (cache / eid).exists():  # whatever is visible under the final name is complete
            assert reg.verify(eid).files[0].size == 8 * len(PAYLOAD)
            reg.delete(eid)
        reg.cleanup(max_age_s=0)
        assert side_dirs(cache, ".tmp-") == []


def test_cleanup_keeps_live_builds(reg: Registry, built: Manifest) -> None:
    mine = reg.root / f".tmp-{built.id}-{host_name()}-{os.getpid()}-abcd"
    mine.mkdir()
    other_host_fresh = reg.root / f".tmp-{built.id}-elsewhere-1-abcd"
    other_host_fresh.mkdir()
    assert reg.cleanup(max_age_s=3600) == []
    assert reg.cleanup(max_age_s=0) == [other_host_fresh.name]  # a foreign host's old folder: age decides
    assert mine.exists()  # our own pid is alive
    held = FileLock(reg.lock_path(built.id))
    assert held.acquire(0)
    stale = reg.root / f".tmp-{built.id}-elsewhere-2-abcd"
    stale.mkdir()
    assert reg.cleanup(max_age_s=0) == []  # someone holds the id's lock: maybe that build is alive
    held.release()
    assert reg.cleanup(max_age_s=0) == [stale.name]


# ---- delete ------------------------------------------------------------------------------------------------


def test_delete_removes_engine(reg: Registry, built: Manifest) -> None:
    other = reg.build(make_key(family="sd2"), SOURCE, fake_produce())
    reg.delete(built.id)
    assert not reg.engine_dir(built.id).exists() and side_dirs(reg.root, ".tmp-") == []
    with pytest.raises(EngineNotFound, match=other.id):  # the error lists the engines that do exist
        reg.get(built.id)
    with pytest.raises(EngineNotFound):
        reg.delete(built.id)
    assert [s.id for s in reg.list()] == [other.id]


def test_delete_symlinked_entry_removes_only_the_link(reg: Registry, built: Manifest, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = reg.root / "sd1-tensorrt-00000000000000aa"
    os.symlink(target, link)
    assert "symlink" in (reg.status(link.name).reason or "")
    reg.delete(link.name)
    assert not os.path.lexists(link) and (target / "keep.txt").read_text() == "keep"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_cache_serves_but_refuses_builds(reg: Registry, built: Manifest) -> None:
    os.chmod(reg.root, 0o555)
    try:
        assert reg.verify(built.id) == built and [s.ok for s in reg.list()] == [True]
        assert reg.build(make_key(), SOURCE, fake_produce()) == built  # present: served, nothing written
        with pytest.raises(BuildError, match="Permission denied"):
            reg.build(make_key(family="sd2"), SOURCE, fake_produce())
    finally:
        os.chmod(reg.root, 0o755)
    assert engine_dirs(reg.root) == [built.id]


# ---- fsutil ------------------------------------------------------------------------------------------------


def test_atomic_write_replaces_or_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.json"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and os.listdir(tmp_path) == ["m.json"]

    def fail(*args: Any) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"three")
    assert path.read_bytes() == b"two" and os.listdir(tmp_path) == ["m.json"]

    monkeypatch.undo()
    real_replace = os.replace

    def lie(src: Any, dst: Any) -> None:  # NFS: the rename happened, the answer says it did not
        real_replace(src, dst)
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "replace", lie)
    atomic_write_bytes(path, b"four")  # its content is there: the error is not believed
    assert path.read_bytes() == b"four" and os.listdir(tmp_path) == ["m.json"]


def test_write_all_continues_short_writes_and_refuses_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    sizes: list[int] = []

    def one_byte(fd: int, data: Any) -> int:
        sizes.append(len(data))
        return real_write(fd, bytes(data[:1]))

    monkeypatch.setattr(os, "write", one_byte)
    atomic_write_bytes(tmp_path / "m.json", b"0123456789")
    monkeypatch.undo()
    assert (tmp_path / "m.json").read_bytes() == b"0123456789" and sizes == list(range(10, 0, -1))
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    with pytest.raises(OSError, match="wrote 0 bytes"):
        atomic_write_bytes(tmp_path / "m.json", b"new")
    monkeypatch.undo()
    assert (tmp_path / "m.json").read_bytes() == b"0123456789" and os.listdir(tmp_path) == ["m.json"]


def test_atomic_write_removes_temp_when_close_reports_a_deferred_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_close = os.close

    def close_then_fail(fd: int) -> None:  # NFS reports a failed write-back at close()
        real_close(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "close", close_then_fail)
    with pytest.raises(OSError, match="Input/output"):
        atomic_write_bytes(tmp_path / "m.json", b"data")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(10)
def test_reading_refuses_symlinks_fifos_and_folders_without_blocking(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"abc")
    assert read_regular_file(real, 2) == b"ab" and sha256_and_size(real)[1] == 3
    os.symlink(real, tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name, match in (("link", "symlink"), ("fifo", "not a regular file"), ("dir", "not a regular file")):
        with pytest.raises(OSError, match=match):
            read_regular_file(tmp_path / name, 10)
        with pytest.raises(OSError, match=match):
            sha256_and_size(tmp_path / name)


@pytest.mark.parametrize("where", ["extra", "source_checkpoint"])
def test_manifest_with_nan_or_infinity_is_refused(built: Manifest, where: str) -> None:
    """json.loads accepts NaN/Infinity; such a manifest could be parsed but never written back or served."""
    text = built.to_json()
    d = json.loads(text)
    d[where]["x"] = "__NAN__"
    bad = json.dumps(d).replace('"__NAN__"', "NaN")
    with pytest.raises(ManifestError, match="JSON"):
        Manifest.from_json(bad)
    d[where]["x"] = 1.5
    assert Manifest.from_json(json.dumps(d)).to_json()


def test_file_lock_bounded_wait(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "a.lock"
    with FileLock(path) as first:
        assert first.acquired
        second = FileLock(path)
        t0 = time.monotonic()
        assert second.acquire(0.2) is False and "still held" in (second.error or "")
        assert 0.15 < time.monotonic() - t0 < 2
        with pytest.raises(LockTimeout):
            FileLock(path, 0.05, required=True).acquire()
        assert FileLock(path).acquire(5, on_wait=lambda: True) is False  # caller stops waiting early
    assert second.acquire(0) is True
    second.release()
    second.release()


# ---- property tests ----------------------------------------------------------------------------------------

if HAVE_HYPOTHESIS:
    _json = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=8,
    )

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(raw=st.binary(max_size=300))
    def test_arbitrary_manifest_bytes_never_raise_from_list(reg: Registry, built: Manifest, raw: bytes) -> None:
        reg.manifest_path(built.id).write_bytes(raw)
        [status] = reg.list()
        assert not status.ok and status.reason

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def test_mutated_manifest_dicts_raise_only_manifest_error(built: Manifest, data: Any) -> None:
        d = built.to_dict()
        section = data.draw(st.sampled_from(["top", "key", "file"]))
        target = d if section == "top" else d["key"] if section == "key" else d["files"][0]
        name = data.draw(st.sampled_from(sorted(target)))
        if data.draw(st.booleans()):
            del target[name]
        else:
            target[name] = data.draw(_json)
        try:
            parsed = Manifest.from_dict(d)
        except ManifestError:
            return
        assert parsed.id == parsed.key.engine_id()  # whatever is accepted is self-consistent
