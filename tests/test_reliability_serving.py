"""Reliability of serving, swapping and refitting.

Everything runs on CPU with the onnxruntime backend, through the real registry, verification, service and serving
code: a tiny SD1 engine is built once, and the service is driven the way A1111 drives it (make_server/activate per
SD Unet switch, begin/apply_networks/UNet calls/end per generation). Outputs are compared with a PyTorch UNet that
carries the same checkpoint and LoRA (A1111 merges LoRA into its torch weights, so a PyTorch fallback is correct).

Figures (trial counts, failures, worst lock wait) are printed as `[figure]` lines (`pytest -s`). SDTRT_LONG=1
runs the full counts (CI); without it the counts are small.
"""

from __future__ import annotations

import ast
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import sdtrt.backends.ort as ort_module
import sdtrt.webui.service as service_module
from reliability_serving_support import (
    FAKE_TRT_HEADER,
    FAULT_KINDS,
    LONG,
    FakeTrtCalls,
    Injector,
    LoraHost,
    Point,
    ToyBackend,
    ToyState,
    WaitLog,
    count,
    fake_tensorrt,
    fault,
    instrument_locks,
    make_lora,
    pick,
    report,
    toy_value,
    write_pickle_bomb,
)
from sdtrt.backends.base import BuildResult
from sdtrt.errors import EngineNotFound, NoMatchingProfile, SdtrtError
from sdtrt.pipeline.build import build_engine
from sdtrt.pipeline.checkpoint import read_unet_state_dict
from sdtrt.profiles import Profile
from sdtrt.serving.server import UnetServer
from sdtrt.serving.session import CorruptEngine, EngineSession
from sdtrt.storage.key import EngineKey
from sdtrt.storage.registry import Registry
from sdtrt.webui.jobs import DONE, FAILED
from sdtrt.webui.service import EngineService, OptionSpec, SwapFailed

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "1x64x64x75:1x64x64x75:2x64x96x150"
PROFILE_B = "1x64x64x75:2x64x64x75:2x64x64x75"  # a second engine (another id) for swaps
TOL = 1e-4


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny UNet is 10x slower with 2 threads on a shared 2-core machine (threads spin on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Cache:
    """The models folder: Unet-sdtrt holds E1 (built from sd1 seed 0) and engines derived from its files."""

    def __init__(self, root: Path, e1: str, derived: dict[str, str]) -> None:
        self.root = root
        self.cache = root / "Unet-sdtrt"
        self.e1 = e1
        self.derived = derived
        self.onnx = next((self.cache / e1).glob("*.onnx"))
        self.pristine = self.onnx.read_bytes()

    def restore(self) -> None:
        if self.onnx.read_bytes() != self.pristine:
            self.onnx.write_bytes(self.pristine)


def derive(registry: Registry, base_id: str, **changes: Any) -> str:
    """Publish an engine whose key differs from `base_id`'s (profiles, backend version, GPU...) with its files."""
    m = registry.get(base_id)
    d = m.key.to_dict()
    d.update(changes)
    key = EngineKey.from_dict(d)
    src = registry.engine_dir(base_id)
    names = [f.name for f in m.files]

    def produce(tmp: Path) -> BuildResult:
        for n in names:
            shutil.copyfile(src / n, tmp / n)
        return BuildResult(files=names, weights=key.weights, refit_mode=key.refit_mode)

    return registry.build(key, m.source_checkpoint, produce).id


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Any) -> Cache:
    root = tmp_path_factory.mktemp("rel-models")
    out = build_engine(tiny_checkpoint("sd1", 0), [Profile.parse(PROFILE)], root / "Unet-sdtrt", backend="onnxruntime")
    registry = Registry(root / "Unet-sdtrt")
    e1 = out.manifest.id
    derived = {
        "b": derive(registry, e1, profiles=[PROFILE_B]),
        "foreign-version": derive(registry, e1, backend_version="0.0.0-foreign"),
        "foreign-gpu": derive(registry, e1, device="NVIDIA H100 80GB HBM3 (sm90)", compute_capability="9.0"),
    }
    return Cache(root, e1, derived)


@pytest.fixture(scope="module")
def lora_sets(tiny_checkpoint: Any) -> dict[str, dict[str, torch.Tensor]]:
    sd = read_unet_state_dict(tiny_checkpoint("sd1", 0))
    attn = sorted(n for n in sd if n.endswith(("attn2.to_v.weight", "attn1.to_q.weight")))
    conv = sorted(n for n in sd if n.endswith("in_layers.2.weight"))
    return {"a": make_lora(sd, attn[:2] + conv[:1], 1), "b": make_lora(sd, attn[1:3], 2)}


@pytest.fixture
def host(cache: Cache, tiny_checkpoint: Any, lora_sets: dict[str, dict[str, torch.Tensor]],
         monkeypatch: pytest.MonkeyPatch) -> Iterator[LoraHost]:
    monkeypatch.delenv("SDTRT_CACHE", raising=False)
    cache.restore()
    h = LoraHost(cache.root)
    h.loras = dict(lora_sets)
    h.add_checkpoint(tiny_checkpoint("sd1", 0), load=True)
    h.add_checkpoint(tiny_checkpoint("sd1", 1))
    yield h
    cache.restore()


@pytest.fixture
def svc(host: LoraHost) -> Iterator[EngineService]:
    s = EngineService()
    s.attach(host)
    yield s
    s.shutdown(timeout=5)


X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
T = torch.tensor([999.0, 500.5])
C = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(8))


class Refs:
    """PyTorch outputs for (checkpoint, LoRA set) on the fixed inputs."""

    def __init__(self, host: LoraHost) -> None:
        self.host = host
        self._cache: dict[tuple[str, str | None], torch.Tensor] = {}

    def __call__(self, lora: str | None, ckpt: str | None = None) -> torch.Tensor:
        assert self.host.loaded is not None
        key = (ckpt or self.host.loaded.filename, lora)
        if key not in self._cache:
            loaded = self.host.loaded
            if ckpt is not None and ckpt != loaded.filename:
                self.host.loaded = next(r for r in self.host.refs if r.filename == ckpt)
            try:
                with torch.no_grad():
                    self._cache[key] = self.host.reference_unet(lora)(X, T, C)
            finally:
                self.host.loaded = loaded
        return self._cache[key]


def spec_for(engine_id: str) -> OptionSpec:
    return OptionSpec(f"[TRT] {engine_id}", None, (engine_id,))


def counters_delta(svc: EngineService, before: dict[str, Any]) -> dict[str, int]:
    after = svc.counters.snapshot()
    return {k: after[k] - before[k] for k in ("engine_calls", "fallback_calls", "refits")}


def generation(svc: EngineService, server: UnetServer, calls: int = 2) -> tuple[list[torch.Tensor], dict[str, int]]:
    """One A1111 generation: begin, LoRA activation, UNet calls, end."""
    before = svc.counters.snapshot()
    p = object()
    svc.begin(p)
    try:
        svc.apply_networks()
        outs = [server(X, T, C) for _ in range(calls)]
    finally:
        svc.end(p)
    return outs, counters_delta(svc, before)


def switch(svc: EngineService, spec: OptionSpec) -> UnetServer:
    """A1111's apply_unet: the old UNet is deactivated, then the new one created and activated."""
    if svc.active is not None:
        svc.deactivate(svc.active)
    server = svc.make_server(spec)
    svc.activate(server, spec.label)
    return server


def assert_all_close(outs: list[torch.Tensor], want: torch.Tensor) -> None:
    for out in outs:
        torch.testing.assert_close(out, want, rtol=TOL, atol=TOL)


DESERIALIZE = [
    Point("OrtBackend.load", ort_module.OrtBackend, "load"),
    Point("OrtRunner.__init__", ort_module.OrtRunner, "__init__"),
]


@pytest.fixture
def deserialize_counter() -> Iterator[Injector]:
    """Counts every entry into the backend's load / deserialization (onnx.load and InferenceSession included)."""
    import onnx
    import onnxruntime

    inj = Injector()
    inj.wrap([*DESERIALIZE, Point("onnx.load", onnx, "load"),
              Point("InferenceSession", onnxruntime, "InferenceSession")])
    inj.count_only()
    yield inj
    inj.restore()


# ---- bad plans are refused before deserialization ----------------------------------------------------------------
def corruptions(data: bytes, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    for _ in range(count(10, 50)):
        yield "truncated", data[: rng.randrange(0, len(data))]
    for _ in range(count(10, 50)):
        pos = rng.randrange(len(data))
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        yield "bit-flipped", bytes(flipped)
    yield "empty", b""


@pytest.mark.timeout(600)
def test_bad_plans_are_refused_before_deserialization_and_pytorch_serves(
        cache: Cache, host: LoraHost, deserialize_counter: Injector) -> None:
    refs = Refs(host)
    want = refs(None)
    rng = random.Random(6)
    tally: dict[str, int] = {}
    failures: list[str] = []
    start = time.perf_counter()
    for kind, data in corruptions(cache.pristine, rng):
        cache.onnx.write_bytes(data)
        deserialize_counter.count_only()
        svc = EngineService()
        svc.attach(host)
        try:
            server = switch(svc, spec_for(cache.e1))  # selected before the damage: the dropdown still had it
            outs, delta = generation(svc, server)
            reasons = svc.counters.snapshot()["fallback_reasons"]
            rows = {r.id: r for r in svc.engine_rows()}
            problems = []
            if sum(deserialize_counter.calls.values()):
                problems.append(f"deserialized: {deserialize_counter.calls}")
            if delta != {"engine_calls": 0, "fallback_calls": 2, "refits": 0}:
                problems.append(f"counters {delta}")
            if not all(torch.equal(o, want) for o in outs):
                problems.append("output is not PyTorch's")
            if not any(("sha256" in r or "bytes but the manifest says" in r) for r in reasons):
                problems.append(f"reason not given: {reasons}")
            if not host.told or "PyTorch" not in host.told[-1][1]:
                problems.append("user not told")
            if rows[cache.e1].ok or cache.e1 in {s.engine_ids[0] for s in svc.unet_options()}:
                problems.append("still listed as usable")
            if not (cache.cache / cache.e1).is_dir():
                problems.append("engine folder gone (deleted?)")
            if problems:
                failures.append(f"{kind} ({len(data)} bytes): {'; '.join(problems)}")
        except Exception as e:  # noqa: BLE001 - a crash is a failure to count, with its reason
            failures.append(f"{kind}: crashed with {type(e).__name__}: {e}")
        finally:
            svc.shutdown(timeout=5)
        tally[kind] = tally.get(kind, 0) + 1
    cache.restore()
    report("bad plans", **tally, failures=len(failures), seconds=round(time.perf_counter() - start, 1))
    assert not failures, failures[:5]
    # control: the pristine plan does reach the backend, so the zero above means something
    deserialize_counter.count_only()
    svc = EngineService()
    svc.attach(host)
    try:
        outs, delta = generation(svc, switch(svc, spec_for(cache.e1)))
        assert deserialize_counter.calls.get("OrtBackend.load") == 1 and delta["engine_calls"] == 2
        assert_all_close(outs, want)
    finally:
        svc.shutdown()


@pytest.mark.parametrize("which", ["foreign-version", "foreign-gpu"])
def test_foreign_version_or_gpu_is_refused_before_deserialization_and_offered_for_rebuild(
        cache: Cache, host: LoraHost, svc: EngineService, deserialize_counter: Injector, which: str) -> None:
    engine_id = cache.derived[which]
    rows = {r.id: r for r in svc.engine_rows()}
    assert not rows[engine_id].ok and "built with onnxruntime" in rows[engine_id].reason
    assert engine_id not in {i for s in svc.unet_options() for i in s.engine_ids}  # never offered
    server = switch(svc, spec_for(engine_id))  # chosen anyway (by the API, or selected before an upgrade)
    outs, delta = generation(svc, server)
    assert sum(deserialize_counter.calls.values()) == 0
    assert delta == {"engine_calls": 0, "fallback_calls": 2, "refits": 0}
    assert all(torch.equal(o, Refs(host)(None)) for o in outs)
    [reason] = svc.counters.snapshot()["fallback_reasons"]
    assert "stale" in reason and "rebuild it for this machine" in reason

    assert svc.builds.manifest_even_if_stale(engine_id).id == engine_id  # what rebuild() starts from: still readable


def test_bit_flipped_plan_is_quarantined_by_the_rebuild_not_deleted(
        cache: Cache, host: LoraHost, tmp_path: Path) -> None:
    """The load refuses it and lists it as damaged; Rebuild moves the damaged folder aside (bytes kept) and
    publishes a good engine under the same id."""
    models = tmp_path / "models"
    shutil.copytree(cache.cache / cache.e1, models / "Unet-sdtrt" / cache.e1)
    onnx = models / "Unet-sdtrt" / cache.e1 / cache.onnx.name
    flipped = bytearray(cache.pristine)
    flipped[len(flipped) // 2] ^= 0x10
    onnx.write_bytes(bytes(flipped))
    h = LoraHost(models, refs=host.refs, loaded=host.loaded, unet=host.unet)
    svc = EngineService()
    svc.attach(h)
    try:
        with pytest.raises(CorruptEngine, match="never deserialized"):
            EngineSession.open(svc.registry(), cache.e1)
        switch(svc, spec_for(cache.e1))
        row = {r.id: r for r in svc.engine_rows()}[cache.e1]
        assert not row.ok and "sha256" in row.reason and "moved aside" in row.reason
        svc.deactivate(svc.active)  # type: ignore[arg-type]
        job = svc.jobs.wait(svc.rebuild(cache.e1).id, timeout=300)
        assert job.state == DONE, job.error
        [quarantined] = list((models / "Unet-sdtrt").glob(f".quarantine-{cache.e1}-*"))
        assert (quarantined / onnx.name).read_bytes() == bytes(flipped)  # kept for inspection, not deleted
        assert {r.id: r for r in svc.engine_rows()}[cache.e1].ok
        outs, delta = generation(svc, switch(svc, spec_for(cache.e1)))
        assert delta["engine_calls"] == 2
        assert_all_close(outs, Refs(host)(None))
    finally:
        svc.shutdown()


def test_runtime_returning_none_is_a_clean_error_and_fallback(
        cache: Cache, host: LoraHost, svc: EngineService, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    for where in ("InferenceSession", "OrtBackend.load"):
        with monkeypatch.context() as m:
            if where == "InferenceSession":
                m.setattr(onnxruntime, "InferenceSession", lambda *a, **k: None)
            else:
                m.setattr(ort_module.OrtBackend, "load", lambda self, *a, **k: None)
            server = switch(svc, spec_for(cache.e1))
            outs, delta = generation(svc, server)
        assert delta == {"engine_calls": 0, "fallback_calls": 2, "refits": 0}, where
        assert all(torch.equal(o, Refs(host)(None)) for o in outs)
        assert "returned no" in (svc.counters.snapshot()["last_error"] or ""), where
        svc.deactivate(server)


def test_a_read_error_is_not_taken_for_damage(cache: Cache, host: LoraHost, svc: EngineService,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error while hashing (a flaky network file system) refuses this load only: the engine is not listed
    as damaged, and the next activation serves from it."""
    import errno

    import sdtrt.storage.inspection

    def eio(path: Any) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(sdtrt.storage.inspection, "sha256_and_size", eio)
        outs, delta = generation(svc, switch(svc, spec_for(cache.e1)))
    assert delta == {"engine_calls": 0, "fallback_calls": 2, "refits": 0}
    assert "cannot read" in next(iter(svc.counters.snapshot()["fallback_reasons"]))
    assert {r.id: r for r in svc.engine_rows()}[cache.e1].ok
    outs, delta = generation(svc, switch(svc, spec_for(cache.e1)))
    assert delta["engine_calls"] == 2
    assert_all_close(outs, Refs(host)(None))


# ---- TensorRT / TensorRT-RTX through backends/tensorrt/ with a fake library --------------------------------------------
@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[bool], FakeTrtCalls]]:
    """Installs a fake `tensorrt` module and a fake GPU; yields make(rtx_validity) -> FakeTrtCalls."""
    import sdtrt.backends.tensorrt.library as trt_backend

    monkeypatch.setattr(trt_backend, "_BOUND", {})
    monkeypatch.setattr(trt_backend, "_cuda_device", lambda: ("Fake GPU", 8, 9))
    calls = FakeTrtCalls()

    def make(rtx_validity: bool) -> FakeTrtCalls:
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.99.0", calls, rtx_validity=rtx_validity))
        trt_backend._BOUND.clear()  # the next handle is made over the fake module
        return calls

    yield make


def trt_engine(cache: Cache, root: Path, plan: bytes, version: str = "10.99.0") -> str:
    registry = Registry(root / "Unet-sdtrt")
    m = Registry(cache.cache).get(cache.e1)
    d = m.key.to_dict()
    d.update(backend="tensorrt", backend_version=version, device="Fake GPU (sm89)", compute_capability="8.9")
    key = EngineKey.from_dict(d)

    def produce(tmp: Path) -> BuildResult:
        (tmp / "unet.plan").write_bytes(plan)
        return BuildResult(files=["unet.plan"], weights=key.weights, refit_mode=key.refit_mode)

    return registry.build(key, m.source_checkpoint, produce).id


@pytest.mark.parametrize("case", ["runtime-returns-none", "rtx-foreign-header", "manifest-other-version",
                                  "bit-flipped", "empty"])
def test_tensorrt_plans_are_refused_cleanly(case: str, cache: Cache, host: LoraHost, tmp_path: Path,
                                            fake_trt: Callable[[bool], FakeTrtCalls]) -> None:
    calls = fake_trt(case == "rtx-foreign-header")
    good = FAKE_TRT_HEADER + bytes(range(256)) * 4
    plan = b"FOREIGN-TRT-PLAN v8.6\n" + good[22:] if case == "rtx-foreign-header" else good
    engine_id = trt_engine(cache, tmp_path, plan, "10.98.0" if case == "manifest-other-version" else "10.99.0")
    engine_file = tmp_path / "Unet-sdtrt" / engine_id / "unet.plan"
    if case == "bit-flipped":
        engine_file.write_bytes(good[:100] + bytes([good[100] ^ 4]) + good[101:])
    elif case == "empty":
        engine_file.write_bytes(b"")
    h = LoraHost(tmp_path, refs=host.refs, loaded=host.loaded, unet=host.unet)
    svc = EngineService()
    svc.attach(h)
    try:
        outs, delta = generation(svc, switch(svc, spec_for(engine_id)))
        assert delta == {"engine_calls": 0, "fallback_calls": 2, "refits": 0}
        assert all(torch.equal(o, Refs(host)(None)) for o in outs)
        reason = next(iter(svc.counters.snapshot()["fallback_reasons"]))
    finally:
        svc.shutdown()
    expected = {
        "runtime-returns-none": (1, "refused"),  # standard TensorRT: no preflight; None is turned into an error
        "rtx-foreign-header": (0, "cannot run"),  # TensorRT-RTX's header check, before deserializing
        "manifest-other-version": (0, "stale"),  # the manifest names another TensorRT: never read
        "bit-flipped": (0, "sha256"),
        "empty": (0, "bytes but the manifest says"),
    }[case]
    assert calls.deserialize == expected[0], reason
    assert expected[1] in reason and "rebuild" in reason.lower()
    report(f"TensorRT plan '{case}'", deserialize_calls=calls.deserialize, validity_calls=calls.validity)


def test_tensorrt_plan_replaced_between_verify_and_read_is_never_deserialized(
        cache: Cache, host: LoraHost, tmp_path: Path, fake_trt: Callable[[bool], FakeTrtCalls],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes TensorRT deserializes are the bytes whose sha256 matches the manifest. A writer that swaps the
    plan (same size) right after the on-disk check is caught on the bytes in memory."""
    calls = fake_trt(False)
    good = FAKE_TRT_HEADER + bytes(range(256)) * 4
    engine_id = trt_engine(cache, tmp_path, good)
    engine_file = tmp_path / "Unet-sdtrt" / engine_id / "unet.plan"
    verify = Registry.verify

    def verify_then_swap(self: Registry, *args: Any, **kwargs: Any) -> Any:
        out = verify(self, *args, **kwargs)
        engine_file.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size: a size check cannot see it
        return out

    monkeypatch.setattr(Registry, "verify", verify_then_swap)
    h = LoraHost(tmp_path, refs=host.refs, loaded=host.loaded, unet=host.unet)
    svc = EngineService()
    svc.attach(h)
    try:
        outs, delta = generation(svc, switch(svc, spec_for(engine_id)))
        assert delta["engine_calls"] == 0 and delta["fallback_calls"] == 2
        assert all(torch.equal(o, Refs(host)(None)) for o in outs)
        reason = next(iter(svc.counters.snapshot()["fallback_reasons"]))
    finally:
        svc.shutdown()
    assert calls.deserialize == 0, reason
    assert "changed after it was verified" in reason and "rebuild" in reason.lower()


# ---- LoRA as .pt/.ckpt is refused, never unpickled ------------------------------------------------------
@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any unpickling (pickle, torch.load) during the test is recorded and refused."""
    seen: list[str] = []

    def tripwire(name: str) -> Callable[..., Any]:
        def refuse(*a: Any, **k: Any) -> Any:
            seen.append(name)
            raise AssertionError(f"{name} was called")
        return refuse

    for mod, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, attr, tripwire(f"{mod.__name__}.{attr}"))
    return seen


def test_pickle_bomb_fixture_really_goes_off(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    bomb = write_pickle_bomb(tmp_path / "bomb.pt", canary)
    pickle.loads(bomb.read_bytes())  # what torch.load(weights_only=False) would do
    assert canary.exists()


@pytest.mark.parametrize("name", ["bomb.pt", "bomb.ckpt", "bomb.pth", "bomb.bin", "bomb-renamed.safetensors"])
def test_headless_lora_pickles_are_refused_never_unpickled(name: str, cache: Cache, tiny_checkpoint,
                                                                 tmp_path: Path, no_unpickling: list[str]) -> None:
    from sdtrt.pipeline.lora import LoraError, LoraSpec, read_lora
    from sdtrt.profiles import Shape
    from sdtrt.tools.check import check_engine
    from sdtrt.tools.cli import main

    canary = tmp_path / "canary"
    bomb = write_pickle_bomb(tmp_path / name, canary)
    needle = "not a valid safetensors" if name.endswith(".safetensors") else "pickle"
    with pytest.raises(LoraError, match=needle):
        read_lora(bomb)
    with pytest.raises(LoraError, match=needle):
        check_engine(cache.cache, cache.e1, tiny_checkpoint("sd1", 0), [Shape.parse("1x64x64x75")],
                     loras=[LoraSpec(bomb)], repeats=1)
    code = main(["check", cache.e1, "--cache", str(cache.cache), "--checkpoint", str(tiny_checkpoint("sd1", 0)),
                 "--shape", "1x64x64x75", "--lora", f"{bomb}:0.7"])
    assert code != 0
    assert not canary.exists() and no_unpickling == []


def test_webui_refit_refuses_networks_from_pickle_files(cache: Cache, host: LoraHost, svc: EngineService,
                                                              tmp_path: Path, no_unpickling: list[str]) -> None:
    canary = tmp_path / "canary"
    bomb = write_pickle_bomb(tmp_path / "style.pt", canary)
    server = switch(svc, spec_for(cache.e1))
    host.lora, host.files = "a", [str(bomb)]
    outs, delta = generation(svc, server)
    assert delta["engine_calls"] == 0 and delta["refits"] == 0
    assert_all_close(outs, Refs(host)("a"))  # PyTorch, with the LoRA as the host applied it
    told = host.told[-1][1]
    assert "style.pt" in told and "pickle" in told and "only .safetensors" in told
    host.files = [str(tmp_path / "style.safetensors")]
    outs, delta = generation(svc, server)
    assert delta["engine_calls"] == 2
    assert_all_close(outs, Refs(host)("a"))
    assert not canary.exists() and no_unpickling == []


PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unpickling_calls(source: str, filename: str = "<src>") -> list[str]:
    """Calls and imports that can unpickle: torch.load, pickle.load(s), Unpickler, np.load(allow_pickle=True),
    torch.jit.load, and any import of a pickle-like module."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for mod in mods:
                if mod.split(".")[0] in PICKLE_MODULES:
                    found.append(f"{filename}:{node.lineno}: import {mod}")
        elif isinstance(node, ast.Call):
            text = ast.unparse(node.func)
            if text.endswith(("torch.load", "pickle.load", "pickle.loads", "Unpickler", "jit.load", "serialization.load")):
                found.append(f"{filename}:{node.lineno}: {text}()")
            for kw in node.keywords:
                if (kw.arg, ast.unparse(kw.value)) in (("allow_pickle", "True"), ("weights_only", "False")):
                    found.append(f"{filename}:{node.lineno}: {kw.arg}={ast.unparse(kw.value)}")
    return found


def test_nothing_in_the_extension_can_unpickle() -> None:
    assert unpickling_calls("import torch\nsd = torch.load('x.pt', weights_only=False)\n") == [
        "<src>:2: torch.load()", "<src>:2: weights_only=False"]  # the scan finds what it looks for
    assert unpickling_calls("from pickle import loads\nimport numpy as np\nnp.load('a', allow_pickle=True)")
    files = sorted((ROOT / "extension" / "sdtrt").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in unpickling_calls(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert found == []


# ---- a LoRA with wrong names or shapes aborts the refit; the previous weights stay ----------------------
def test_lora_with_wrong_names_or_shapes_aborts_the_refit_and_previous_weights_stay(
        cache: Cache, host: LoraHost, svc: EngineService, lora_sets: dict[str, dict[str, torch.Tensor]]) -> None:
    refs = Refs(host)
    server = switch(svc, spec_for(cache.e1))
    host.lora = "a"
    outs, delta = generation(svc, server)
    assert delta == {"engine_calls": 2, "fallback_calls": 0, "refits": 1}
    assert_all_close(outs, refs("a"))
    assert (outs[0] - refs(None)).abs().max() > 10 * TOL  # the LoRA visibly changes the output
    name = min(lora_sets["b"])
    host.lora = "b"
    assert host.loaded is not None
    merged_b = host.network_weights(lambda names: read_unet_state_dict(Path(host.loaded.filename), names=names))
    host.raw = {
        "wrong-names": {"input_blocks.99.0.weight": torch.zeros(3), "middle_block.7.proj.weight": torch.zeros(2, 2)},
        "wrong-shape": {name: torch.zeros(3, 3)},
        "half-right": {**merged_b, "output_blocks.42.weight": torch.zeros(1)},  # b plus one unknown name
        "right-size-wrong-layout": {name: merged_b[name].reshape(-1)[: merged_b[name].numel() - 1]},
    }
    for kind in host.raw:
        host.lora = kind
        outs, delta = generation(svc, server)
        assert delta == {"engine_calls": 0, "fallback_calls": 2, "refits": 0}, kind
        assert all(torch.equal(o, refs(None)) for o in outs), kind  # PyTorch, which skipped the broken LoRA
        told = host.told[-1][1]
        assert "could not be put into the engine" in told and ("no engine weight" in told or "shape" in told), told
        host.lora = "a"  # back to the previous set: no refit, the engine still holds exactly a's weights
        outs, delta = generation(svc, server)
        assert delta == {"engine_calls": 2, "fallback_calls": 0, "refits": 0}, kind
        assert_all_close(outs, refs("a"))


# ---- a refit during inference from another thread is serialized: never mixed weights ---------------------
def classify(out: torch.Tensor, valid: dict[str | None, torch.Tensor]) -> str:
    for name, want in valid.items():
        if torch.allclose(out, want, rtol=TOL, atol=TOL):
            return str(name)
    return "mixed"


@pytest.mark.timeout(300)
def test_refit_from_another_thread_never_mixes_weights(cache: Cache, host: LoraHost,
                                                             svc: EngineService) -> None:
    from sdtrt.serving.slot import NetworkSet

    refs = Refs(host)
    valid = {None: refs(None), "a": refs("a"), "b": refs("b")}
    server = switch(svc, spec_for(cache.e1))
    outputs: list[torch.Tensor] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def calls() -> None:
        try:
            while not stop.is_set():
                outputs.append(server(X, T, C))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    worker = threading.Thread(target=calls, name="unet-call")
    worker.start()
    refits = count(4, 30)
    try:
        for i in range(refits):
            host.lora = ("a", "b", None)[i % 3]
            server.set_networks(NetworkSet(host.network_key(), host.network_weights))
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(60)
    kinds = [classify(o, valid) for o in outputs]
    tally = {k: kinds.count(k) for k in sorted(set(kinds))}
    report("refit during inference (onnxruntime)", refits=refits, calls=len(outputs), **tally)
    assert not errors and "mixed" not in tally and len(tally) >= 2


@pytest.fixture
def toy(cache: Cache, host: LoraHost, lora_sets: dict[str, dict[str, torch.Tensor]],
        monkeypatch: pytest.MonkeyPatch) -> dict[str | None, float]:
    """Engines load as ToyRunners (non-atomic, in-place refit); returns the value of each consistent state."""
    import sdtrt.serving.session as runtime_module

    names = sorted({n for d in lora_sets.values() for n in d})
    base = read_unet_state_dict(Path(host.loaded.filename), names=names)  # type: ignore[union-attr]
    rng = random.Random(3)
    state = ToyState(names, base, {n: rng.uniform(0.5, 2.0) for n in names})
    monkeypatch.setattr(ToyBackend, "state", state)
    monkeypatch.setattr(runtime_module, "backend_class", lambda name: ToyBackend)
    from sdtrt.pipeline.refit import merge

    values: dict[str | None, float] = {None: toy_value(state, base)}
    for lora, deltas in lora_sets.items():
        values[lora] = toy_value(state, {**base, **{n: merge(base[n], d) for n, d in deltas.items()}})
    monkeypatch.setattr(host, "torch_forward", lambda unet: (
        lambda x, *a, **k: torch.full(x.shape, values[host.lora], dtype=x.dtype)))
    return values


def toy_kind(out: torch.Tensor, values: dict[str | None, float]) -> str:
    v = float(out.flatten()[0])
    for name, want in values.items():
        if abs(v - want) <= 1e-5 * max(1.0, abs(want)):
            return str(name)
    return "mixed"


@pytest.mark.timeout(300)
def test_toy_engine_detects_mixing_and_the_session_lock_prevents_it(
        cache: Cache, host: LoraHost, svc: EngineService, toy: dict[str | None, float],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same race on an engine whose refit writes weight by weight: with the session lock no call ever sees a
    mix; with the lock switched off the detector does see mixes (so the zero above is meaningful)."""
    import contextlib as cl

    from sdtrt.serving.session import EngineSession as Session
    from sdtrt.serving.slot import NetworkSet

    ToyBackend.state.pause = 0.0005  # type: ignore[union-attr]
    seconds = 1.5 if not LONG else 6.0

    def race() -> dict[str, int]:
        server = switch(svc, spec_for(cache.e1))
        outs: list[torch.Tensor] = []
        stop = threading.Event()

        def calls() -> None:
            while not stop.is_set():
                outs.append(server(X, T, C))

        worker = threading.Thread(target=calls, name="unet-call")
        worker.start()
        end = time.monotonic() + seconds
        i = 0
        try:
            while time.monotonic() < end:
                host.lora = ("a", "b", None)[i % 3]
                server.set_networks(NetworkSet(host.network_key(), host.network_weights))
                i += 1
        finally:
            stop.set()
            worker.join(60)
        kinds = [toy_kind(o, toy) for o in outs]
        return {k: kinds.count(k) for k in sorted(set(kinds))} | {"refits": i}

    locked = race()
    with monkeypatch.context() as m:
        m.setattr(Session, "hold", lambda self, timeout=None: cl.nullcontext(self))
        unlocked = race()
    report("toy engine (non-atomic refit)", with_lock=locked, without_lock=unlocked)
    assert locked.get("mixed", 0) == 0 and sum(v for k, v in locked.items() if k != "refits") > 10
    assert unlocked.get("mixed", 0) > 0, "the detector saw no mix without the lock: the race was not exercised"


# ---- injected failures in swap and refit leave the previous UNet serving -----------------------------------------
def injection_points(host: LoraHost) -> dict[str, list[Point]]:
    import onnx
    import onnx.numpy_helper
    import onnxruntime

    import sdtrt.pipeline.checkpoint
    import sdtrt.pipeline.families
    import sdtrt.pipeline.refit
    import sdtrt.storage.inspection
    import sdtrt.storage.registry
    from sdtrt.backends.ort import OrtBackend, OrtRunner

    onnx_load = Point("onnx.load", onnx, "load")
    from_array = Point("onnx.numpy_helper.from_array (per weight)", onnx.numpy_helper, "from_array")
    session = Point("onnxruntime.InferenceSession", onnxruntime, "InferenceSession")
    read = Point("checkpoint.read_unet_state_dict (weight loading)", sdtrt.pipeline.checkpoint, "read_unet_state_dict")
    backend_refit = Point("OrtRunner.refit", OrtRunner, "refit")
    points = {
        "lora": [Point("host.network_weights (LoRA maths)", host, "network_weights"),
                 Point("WeightTracker.plan (refit plan)", sdtrt.pipeline.refit.WeightTracker, "plan"),
                 Point("EngineSession.apply_deltas", EngineSession, "apply_deltas"),
                 read, backend_refit, onnx_load, from_array, session],
        "checkpoint": [Point("checkpoint.file_sha256", sdtrt.pipeline.checkpoint, "file_sha256"),
                       Point("families.detect", sdtrt.pipeline.families, "detect"),
                       Point("EngineSession.load_weights", EngineSession, "load_weights"),
                       read, backend_refit, onnx_load, from_array, session],
        "swap": [Point("Registry.get", sdtrt.storage.registry.Registry, "get"),
                 Point("Registry.verify", sdtrt.storage.registry.Registry, "verify"),
                 Point("inspection.sha256_and_size", sdtrt.storage.inspection, "sha256_and_size"),
                 Point("EngineSession.open", EngineSession, "open"),
                 Point("OrtBackend.load", OrtBackend, "load"),
                 Point("OrtRunner.__init__", OrtRunner, "__init__"),
                 Point("EngineSession.close", EngineSession, "close"),
                 Point("EngineSession.load_weights", EngineSession, "load_weights"),
                 read, onnx_load, session, from_array, backend_refit],
        "delete": [Point("Registry.delete", sdtrt.storage.registry.Registry, "delete"),
                   Point("EngineSession.close", EngineSession, "close")],
    }
    points["swap-a1111"] = points["swap"]
    return points


class SwapFaults:
    """The randomized trials: state, ops, checks."""

    def __init__(self, cache: Cache, host: LoraHost, svc: EngineService, rng: random.Random) -> None:
        self.cache, self.host, self.svc, self.rng = cache, host, svc, rng
        self.refs = Refs(host)
        self.specs = [spec_for(cache.e1), spec_for(cache.derived["b"])]
        self.spec = self.specs[0]
        self.server = switch(svc, self.spec)
        self.ckpts = [r for r in host.refs]
        self.failures: list[str] = []
        self.outcomes: dict[str, int] = {}

    def note(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def fail(self, text: str) -> None:
        self.failures.append(text)

    def check(self, what: str, outs: list[torch.Tensor], lora: str | None, *, delta: dict[str, int] | None = None,
              engine: bool | None = None, refits: int | None = None) -> None:
        want = self.refs(lora)
        if not all(torch.allclose(o, want, rtol=TOL, atol=TOL) for o in outs):
            self.fail(f"{what}: output is not the UNet of {Path(self.host.loaded.filename).stem} + LoRA {lora}")  # type: ignore[union-attr]
        if delta is not None and engine and delta["engine_calls"] != len(outs):
            self.fail(f"{what}: not served by the engine: {delta}")
        if delta is not None and refits is not None and delta["refits"] != refits:
            self.fail(f"{what}: {delta['refits']} refits, expected {refits} (previous weights not kept)")

    def op_lora(self) -> None:
        prev = self.host.lora
        self.host.lora = pick(self.rng, [n for n in (None, "a", "b") if n != prev])
        outs, _ = generation(self.svc, self.server)
        self.check("generation with the new LoRA", outs, self.host.lora)
        if self.fired:
            self.host.lora = prev
            outs, delta = generation(self.svc, self.server)
            self.check("previous LoRA after the failed refit", outs, prev, delta=delta, engine=True, refits=0)

    def load(self, ref: Any) -> None:
        with self.inj.paused():  # the host's own model load is not ours to fault
            self.host.load(ref)

    def op_checkpoint(self) -> None:
        prev = self.host.loaded
        self.load(pick(self.rng, [r for r in self.ckpts if r is not prev]))
        self.server = switch(self.svc, self.spec)
        outs, _ = generation(self.svc, self.server)
        self.check("generation on the new checkpoint", outs, self.host.lora)
        if self.fired:
            self.load(prev)
            self.server = switch(self.svc, self.spec)
            outs, delta = generation(self.svc, self.server)
            self.check("previous checkpoint after the failed refit", outs, self.host.lora, delta=delta, engine=True,
                       refits=0)

    def op_swap(self) -> None:
        """A direct switch from the active server (the API, or any caller that does not deactivate first)."""
        target = pick(self.rng, [s for s in self.specs if s is not self.spec])
        prev = self.server
        new = self.svc.make_server(target)
        try:
            self.svc.activate(new, target.label)
        except SwapFailed as e:
            if self.svc.active is not prev:
                self.fail(f"swap failed ({e}) but the previous server is not active")
            outs, delta = generation(self.svc, prev)
            self.check("previous server after the failed swap", outs, self.host.lora, delta=delta, engine=True)
            self.note("swap failed, previous kept")
            return
        self.server, self.spec = new, target
        outs, delta = generation(self.svc, new)
        self.check("new server", outs, self.host.lora, delta=delta, engine=True)
        self.note("swap done" + (" (fault after the switch, handled)" if self.fired else ""))

    def op_swap_a1111(self) -> None:
        target = pick(self.rng, [s for s in self.specs if s is not self.spec])
        prev_spec = self.spec
        self.server, self.spec = switch(self.svc, target), target
        outs, _ = generation(self.svc, self.server)
        self.check("new option (engine or PyTorch)", outs, self.host.lora)
        if self.fired:
            self.server, self.spec = switch(self.svc, prev_spec), prev_spec
            outs, delta = generation(self.svc, self.server)
            self.check("previous option switched back", outs, self.host.lora, delta=delta, engine=True)

    def op_delete(self) -> None:
        registry = self.svc.registry()
        victim = derive(registry, self.cache.e1, profiles=[f"1x64x64x75:1x64x64x75:{self.rng.randint(2, 9)}x64x64x75"])
        try:
            self.svc.delete(victim)
        except SdtrtError:
            if not self.fired:
                raise
        finally:
            self.inj.disarm()
            try:
                registry.delete(victim)
            except EngineNotFound:
                pass
        outs, delta = generation(self.svc, self.server)
        self.check("active server after the delete", outs, self.host.lora, delta=delta, engine=True)

    @property
    def fired(self) -> bool:
        return bool(self.inj.fired)

    inj: Injector


@pytest.mark.timeout(900)
def test_injected_swap_and_refit_failures_leave_the_previous_unet_serving(
        cache: Cache, host: LoraHost, svc: EngineService) -> None:
    trials = count(12, 200)
    rng = random.Random(2024)
    points = injection_points(host)
    unique: dict[tuple[int, str], Point] = {}
    for ps in points.values():
        for p in ps:
            unique.setdefault((id(p.owner), p.attr), p)
    inj = Injector()
    inj.wrap(list(unique.values()))
    g6 = SwapFaults(cache, host, svc, rng)
    g6.inj = inj
    with inj.paused():
        for ref in host.refs:  # every reference computed up front, outside the faults
            g6.load(ref)
            for lora in (None, "a", "b"):
                g6.refs(lora)
        g6.load(host.refs[0])
    ops = {"lora": g6.op_lora, "checkpoint": g6.op_checkpoint, "swap": g6.op_swap, "swap-a1111": g6.op_swap_a1111,
           "delete": g6.op_delete}
    weights = {"lora": 3, "checkpoint": 2, "swap": 2, "swap-a1111": 2, "delete": 1}
    # calibration: how often each op passes each point, so the n-th call to fault is drawn from calls that happen
    calib: dict[str, dict[str, int]] = {}
    start = time.perf_counter()
    try:
        for op, run_op in ops.items():
            for _ in range(2):
                inj.count_only()
                run_op()
                for k, v in inj.calls.items():
                    calib.setdefault(op, {})[k] = max(calib.get(op, {}).get(k, 0), v)
        assert not g6.failures, g6.failures
        fired = 0
        per_op: dict[str, int] = {}
        for trial in range(trials):
            op = rng.choices(list(weights), weights=list(weights.values()))[0]
            names = [p.name for p in points[op] if calib.get(op, {}).get(p.name, 0) > 0]
            point = pick(rng, names)
            hit = rng.randint(1, calib[op][point])
            kind = pick(rng, FAULT_KINDS)
            inj.arm(point, hit, fault(kind, point))
            before = len(g6.failures)
            try:
                ops[op]()
            except Exception as e:  # noqa: BLE001 - any escape is a failure, with its trial
                g6.fail(f"{op}: {type(e).__name__}: {e}")
            finally:
                was_fired = bool(inj.fired)
                inj.count_only()
            fired += was_fired
            per_op[op] = per_op.get(op, 0) + 1
            if len(g6.failures) > before:
                g6.failures[before:] = [f"trial {trial} {op} fault {kind} at {point} call {hit} "
                                        f"(fired={was_fired}): {f}" for f in g6.failures[before:]]
            # the active server, whatever happened, serves the current state correctly from its engine
            if not g6.failures[before:]:
                outs, delta = generation(svc, g6.server)
                g6.check(f"trial {trial} {op} at {point}: the serving UNet afterwards", outs, host.lora, delta=delta,
                         engine=True)
    finally:
        inj.restore()
    report("swap/refit/delete faults", trials=trials, faults_fired=fired, per_op=per_op,
           outcomes=g6.outcomes, failures=len(g6.failures), seconds=round(time.perf_counter() - start, 1))
    assert not g6.failures, "\n".join(g6.failures[:20])
    assert fired >= trials * 0.8


# ---- builds: a failed build or export leaves the active engine serving ------------------------------------------
def build_points() -> list[Point]:
    import sdtrt.fsutil
    import sdtrt.pipeline.build
    import sdtrt.storage.publish
    from sdtrt.backends.ort import OrtBackend

    points = [Point("pipeline.export_unet", sdtrt.pipeline.build, "export_unet"),
              Point("torch.onnx.export", torch.onnx, "export"),
              Point("OrtBackend.build", OrtBackend, "build"),
              Point("fsutil.copy_onnx", sdtrt.fsutil, "copy_onnx")]
    for attr in ("_seal", "_publish"):
        points.append(Point(f"Publisher.{attr}", sdtrt.storage.publish.Publisher, attr))
    points.append(Point("publish.atomic_write_bytes (manifest)", sdtrt.storage.publish, "atomic_write_bytes"))
    return points


@pytest.mark.timeout(900)
def test_failed_builds_leave_the_active_engine_serving(cache: Cache, host: LoraHost, svc: EngineService) -> None:
    refs = Refs(host)
    server = switch(svc, spec_for(cache.e1))
    host.lora = "a"
    points = build_points()
    inj = Injector()
    inj.wrap(points)
    rng = random.Random(11)
    trials = count(2, 8)
    failures: list[str] = []
    served = 0
    start = time.perf_counter()
    try:
        for trial in range(trials):
            point = points[trial % len(points)].name
            kind = pick(rng, FAULT_KINDS)
            before = {r.id for r in svc.engine_rows()}
            inj.arm(point, 1, fault(kind, point))
            job = svc.submit_build(host.refs[0].title, [f"{trial % 2 + 1}x64x64x75"], "onnxruntime")
            while svc.jobs.get(job.id).state in ("queued", "running"):
                outs, delta = generation(svc, server)
                served += len(outs)
                if delta["engine_calls"] != len(outs) or not all(torch.allclose(o, refs("a"), rtol=TOL, atol=TOL)
                                                                 for o in outs):
                    failures.append(f"trial {trial} ({point}): generation during the build: {delta}")
            job = svc.jobs.wait(job.id, timeout=300)
            fired = bool(inj.fired)
            inj.count_only()
            after = {r.id for r in svc.engine_rows()}
            if fired and (job.state != FAILED or "injected" not in (job.error or "") or after != before):
                failures.append(f"trial {trial} ({point}): job {job.state} {job.error!r}, new engines {after - before}")
            for new in after - before:
                svc.delete(new)
            if svc.active is not server:
                failures.append(f"trial {trial}: the active server changed")
            outs, delta = generation(svc, server)
            if delta["engine_calls"] != 2 or not all(torch.allclose(o, refs("a"), rtol=TOL, atol=TOL) for o in outs):
                failures.append(f"trial {trial} ({point}): after the build: {delta}")
    finally:
        inj.restore()
    report("build/export faults", trials=trials, failures=len(failures), engine_calls_during_builds=served,
           seconds=round(time.perf_counter() - start, 1))
    assert not failures, failures


# ---- no UNet call waits more than 1 s on a lock while a build, refit, load or delete runs elsewhere ------------------
@pytest.mark.timeout(600)
def test_no_unet_call_waits_on_a_lock_while_a_build_refit_load_or_delete_runs(
        cache: Cache, host: LoraHost, svc: EngineService, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdtrt.backends.ort import OrtRunner
    from sdtrt.serving.slot import NetworkSet
    from sdtrt.storage.registry import Registry as Reg

    log = WaitLog()
    instrument_locks(svc, monkeypatch, log)
    refs = Refs(host)
    server = switch(svc, spec_for(cache.e1))
    stop = threading.Event()
    results: list[tuple[str, torch.Tensor]] = []
    phase = ["idle"]

    def calls() -> None:
        while not stop.is_set():
            results.append((phase[0], server(X, T, C)))

    slow = 2.0 if LONG else 1.3  # longer than the 1 s bound: waiting behind it would fail the test
    real_refit, real_delete, real_open = OrtRunner.refit, Reg.delete, EngineSession.__dict__["open"].__func__

    def slow_refit(self: Any, *a: Any, **k: Any) -> Any:
        time.sleep(slow)  # holding the engine's lock, as a big refit does
        return real_refit(self, *a, **k)

    def slow_delete(self: Any, engine_id: str) -> Any:
        time.sleep(slow)  # removing a big engine from a network file system
        return real_delete(self, engine_id)

    def slow_open(cls: Any, *a: Any, **k: Any) -> Any:
        time.sleep(slow)  # hashing and deserializing a big plan
        return real_open(cls, *a, **k)

    monkeypatch.setattr(OrtRunner, "refit", slow_refit)
    monkeypatch.setattr(Reg, "delete", slow_delete)
    monkeypatch.setattr(EngineSession, "open", classmethod(slow_open))
    worker = threading.Thread(target=calls, name="unet-call")
    worker.start()
    timings: dict[str, float] = {}
    try:
        def run(name: str, fn: Callable[[], Any]) -> None:
            phase[0] = name
            t0 = time.perf_counter()
            other = threading.Thread(target=fn, name=f"bg-{name}")
            other.start()
            other.join(600)
            timings[name] = round(time.perf_counter() - t0, 2)

        def refit() -> None:
            host.lora = "b"
            server.set_networks(NetworkSet(host.network_key(), host.network_weights))

        victim = derive(svc.registry(), cache.e1, profiles=["1x64x64x75:1x64x64x75:3x64x64x75"])
        if not LONG:  # the short run builds with the export replaced by a 2 s wait (no lock is taken either way)
            import sdtrt.pipeline.build

            def export(*a: Any, **k: Any) -> Any:
                time.sleep(slow)
                raise SdtrtError("export skipped in the short run")

            monkeypatch.setattr(sdtrt.pipeline.build, "export_unet", export)
        run("build", lambda: svc.jobs.wait(svc.submit_build(host.refs[0].title, ["1x64x64x75"],
                                                            "onnxruntime").id, timeout=300))
        run("refit", refit)
        run("load-other-engine", lambda: svc.make_server(spec_for(cache.derived["b"])).prepare())
        run("delete", lambda: svc.delete(victim))
        run("close-in-use-engine", lambda: svc.close_sessions())
        phase[0] = "idle"
        time.sleep(0.2)
    finally:
        stop.set()
        worker.join(60)
    for new in {r.id for r in svc.engine_rows()} - {cache.e1, *cache.derived.values()}:
        svc.delete(new)
    worst, lock = log.worst("unet-call")
    per_phase = {p: sum(1 for q, _ in results if q == p) for p in timings}
    wrong = [p for p, out in results if not any(torch.allclose(out, refs(x), rtol=TOL, atol=TOL) for x in ("a", "b", None))]
    report("lock waits of the UNet-call thread", worst_wait_s=round(worst, 3), lock=lock,
           acquires=log.acquires("unet-call"), calls_per_phase=per_phase, phase_seconds=timings,
           busy_fallbacks=sum(n for r, n in svc.counters.snapshot()["fallback_reasons"].items() if "busy" in r))
    assert worst < 1.0, (worst, lock)
    assert all(per_phase[p] > 0 for p in timings), per_phase  # calls kept being answered during every phase
    assert not wrong


def test_delete_on_a_read_only_cache_is_a_listed_error(cache: Cache, svc: EngineService,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from sdtrt.errors import CacheNotWritable

    victim = derive(svc.registry(), cache.e1, profiles=["1x64x64x75:1x64x64x75:6x64x64x75"])

    def erofs(*a: Any, **k: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(os, "rename", erofs)
        with pytest.raises(CacheNotWritable, match="read-only"):
            svc.delete(victim)
    assert victim in {r.id for r in svc.engine_rows()} and not svc.sessions._deleting
    svc.delete(victim)
    assert victim not in {r.id for r in svc.engine_rows()}


# ---- call shapes outside every profile --------------------------------------------------------------------
def test_shapes_outside_every_profile_fall_back_or_fail_clearly(cache: Cache, host: LoraHost,
                                                                     svc: EngineService) -> None:
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    fallen: list[tuple[int, ...]] = []

    def fallback(x: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        fallen.append(tuple(x.shape))
        return torch.zeros_like(x)

    svc.activation.torch_fallback = fallback  # type: ignore[method-assign]
    server = switch(svc, spec_for(cache.e1))
    seen = {"engine": 0, "fallback": 0, "error": 0}

    @settings(max_examples=count(80, 400), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(batch=st.one_of(st.integers(1, 2), st.integers(0, 5)), h=st.one_of(st.just(8), st.integers(1, 24)),
           w=st.one_of(st.integers(8, 12), st.integers(1, 24)), rows=st.one_of(st.integers(77, 154),
                                                                               st.integers(1, 320)),
           chans=st.sampled_from([4, 4, 4, 9]), ctx=st.sampled_from([768, 768, 1024]),
           with_y=st.sampled_from([False, False, False, True]), policy=st.sampled_from(["pytorch", "error"]))
    @example(batch=2, h=8, w=12, rows=154, chans=4, ctx=768, with_y=False, policy="error")
    @example(batch=1, h=8, w=8, rows=77, chans=4, ctx=768, with_y=False, policy="pytorch")
    def one(batch: int, h: int, w: int, rows: int, chans: int, ctx: int, with_y: bool, policy: str) -> None:
        host.set(fallback=policy)
        x, t = torch.randn(batch, chans, h, w), torch.full((batch,), 500.0)
        c = torch.randn(batch, rows, ctx)
        kwargs = {"y": torch.randn(batch, 2816)} if with_y else {}
        # the engine takes 1 to 4 rows: up to 2 images with cond and uncond batched (CFG)
        inside = 1 <= batch <= 4 and h == 8 and 8 <= w <= 12 and 77 <= rows <= 154 and chans == 4 and ctx == 768 \
            and not with_y
        n = len(fallen)
        before = svc.counters.snapshot()
        try:
            out = server(x, t, c, **kwargs)
        except NoMatchingProfile as e:
            assert policy == "error" and not inside
            assert "no engine profile covers this call" in str(e) and "Build an engine" in str(e)
            seen["error"] += 1
            return
        assert out.shape == x.shape and out.dtype == x.dtype
        if inside:
            assert len(fallen) == n and svc.counters.snapshot()["engine_calls"] == before["engine_calls"] + 1
            seen["engine"] += 1
        else:
            assert len(fallen) == n + 1
            reasons = svc.counters.snapshot()["fallback_reasons"]
            assert any(("no engine profile covers" in r or "extra inputs" in r or "other reasons" in r)
                       for r in reasons)
            seen["fallback"] += 1

    one()
    report("shapes", examples=sum(seen.values()), **seen)
    assert seen["engine"] and seen["fallback"] and seen["error"]


# ---- a build in progress; shutdown during a build ------------------------------------------------------
@pytest.fixture
def gated_build(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """A build (inside the registry's private folder, after the export, in the backend's build step) waits for
    `gate` after setting `entered`: a build that is in progress for as long as the test needs. The export itself
    waits for generations and model loads (Host.quiet_torch); the backend's build on a CPU does not."""
    from sdtrt.backends.ort import OrtBackend

    entered, gate = threading.Event(), threading.Event()
    real = OrtBackend.build

    def build(*a: Any, **k: Any) -> Any:
        entered.set()
        gate.wait(300)
        return real(*a, **k)

    monkeypatch.setattr(OrtBackend, "build", build)
    yield entered, gate
    gate.set()


@pytest.mark.timeout(600)
def test_a_build_in_progress_keeps_generations_working_and_is_not_ready(
        cache: Cache, host: LoraHost, svc: EngineService, gated_build: tuple[threading.Event, threading.Event]) -> None:
    entered, gate = gated_build
    refs = Refs(host)
    server = switch(svc, spec_for(cache.e1))
    before = {r.id for r in svc.engine_rows()}
    job = svc.submit_build(host.refs[0].title, ["1x64x64x75"], "onnxruntime")
    assert entered.wait(300)
    st = svc.status()
    assert st.jobs.running == 1 and [b.job_id for b in st.building] == [job.id]
    assert st.building[0].profiles == ["1x64x64x75"] and st.building[0].state == "running"
    assert {r.id for r in svc.engine_rows()} == before  # nothing published: not ready, not offered
    assert {i for s in svc.unet_options() for i in s.engine_ids} <= before
    assert any(p.name.startswith(".tmp-") for p in cache.cache.iterdir())  # it is being built, privately
    outs, delta = generation(svc, server)
    assert delta["engine_calls"] == 2
    assert_all_close(outs, refs(None))
    other = switch(svc, spec_for(cache.derived["b"]))  # and switching engines works meanwhile
    outs, delta = generation(svc, other)
    assert delta["engine_calls"] == 2
    gate.set()
    assert svc.jobs.wait(job.id, timeout=300).state == DONE
    new = {r.id: r for r in svc.engine_rows()}
    [built] = set(new) - before
    assert new[built].ok and svc.status().building == []
    svc.delete(built)


@pytest.mark.timeout(300)
def test_shutdown_during_a_build_returns_in_bounded_time(
        cache: Cache, host: LoraHost, svc: EngineService, gated_build: tuple[threading.Event, threading.Event]) -> None:
    entered, gate = gated_build
    server = switch(svc, spec_for(cache.e1))
    before = {r.id for r in svc.engine_rows()}
    job = svc.submit_build(host.refs[0].title, ["1x64x64x75"], "onnxruntime")
    queued = svc.submit_build(host.refs[1].title, ["1x64x64x75"], "onnxruntime")
    assert entered.wait(300)
    t0 = time.perf_counter()
    left = svc.shutdown(timeout=1.0)
    took = time.perf_counter() - t0
    report("shutdown during a build (in process)", seconds=round(took, 3), left=left)
    assert took < 2.0 and svc.active is None and not svc.sessions._sessions
    assert left["builds_left"] == [job.id] and svc.jobs.get(queued.id).state == "cancelled"
    assert torch.equal(server(X, T, C), Refs(host)(None)) and not svc.sessions._sessions  # PyTorch; nothing reloaded
    gate.set()  # the stuck build wakes up: it was cancelled, so it stops at its next progress report
    final = svc.jobs.wait(job.id, timeout=300)
    assert final.state == "cancelled", (final.state, final.error)
    assert {r.id for r in svc.engine_rows()} == before


CHILD = textwrap.dedent('''
    import signal, sys, threading, time
    from pathlib import Path
    import torch
    import sdtrt.pipeline.build
    from sdtrt.webui.service import EngineService, OptionSpec
    from webui_support import DictHost

    models, ckpt, engine_id = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    entered = threading.Event()
    def export(*a, **k):
        entered.set()
        time.sleep(3600)  # a build that would run for an hour, inside the registry's private folder
    sdtrt.pipeline.build.export_unet = export
    host = DictHost(models)
    host.add_checkpoint(ckpt, load=True)
    svc = EngineService()
    svc.attach(host)
    server = svc.make_server(OptionSpec("x", None, (engine_id,)))
    svc.activate(server, "x")
    job = svc.submit_build(host.refs[0].title, ["1x64x64x75"], "onnxruntime")
    def on_term(signum, frame):
        t0 = time.perf_counter()
        left = svc.shutdown(timeout=2.0)
        print(f"shutdown {time.perf_counter() - t0:.3f} {left}", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    entered.wait(600)
    x = torch.randn(1, 4, 8, 8); c = torch.randn(1, 77, 768)
    server(x, torch.tensor([500.0]), c)
    print("building", svc.counters.snapshot()["engine_calls"], flush=True)
    while True:
        time.sleep(0.05)
''')


@pytest.mark.timeout(300)
@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_sigterm_during_a_build_exits_in_bounded_time(cache: Cache, tiny_checkpoint, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "extension"), str(ROOT / "tests")]),
           "SDTRT_CACHE": "", "OMP_NUM_THREADS": "1"}
    env.pop("SDTRT_CACHE")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(cache.root), str(tiny_checkpoint("sd1", 0)), cache.e1],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.startswith("building 1"), (line, child.stderr.read() if child.stderr and child.poll() is not None else "")
        t0 = time.perf_counter()
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=30)
        took = time.perf_counter() - t0
        out = child.stdout.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    report("SIGTERM during a build (child process)", exit_seconds=round(took, 3), child=out.strip())
    assert code == 0 and took < 5.0 and out.startswith("shutdown")
    assert not [p for p in (cache.cache).iterdir() if p.name.startswith(".tmp-") and str(child.pid) in p.name
                and (p / "manifest.json").exists()]


# ---- 16 threads x 500 mixed swap / unload / status / refit / call operations ----------------------------------
def network_set(host: LoraHost, lora: str | None) -> Any:
    """The NetworkSet A1111 would give for `lora` (computed from the base weights when the engine needs it)."""
    from sdtrt.pipeline.refit import merge
    from sdtrt.serving.slot import NetworkSet

    def compute(base: Any) -> dict[str, torch.Tensor]:
        if lora is None:
            return {}
        deltas = host.loras[lora]
        return {n: merge(b, deltas[n]) for n, b in base(sorted(deltas)).items()}

    return NetworkSet(() if lora is None else ((lora, 1.0),), compute)


@pytest.mark.timeout(900)
def test_16_threads_of_mixed_swaps_unloads_status_refits_and_calls(
        cache: Cache, host: LoraHost, svc: EngineService, toy: dict[str | None, float],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On toy engines (refit written weight by weight, so a race would show as a mixed value) through the real
    registry, verification, service and serving code. Then the real engine serves a correct generation."""
    import sdtrt.serving.session as runtime_module
    from sdtrt.backends import backend_class as real_backend_class

    ToyBackend.state.pause = 0.0001  # type: ignore[union-attr]
    threads, per_thread = 16, count(40, 500)
    registry = svc.registry()
    victim_profiles = [[f"1x64x64x75:1x64x64x75:{n}x64x64x75"] for n in (3, 4, 5)]
    victims = [derive(registry, cache.e1, profiles=p) for p in victim_profiles]  # deleted and re-published at will
    specs = [spec_for(cache.derived["b"])] + [spec_for(v) for v in victims]
    servers: list[UnetServer] = [switch(svc, specs[0])]
    allowed: dict[str, int] = {}
    unexpected: list[str] = []
    mixed: list[float] = []
    done = {"calls": 0, "ops": 0}
    guard = threading.Lock()
    ops = ["swap", "a1111-swap", "unload", "status", "refit", "networks", "call", "call", "call", "generation",
           "delete", "delete-active", "publish"]

    def worker(i: int) -> None:
        rng = random.Random(1000 + i)
        for _ in range(per_thread):
            op = pick(rng, ops)
            try:
                if op == "swap":
                    s = svc.make_server(pick(rng, specs))
                    with guard:
                        servers.append(s)
                    svc.activate(s, s.slots[0].id if s.slots else "none")
                elif op == "a1111-swap":
                    with guard:
                        servers.append(switch(svc, pick(rng, specs)))
                elif op == "unload":
                    active = svc.active
                    if active is not None:
                        svc.deactivate(active)
                    svc.close_sessions()
                elif op == "status":
                    svc.status()
                    svc.engine_rows()
                elif op == "refit":
                    host.lora = pick(rng, [None, "a", "b"])
                    svc.apply_networks()
                elif op == "networks":
                    with guard:
                        s = pick(rng, servers[-8:])
                    s.set_networks(network_set(host, pick(rng, [None, "a", "b"])))
                elif op in ("call", "generation"):
                    with guard:
                        s = pick(rng, servers[-8:])
                    p = object()
                    if op == "generation":
                        svc.begin(p)
                    try:
                        out = s(X, T, C)
                    finally:
                        if op == "generation":
                            svc.end(p)
                    if toy_kind(out, toy) == "mixed":
                        with guard:
                            mixed.append(float(out.flatten()[0]))
                    with guard:
                        done["calls"] += 1
                elif op == "delete":
                    svc.delete(pick(rng, [*victims, "sd1-onnxruntime-0000000000000000"]))
                elif op == "delete-active":
                    active = svc.active
                    if active is not None and active.slots and active.slots[0].id in victims:
                        svc.delete(active.slots[0].id)  # refused (EngineInUse) unless it was switched meanwhile
                elif op == "publish":
                    derive(registry, cache.e1, profiles=pick(rng, victim_profiles))
            except SdtrtError as e:
                with guard:
                    allowed[type(e).__name__] = allowed.get(type(e).__name__, 0) + 1
            except Exception as e:  # noqa: BLE001
                with guard:
                    unexpected.append(f"{op}: {type(e).__name__}: {e}")
            with guard:
                done["ops"] += 1

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,), name=f"stress-{i}", daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(max(1.0, 800 - (time.perf_counter() - start)))
    hung = [t.name for t in pool if t.is_alive()]
    took = time.perf_counter() - start
    report("stress", threads=threads, ops=done["ops"], calls=done["calls"], seconds=round(took, 1),
           listed_errors=allowed, unexpected=len(unexpected), mixed=len(mixed), hung=len(hung))
    assert not hung, f"deadlock: {hung}"
    assert not unexpected, unexpected[:5]
    assert not mixed and done["ops"] == threads * per_thread
    # consistent state: nothing half-done, nothing left locked
    assert svc.sessions._deleting == set()
    for lock in svc.sessions._opening.values():
        assert lock.acquire(blocking=False)
        lock.release()
    for engine_id, session in list(svc.sessions._sessions.items()):
        assert not session.closed and session.manifest.id == engine_id
        assert session.lock.acquire(blocking=False)
        session.lock.release()
    assert svc.active is None or svc.active in servers
    # the next generation, on the real engine, is correct
    monkeypatch.setattr(runtime_module, "backend_class", real_backend_class)
    monkeypatch.delattr(host, "torch_forward")
    svc.close_sessions()
    host.lora = "b"
    outs, delta = generation(svc, switch(svc, spec_for(cache.e1)))
    assert delta["engine_calls"] == 2
    assert_all_close(outs, Refs(host)("b"))
    for v in victims:
        with __import__("contextlib").suppress(SdtrtError):
            svc.delete(v)


# ---- inside the fake A1111: SD Unet switches with faults, Reload UI during a build, a pickle LoRA -------------------
@pytest.fixture
def a1111(cache: Cache, tmp_path: Path, tiny_checkpoint: Any) -> Iterator[Any]:
    pytest.importorskip("fastapi")
    from fakehost import FakeHost

    service_module._SERVICE = None
    cfg = {"sd_unet": "Automatic", "sdtrt_enabled": True, "sdtrt_fallback": "pytorch",
           "sdtrt_cache_dir": str(cache.cache)}
    host = FakeHost.boot(tmp_path / "webui", [tiny_checkpoint("sd1", 0)], config=cfg, args=["--no-half"],
                         extensions={"sd-webui-trt": ROOT})
    try:
        yield host
    finally:
        host.close()
        if service_module._SERVICE is not None:
            service_module._SERVICE.shutdown(timeout=5)
        service_module._SERVICE = None


def a1111_gen(host: Any, unet: str, prompt: str = "a photo of a cat") -> Any:
    return host.txt2img(prompt=prompt, negative_prompt="blurry", steps=2, width=64, height=64, seed=5,
                        override_settings={"sd_unet": unet})


@pytest.mark.timeout(600)
def test_a1111_sd_unet_switches_with_faults_keep_generating(a1111: Any, cache: Cache) -> None:
    """Switching SD Unet between two engines and None with faults injected into loading: every generation
    completes with PyTorch's result (within the engine tolerance), and the next clean switch serves from the
    engine again."""
    host = a1111
    svc = service_module.service()
    reference = a1111_gen(host, "None").latents
    labels = [f"[TRT] {cache.e1}", f"[TRT] {cache.derived['b']}"]
    inj = Injector()
    inj.wrap(injection_points(LoraHost(cache.root))["swap"][:7])
    rng = random.Random(5)
    trials = count(4, 20)
    failures: list[str] = []
    try:
        for trial in range(trials):
            label = labels[trial % 2]
            point = pick(rng, ["Registry.get", "Registry.verify", "EngineSession.open", "OrtBackend.load",
                               "OrtRunner.__init__"])
            inj.arm(point, 1, fault(pick(rng, FAULT_KINDS), point))
            before = svc.counters.snapshot()
            latents = a1111_gen(host, label).latents
            fired = bool(inj.fired)
            inj.count_only()
            d = counters_delta(svc, before)
            scale = reference.abs().max().item()
            if (latents - reference).abs().max().item() > 1e-3 * scale:
                failures.append(f"trial {trial} {label} fault at {point}: latents differ")
            if fired and d["engine_calls"] != 0:
                failures.append(f"trial {trial}: engine calls after a failed load: {d}")
            latents = a1111_gen(host, "None").latents  # switch away, then back cleanly
            before = svc.counters.snapshot()
            latents = a1111_gen(host, label).latents
            d = counters_delta(svc, before)
            if d["fallback_calls"] or not d["engine_calls"]:
                failures.append(f"trial {trial}: clean switch back to {label} not on the engine: {d}")
    finally:
        inj.restore()
    report("A1111 SD Unet switches with faults", trials=trials, failures=len(failures))
    assert not failures, failures


@pytest.mark.timeout(600)
def test_a1111_reload_ui_during_a_build_is_prompt_and_the_webui_keeps_serving(
        a1111: Any, cache: Cache, gated_build: tuple[threading.Event, threading.Event]) -> None:
    entered, gate = gated_build
    host = a1111
    svc = service_module.service()
    label = f"[TRT] {cache.e1}"
    reference = a1111_gen(host, "None").latents
    job_id = host.client().post("/sdtrt/v1/engines", json={
        "checkpoint": "sd1-s0", "profiles": ["1x64x64x75"], "backend": "onnxruntime"}).json()["job_id"]
    assert entered.wait(300)
    before = svc.counters.snapshot()
    a1111_gen(host, label)
    assert counters_delta(svc, before)["engine_calls"] > 0  # generating on the engine while the build runs
    t0 = time.perf_counter()
    host.reload_ui()  # on_script_unloaded -> SD Unet to None -> scripts re-executed
    took = time.perf_counter() - t0
    status = host.client().get("/sdtrt/v1/status").json()
    assert [b["job_id"] for b in status["building"]] == [job_id]  # the build survives Reload UI, not ready yet
    before = svc.counters.snapshot()
    latents = a1111_gen(host, label).latents
    assert counters_delta(svc, before)["engine_calls"] > 0
    assert (latents - reference).abs().max().item() <= 1e-3 * reference.abs().max().item()
    gate.set()
    assert svc.jobs.wait(job_id, timeout=300).state == DONE
    report("A1111 Reload UI during a build", reload_seconds=round(took, 2))
    assert took < 10
    for new in {r.id for r in svc.engine_rows()} - {cache.e1, *cache.derived.values()}:
        svc.delete(new)


@pytest.mark.timeout(300)
def test_a1111_pickle_lora_never_unpickled(a1111: Any, tmp_path: Path, no_unpickling: list[str]) -> None:
    host = a1111
    canary = tmp_path / "canary"
    lora_dir = host.data_dir / "models" / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    write_pickle_bomb(lora_dir / "bomb.pt", canary)
    reference = a1111_gen(host, "None", "a cat").latents
    latents = a1111_gen(host, "Automatic", "a cat <lora:bomb:1>").latents
    assert (latents - reference).abs().max().item() <= 1e-3 * reference.abs().max().item()
    assert not canary.exists() and no_unpickling == []
