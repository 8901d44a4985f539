"""CUDA graphs for engine calls: one captured graph per (profile, input shapes), replayed on later calls.

A graph freezes kernel launches, shapes and device addresses, so each key gets static input and output buffers
that the graph reads and writes. The life of a key:

    first call      bind the static buffers, run the engine normally (warm-up: TensorRT finishes its
                    shape-dependent setup on this run, and the output is the call's answer)
    second call     capture the same run into a graph, replay it
    later calls     copy the inputs into the static buffers and replay: no shape setting, no address binding,
                    no per-call allocation, one launch instead of hundreds

Every graph is dropped (and captured again on the next calls) after a refit (the weights may move), a profile
switch of the execution context, or a failed replay. At most `max_graphs` keys are kept (least recently used
first out), so a session that sees many sizes does not grow without bound. If capture fails once (a library or
driver that cannot capture this engine), graphs switch off for this runner with the reason kept in
`disabled_reason`, and calls run normally: graphs are an optimization and never fail a generation.

This file holds the bookkeeping only; the backend supplies the operations (`GraphOps`), so the state machine is
tested on CPU with recording fakes and on a GPU with TensorRT itself.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

#: Keys kept per runner. Each costs the static buffers (inputs and one latent-sized output) and the graph itself.
DEFAULT_MAX_GRAPHS = 8

B = TypeVar("B")  # the backend's static buffers for one key
G = TypeVar("G")  # a captured graph
T = TypeVar("T")  # a tensor


class GraphOps(Protocol[B, G, T]):
    """What a backend provides to the graph cache. All work is queued on the device without host syncs."""

    def allocate(self, key: Hashable, feeds: Mapping[str, T]) -> B:
        """Static input and output buffers for this key (shapes and dtypes from the feeds and the engine)."""

    def bind(self, buffers: B) -> None:
        """Point the execution context at these buffers (input shapes, tensor addresses, profile)."""

    def load(self, buffers: B, feeds: Mapping[str, T]) -> None:
        """Copy this call's inputs into the static input buffers (queued on the caller's stream)."""

    def launch(self) -> None:
        """Run the engine once, not captured, on the bound buffers."""

    def capture(self) -> G:
        """Run the engine once under stream capture and return the graph (not yet replayed)."""

    def replay(self, graph: G) -> None:
        """Launch a captured graph (queued on the caller's stream)."""

    def release(self, graph: G) -> None:
        """Free a graph's resources."""

    def output(self, buffers: B) -> T:
        """The call's result: the static output buffer."""


@dataclass
class _Entry(Generic[B, G]):
    buffers: B
    graph: G | None = None
    warmed: bool = False  # ran once, not captured, since the last invalidation


@dataclass
class GraphStats:
    """Counts for the benchmark and tests: how calls were served."""

    eager: int = 0  # warm-up runs (first call of a key) and every run with graphs off
    captures: int = 0
    replays: int = 0
    invalidations: int = 0


class GraphCache(Generic[B, G, T]):
    """Per-key CUDA graphs over a backend's `GraphOps`. Not thread-safe (one engine call at a time, like the
    execution context it drives).

    The context is re-bound whenever the key changes, also before replaying a graph: a graph holds device
    addresses, but the library may keep host-side state per shape that its captured copies read at replay, so the
    context is put back into exactly the state it was captured in. Repeated calls of one key (every step of a
    generation) skip all of that."""

    def __init__(self, ops: GraphOps[B, G, T], *, enabled: bool = True, max_graphs: int = DEFAULT_MAX_GRAPHS):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self._ops = ops
        self._entries: OrderedDict[Hashable, _Entry[B, G]] = OrderedDict()
        self._bound: Hashable | None = None  # the key whose buffers and shapes the context holds
        self.max_graphs = max_graphs
        self.disabled_reason: str | None = None if enabled else "switched off"
        self.stats = GraphStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def capturing(self) -> bool:
        return self.disabled_reason is None

    def run(self, key: Hashable, feeds: Mapping[str, T]) -> T:
        """Serve one call: replay, capture, or run normally, as described in the module docstring. Returns the
        key's static output buffer (overwritten by the next call of the same key)."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._add(key, feeds)
        else:
            self._entries.move_to_end(key)
        self._ops.load(entry.buffers, feeds)
        self._bind(key, entry)
        if entry.graph is not None:
            try:
                self._ops.replay(entry.graph)
            except Exception:
                self.invalidate()  # whatever went wrong, the next calls start from a clean state
                raise
            self.stats.replays += 1
            return self._ops.output(entry.buffers)
        if entry.warmed and self.capturing:
            try:
                graph = self._ops.capture()
            except Exception as e:  # noqa: BLE001 - graphs are an optimization: run this engine without them
                self.disable(f"CUDA graph capture failed: {type(e).__name__}: {e}")
                self._bound = None  # a failed capture may have left the context half-set: bind again
                self._bind(key, entry)
            else:
                entry.graph = graph
                self.stats.captures += 1
                self._ops.replay(graph)
                self.stats.replays += 1
                return self._ops.output(entry.buffers)
        self._ops.launch()
        self.stats.eager += 1
        entry.warmed = True
        return self._ops.output(entry.buffers)

    def _add(self, key: Hashable, feeds: Mapping[str, T]) -> _Entry[B, G]:
        while len(self._entries) >= self.max_graphs:
            old_key, old = self._entries.popitem(last=False)
            if self._bound == old_key:
                self._bound = None
            self._release(old)
        entry: _Entry[B, G] = _Entry(self._ops.allocate(key, feeds))
        self._entries[key] = entry
        return entry

    def _bind(self, key: Hashable, entry: _Entry[B, G]) -> None:
        if self._bound != key:
            self._bound = None  # stays unset if bind raises
            self._ops.bind(entry.buffers)
            self._bound = key

    def _release(self, entry: _Entry[B, G]) -> None:
        entry.warmed = False
        if entry.graph is not None:
            graph, entry.graph = entry.graph, None
            self._ops.release(graph)

    def invalidate(self) -> None:
        """Drop every graph (after a refit, a profile switch of the context, or a failed replay); the buffers stay.
        The next call of each key runs normally once and captures on the call after."""
        for entry in self._entries.values():
            self._release(entry)
        self._bound = None
        self.stats.invalidations += 1

    def disable(self, reason: str) -> None:
        """Stop capturing for good; calls keep being served without graphs."""
        self.disabled_reason = reason
        for entry in self._entries.values():
            self._release(entry)

    def clear(self) -> None:
        """Drop graphs and buffers (close)."""
        self.invalidate()
        self._entries.clear()

    def describe(self) -> dict[str, Any]:
        return {
            "capturing": self.capturing,
            "disabled_reason": self.disabled_reason,
            "graphs": sum(e.graph is not None for e in self._entries.values()),
            "keys": len(self._entries),
            "eager": self.stats.eager,
            "captures": self.stats.captures,
            "replays": self.stats.replays,
            "invalidations": self.stats.invalidations,
        }
