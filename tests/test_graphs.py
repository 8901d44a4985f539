"""The CUDA graph cache (extension/sdtrt/backends/graphs.py) on CPU, against a fake execution context that behaves
like the hazards real graphs have:

* a captured graph keeps the buffer addresses *and* the weight values it saw at capture (so a refit without
  re-capture would serve stale weights);
* the context keeps host-side per-shape state that a replay reads (so replaying one key's graph while the context
  is bound to another key's shapes gives a wrong answer).

The real thing (TensorRT + torch.cuda.CUDAGraph) is exercised by the GPU test in test_tensorrt_backend.py.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

EXT = Path(__file__).resolve().parents[1] / "extension"
if str(EXT) not in sys.path:
    sys.path.insert(0, str(EXT))

from sdtrt.backends.graphs import GraphCache


@dataclass
class Buffers:
    key: Hashable
    x: torch.Tensor
    out: torch.Tensor


@dataclass
class FakeGraph:
    x: torch.Tensor
    out: torch.Tensor
    weight: float  # baked at capture
    released: bool = False


@dataclass
class FakeContext:
    """An 'engine' computing out = x * weight + scale, where `scale` is host-side state set by binding a shape."""

    weight: float = 2.0
    scale: float | None = None  # from the bound shape
    x: torch.Tensor | None = None
    out: torch.Tensor | None = None
    events: list[str] = field(default_factory=list)
    fail_capture: bool = False
    fail_replay: bool = False
    reject_batch: int | None = None

    @staticmethod
    def scale_for(shape: tuple[int, ...]) -> float:
        return float(sum(shape))

    def expected(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.scale_for(tuple(x.shape))


class FakeOps:
    def __init__(self, ctx: FakeContext) -> None:
        self.ctx = ctx

    def allocate(self, key: Hashable, feeds: Mapping[str, torch.Tensor]) -> Buffers:
        self.ctx.events.append("allocate")
        x = feeds["x"]
        return Buffers(key, torch.empty_like(x), torch.empty_like(x))

    def bind(self, buffers: Buffers) -> None:
        self.ctx.events.append("bind")
        if self.ctx.reject_batch is not None and buffers.x.shape[0] == self.ctx.reject_batch:
            raise ValueError("outside the profile")
        self.ctx.scale = self.ctx.scale_for(tuple(buffers.x.shape))
        self.ctx.x, self.ctx.out = buffers.x, buffers.out

    def load(self, buffers: Buffers, feeds: Mapping[str, torch.Tensor]) -> None:
        buffers.x.copy_(feeds["x"])

    def launch(self) -> None:
        self.ctx.events.append("launch")
        assert self.ctx.x is not None and self.ctx.out is not None and self.ctx.scale is not None
        self.ctx.out.copy_(self.ctx.x * self.ctx.weight + self.ctx.scale)

    def capture(self) -> FakeGraph:
        self.ctx.events.append("capture")
        if self.ctx.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        assert self.ctx.x is not None and self.ctx.out is not None
        return FakeGraph(self.ctx.x, self.ctx.out, self.ctx.weight)

    def replay(self, graph: FakeGraph) -> None:
        self.ctx.events.append("replay")
        assert not graph.released
        if self.ctx.fail_replay:
            raise RuntimeError("an illegal memory access was encountered")
        assert self.ctx.scale is not None
        graph.out.copy_(graph.x * graph.weight + self.ctx.scale)  # host state read at replay time

    def release(self, graph: FakeGraph) -> None:
        self.ctx.events.append("release")
        graph.released = True

    def output(self, buffers: Buffers) -> torch.Tensor:
        return buffers.out


def call(cache: GraphCache, ctx: FakeContext, shape: tuple[int, ...], seed: int) -> None:
    """One call through the cache, checked against what the engine must compute with the current weights."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    got = cache.run(("p0", shape), {"x": x}).clone()
    torch.testing.assert_close(got, ctx.expected(x), msg=f"call {seed} shape {shape}")


def make(**kw: object) -> tuple[GraphCache, FakeContext]:
    ctx = FakeContext()
    return GraphCache(FakeOps(ctx), **kw), ctx  # type: ignore[arg-type]


def test_one_shape_warms_up_captures_then_replays() -> None:
    cache, ctx = make()
    for i in range(6):
        call(cache, ctx, (2, 3), i)
    assert ctx.events == ["allocate", "bind", "launch", "capture", "replay", "replay", "replay", "replay", "replay"]
    assert cache.describe() | {} == {
        "capturing": True, "disabled_reason": None, "graphs": 1, "keys": 1,
        "eager": 1, "captures": 1, "replays": 5, "invalidations": 0,
    }


def test_alternating_shapes_rebind_before_replay() -> None:
    cache, ctx = make()
    shapes = [(2, 3), (1, 5)]
    for i in range(12):
        call(cache, ctx, shapes[i % 2], i)  # would fail if a graph replayed under the other shape's host state
    assert cache.stats.captures == 2 and cache.stats.replays == 10
    assert ctx.events.count("allocate") == 2


def test_without_rebinding_the_fake_would_catch_it() -> None:
    """The hazard the re-bind protects against is real in the fake: replaying A's graph while B is bound is wrong."""
    ctx = FakeContext()
    ops = FakeOps(ctx)
    a = Buffers("a", torch.ones(2, 3), torch.empty(2, 3))
    b = Buffers("b", torch.ones(1, 5), torch.empty(1, 5))
    ops.bind(a)
    graph_a = ops.capture()
    ops.bind(b)
    ops.replay(graph_a)
    assert not torch.allclose(a.out, ctx.expected(a.x))


def test_refit_then_invalidate_recaptures_with_new_weights() -> None:
    cache, ctx = make()
    for i in range(3):
        call(cache, ctx, (2, 3), i)
    ctx.weight = -0.5  # a refit
    x = torch.randn(2, 3)
    stale = cache.run(("p0", (2, 3)), {"x": x}).clone()
    assert not torch.allclose(stale, ctx.expected(x))  # the old graph still has the old weights
    cache.invalidate()
    for i in range(3, 7):
        call(cache, ctx, (2, 3), i)
    assert cache.stats.captures == 2 and cache.stats.invalidations == 1
    assert ctx.events.count("release") == 1 and ctx.events.count("allocate") == 1  # buffers kept


def test_least_recently_used_key_is_dropped_with_its_graph() -> None:
    cache, ctx = make(max_graphs=2)
    for i, shape in enumerate([(1, 1), (1, 1), (2, 2), (2, 2), (1, 1), (3, 3), (3, 3), (1, 1)]):
        call(cache, ctx, shape, i)
    assert len(cache) == 2
    assert ctx.events.count("release") == 1  # (2, 2) went when (3, 3) came; (1, 1) was used more recently
    assert cache.describe()["graphs"] == 2


def test_failed_capture_switches_graphs_off_and_keeps_serving() -> None:
    cache, ctx = make()
    ctx.fail_capture = True
    for i in range(5):
        call(cache, ctx, (2, 3), i)
    assert cache.disabled_reason is not None and "capture failed" in cache.disabled_reason
    assert "operation not permitted" in cache.disabled_reason
    assert ctx.events.count("capture") == 1 and ctx.events.count("launch") == 5
    assert "replay" not in ctx.events


def test_failed_replay_raises_and_the_next_calls_start_clean() -> None:
    cache, ctx = make()
    for i in range(3):
        call(cache, ctx, (2, 3), i)
    ctx.fail_replay = True
    with pytest.raises(RuntimeError, match="illegal memory access"):
        cache.run(("p0", (2, 3)), {"x": torch.randn(2, 3)})
    ctx.fail_replay = False
    assert cache.stats.invalidations == 1 and cache.describe()["graphs"] == 0
    events = len(ctx.events)
    for i in range(3, 6):
        call(cache, ctx, (2, 3), i)
    assert ctx.events[events:] == ["bind", "launch", "capture", "replay", "replay"]


def test_switched_off_binds_once_per_key_and_never_captures() -> None:
    cache, ctx = make(enabled=False)
    for i in range(5):
        call(cache, ctx, (2, 3), i)
    call(cache, ctx, (1, 5), 5)
    call(cache, ctx, (2, 3), 6)
    assert cache.disabled_reason == "switched off"
    assert "capture" not in ctx.events
    assert ctx.events == ["allocate", "bind"] + ["launch"] * 5 + ["allocate", "bind", "launch", "bind", "launch"]


def test_bind_error_propagates_and_the_next_call_binds_again() -> None:
    cache, ctx = make()
    call(cache, ctx, (2, 3), 0)
    ctx.reject_batch = 4
    with pytest.raises(ValueError, match="outside the profile"):
        cache.run(("p0", (4, 3)), {"x": torch.randn(4, 3)})
    ctx.reject_batch = None
    for i in range(1, 4):
        call(cache, ctx, (2, 3), i)  # must re-bind (2, 3): the failed bind may have half-changed the context
    assert ctx.events.count("bind") == 3


def test_max_graphs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        make(max_graphs=0)
