"""Serving the sampler's UNet calls: per call, the first engine profile that covers the call's shapes runs it;
a call no profile covers runs on the PyTorch UNet instead (or fails, by policy), and the user is told once.

Host-agnostic: the PyTorch forward, the weights and the notices come in as callables.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sdtrt.errors import NoMatchingProfile, SdtrtError
from sdtrt.storage.manifest import Manifest
from sdtrt.models import NotServable
from sdtrt.profiles import Dims, Profile, TensorRange, select_profile
from sdtrt.pipeline.refit import BaseLoader
from sdtrt.serving.session import EngineBusy, EngineClosed, EngineSession, engine_contract, refit_refusal

log = logging.getLogger("sdtrt")
#: Distinct fallback reasons kept in the counters (a long-running server sees many sizes).
MAX_REASONS = 64
#: The longest a UNet call waits for an engine another thread is refitting or loading; then it runs on PyTorch.
BUSY_WAIT_S = 0.5
#: The fallback reason while the extension is switched off (never told to the user: it is their choice).
SWITCHED_OFF = "sdtrt is switched off"


class FallbackPolicy(str, enum.Enum):
    """What a call that no engine profile covers does: run on the PyTorch UNet (told once), or fail the generation."""

    PYTORCH = "pytorch"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def read(cls, value: object, default: FallbackPolicy) -> FallbackPolicy:
        """The policy a setting names; `default` for anything else (a hand-edited config)."""
        try:
            return cls(str(value))
        except ValueError:
            return default


@dataclass
class Counters:
    """What /sdtrt/v1/status reports. Updated from the generation thread, read from the API thread."""

    engine_calls: int = 0
    fallback_calls: int = 0
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    refits: int = 0
    last_refit: dict[str, Any] | None = None
    last_error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def engine_call(self) -> None:
        with self._lock:
            self.engine_calls += 1

    def fallback(self, reason: str) -> None:
        with self._lock:
            self.fallback_calls += 1
            if reason not in self.fallback_reasons and len(self.fallback_reasons) >= MAX_REASONS:
                reason = "other reasons"
            self.fallback_reasons[reason] = self.fallback_reasons.get(reason, 0) + 1

    def refit(self, names: int = 0, seconds: float = 0.0) -> None:
        with self._lock:
            self.refits += 1
            self.last_refit = {"weights": names, "seconds": round(seconds, 4)}

    def error(self, text: str) -> None:
        with self._lock:
            self.last_error = text

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "engine_calls": self.engine_calls,
                "fallback_calls": self.fallback_calls,
                "fallback_reasons": dict(self.fallback_reasons),
                "refits": self.refits,
                "last_refit": self.last_refit,
                "last_error": self.last_error,
            }


@dataclass
class WeightSource:
    """The weights an engine must hold for the loaded checkpoint: identified by `sha256`, read only on refit.
    load(None) gives every UNet weight, load(names) just those."""

    sha256: str
    load: Callable[[Sequence[str] | None], Mapping[str, torch.Tensor]]


@dataclass
class NetworkSet:
    """Weight updates on top of the checkpoint (A1111's LoRA networks): `key` identifies the set and strengths
    (equal keys: equal weights); compute(base) returns {UNet weight name: new value} for the weights it changes."""

    key: Hashable
    compute: Callable[[BaseLoader], Mapping[str, torch.Tensor]]
    _deltas: Mapping[str, torch.Tensor] | None = None

    def deltas(self, base: BaseLoader) -> Mapping[str, torch.Tensor]:
        if self._deltas is None:
            self._deltas = self.compute(base)
        return self._deltas


NO_NETWORKS = NetworkSet((), lambda base: {})
#: For `EngineSlot.ready`: leave whatever LoRA set the engine holds (the generation's set is not known yet).
KEEP_NETWORKS = NetworkSet(("sdtrt: keep the engine's networks",), lambda base: {})


class NetworksFailed(SdtrtError):
    """A LoRA set could not be put into an engine (the engine keeps its previous weights or is reloaded)."""


class EngineSlot:
    """One engine a server may use. Its profile ranges come from the manifest, so choosing a profile never
    loads anything; the engine is opened (verified, loaded, refitted) the first time a call fits it.

    Every use happens under the session's lock (`ready`): the weights are made right and the call runs in one hold,
    so a refit from another thread (another server sharing the engine, a LoRA change) never interleaves."""

    def __init__(self, manifest: Manifest, opener: Callable[[str], EngineSession],
                 on_evict: Callable[[str, EngineSession], None] = lambda engine_id, session: session.close()):
        self.manifest = manifest
        self._on_evict = on_evict
        self.contract = engine_contract(manifest)
        self.profiles = [Profile.parse(p) for p in manifest.key.profiles]
        self.ranges: list[dict[str, TensorRange]] = [self.contract.engine_ranges(p) for p in self.profiles]
        self._opener = opener
        self.session: EngineSession | None = None
        self.broken: str | None = None

    @property
    def id(self) -> str:
        return self.manifest.id

    def evict(self, session: EngineSession | None = None) -> None:
        """Forget the loaded engine (its weights are in an unknown state); the next use loads it afresh. With
        `session`, only if that is still the slot's session (another thread may have reloaded it already)."""
        current = self.session
        if session is not None and current is not session:
            return
        self.session = None
        if current is not None:
            self._on_evict(self.id, current)

    def profile_for(self, dims: Mapping[str, Dims]) -> int | None:
        return select_profile(self.ranges, dict(dims))

    @contextlib.contextmanager
    def ready(self, weights: WeightSource | None, counters: Counters, networks: NetworkSet | None = None,
              wait: float | None = None) -> Iterator[EngineSession]:
        """The loaded engine holding the checkpoint's weights plus `networks`, held for the caller's exclusive use.

        Raises EngineBusy (another thread holds it longer than `wait`), EngineClosed (unloaded meanwhile: the
        slot forgets it, the next use reloads), NetworksFailed (the LoRA set did not go in; the engine keeps its
        previous weights), and what loading or the checkpoint refit raised. `networks` None means none;
        KEEP_NETWORKS leaves the engine's set as it is (at activation, before the generation's set is known)."""
        session = self.session
        if session is None:
            session = self._opener(self.id)
            self.session = session
        try:
            with session.hold(wait):
                self._sync(session, weights, counters, networks or NO_NETWORKS)
                yield session
        except EngineClosed:
            if self.session is session:
                self.session = None
            raise

    def open(self, weights: WeightSource | None, counters: Counters, networks: NetworkSet | None = None,
             wait: float | None = None) -> EngineSession:
        """Load if needed, then make the engine hold the loaded checkpoint's weights plus `networks`."""
        with self.ready(weights, counters, networks, wait) as session:
            return session

    def _sync(self, session: EngineSession, weights: WeightSource | None, counters: Counters,
              nets: NetworkSet) -> None:
        """Under the session's lock. A refit that failed half-way (weights unknown) drops the engine for a reload."""
        keep = nets is KEEP_NETWORKS
        if weights is None or (session.weights_from == weights.sha256 and (keep or session.deltas.key == nets.key)):
            return  # the per-call path: nothing to do
        try:
            if session.weights_from != weights.sha256:
                start = time.perf_counter()
                if session.load_weights(weights.load(None), weights.sha256):
                    counters.refit(len(session.runner.weight_names()), time.perf_counter() - start)
            if not keep and session.deltas.key != nets.key:
                refusal = None if nets.key == NO_NETWORKS.key else refit_refusal(session.manifest, "LoRA weights")
                if refusal is not None:  # before the LoRA maths: the engine could not take its result
                    raise NetworksFailed(refusal)
                start = time.perf_counter()
                try:
                    plan = session.apply_deltas(nets.key, nets.deltas(weights.load), weights.load)
                except Exception as e:
                    raise NetworksFailed(f"the LoRA weights could not be put into the engine: {type(e).__name__}: "
                                         f"{e}") from e
                if plan is not None and plan.weights:
                    counters.refit(len(plan.weights), time.perf_counter() - start)
        finally:
            if session.weights_unknown is not None:
                self.evict(session)


class UnetServer:
    """The callable behind an SdUnet: `server(x, timesteps, context, y=...)` returns what the torch UNet would.

    fallback(x, timesteps, context, *args, **kwargs) runs the PyTorch UNet; notify(reason) tells the user (the
    caller deduplicates); policy() "error" raises instead of falling back when no profile covers a call. Policy and
    enabled are read per call: a per-request override must neither be missed nor outlive its request.
    """

    def __init__(
        self,
        slots: list[EngineSlot],
        *,
        fallback: Callable[..., torch.Tensor],
        counters: Counters,
        notify: Callable[[str], None],
        weights: WeightSource | None = None,
        policy: Callable[[], FallbackPolicy] = lambda: FallbackPolicy.PYTORCH,
        unusable: str | None = None,
        enabled: Callable[[], bool] = lambda: True,
    ):
        self.slots = slots
        self.fallback = fallback
        self.counters = counters
        self.notify = notify
        self.weights = weights
        self.policy = policy
        self.unusable = unusable  # a reason every call goes to PyTorch (wrong family, failed activation)
        self.enabled = enabled
        self.networks: NetworkSet | None = None
        self.problem: str | None = None  # why this generation runs on PyTorch (a failed LoRA refit); reset per generation
        #: why this sampling pass runs on PyTorch (the live UNet was changed: a forward hook, tiling); set per pass
        self.bypass: str | None = None

    def set_networks(self, networks: NetworkSet) -> None:
        """Put a LoRA set into every loaded engine now (before the first call of a pass); engines loaded later get
        it on load. Raises what the update or refit raised (NetworksFailed for the LoRA maths or refit); the engine
        then keeps its previous weights (or is dropped, to be reloaded clean, when its backend cannot tell)."""
        self.networks = networks
        for slot in self.slots:
            session = slot.session
            if session is None or slot.broken is not None:
                continue
            try:
                slot.open(self.weights, self.counters, networks)
            except EngineClosed:
                continue  # unloaded meanwhile: it gets this set when it is loaded again

    def prepare(self) -> bool:
        """Open the first engine now (at activation) so the first sampling step does not pay for the load.
        Returns whether an engine is loaded and ready."""
        for slot in self.slots:
            if slot.broken is None:
                try:
                    with slot.ready(self.weights, self.counters, self.networks or KEEP_NETWORKS, wait=BUSY_WAIT_S):
                        return True
                except (EngineBusy, EngineClosed):
                    return False  # another thread is on it; the first call retries
                except NetworksFailed as e:
                    self.problem = str(e)
                    return False
                except Exception as e:  # noqa: BLE001 - a broken engine must never fail the activation
                    self._broken(slot, e, "failed to load")
                    return False
        return False

    def _broken(self, slot: EngineSlot, e: BaseException, what: str) -> str:
        slot.broken = (f"engine {slot.id} cannot be used: {e}" if isinstance(e, SdtrtError)
                       else f"engine {slot.id} {what}: {type(e).__name__}: {e}")
        self.counters.error(slot.broken)
        log.error("sdtrt: %s", slot.broken)
        return slot.broken

    def to_pytorch(self, reason: str, args: tuple[Any, ...], kwargs: dict[str, Any], *, user: bool = True,
                    fallback: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        self.counters.fallback(reason)
        if user:
            self.notify(reason)
        return (fallback or self.fallback)(*args, **kwargs)

    @property
    def takes_control(self) -> bool:
        """Whether a usable engine of this server has ControlNet inputs."""
        return any(s.broken is None and s.contract.takes_control for s in self.slots)

    def no_engine_reason(self, seen: tuple[EngineSlot, Mapping[str, Dims]] | None, refused: str | None
                         ) -> tuple[str, bool]:
        """Why no engine ran a call: (reason, whether it is a size no profile covers, which the "error" policy
        refuses). `seen`: the first slot whose contract took the call, with the call's shapes; `refused`: why the
        contracts refused it."""
        broken = [s.broken for s in self.slots if s.broken]
        if broken and all(s.broken for s in self.slots):
            return broken[0], True
        if seen is None and refused is not None:
            return refused, False
        covered = "; ".join(f"{s.id}: {', '.join(map(str, s.profiles))}" for s in self.slots) or "none"
        described = seen[0].contract.describe(seen[1]) if seen is not None else "no engine"
        return f"no engine profile covers this call ({described}); profiles: {covered}", True

    def gate(self) -> str | None:
        """Why every call runs on PyTorch now, before looking at the call (None: the engines decide per call)."""
        if not self.enabled():
            return SWITCHED_OFF
        return self.unusable or self.problem or self.bypass

    def route(self, dims_of: Callable[[EngineSlot], Mapping[str, Dims]]) -> tuple[EngineSlot | None, int | None, str | None]:
        """Where a call would run, decided as `serve` decides it but without loading or running anything:
        (slot, profile index, None) for an engine, else (None, None, reason). `dims_of(slot)` gives the call's
        input shapes for that slot's contract (raising NotServable when the contract cannot take it)."""
        gate = self.gate()
        if gate is not None:
            return None, None, gate
        refused: str | None = None
        seen: tuple[EngineSlot, Mapping[str, Dims]] | None = None
        for slot in self.slots:
            if slot.broken is not None:
                continue
            try:
                dims = dims_of(slot)
            except NotServable as e:
                refused = refused or str(e)
                continue
            seen = seen or (slot, dims)
            index = slot.profile_for(dims)
            if index is not None:
                return slot, index, None
        return None, None, self.no_engine_reason(seen, refused)[0]

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        return self.serve((x, timesteps, context, *args), kwargs, self.fallback)

    def serve(self, call: tuple[Any, ...], kwargs: dict[str, Any], fallback: Callable[..., torch.Tensor]
              ) -> torch.Tensor:
        """One UNet call: on the first engine whose contract takes it and whose profile covers it, else
        `fallback(*call, **kwargs)` (counted, and told unless the extension is off)."""
        x = call[0]
        if not self.enabled():
            return self.to_pytorch(SWITCHED_OFF, call, kwargs, user=False, fallback=fallback)
        reason = self.unusable or self.problem or self.bypass
        if reason is not None:
            return self.to_pytorch(reason, call, kwargs, fallback=fallback)
        refused: str | None = None  # why the engines' contracts cannot take this call
        seen: tuple[EngineSlot, dict[str, Dims]] | None = None  # a slot that took the call, to describe it
        for slot in self.slots:
            if slot.broken is not None:
                continue
            try:
                feeds = slot.contract.feeds(call, kwargs)
            except NotServable as e:
                refused = refused or str(e)
                continue
            dims: dict[str, Dims] = {name: tuple(t.shape) for name, t in feeds.items()}
            seen = seen or (slot, dims)
            index = slot.profile_for(dims)
            if index is None:
                continue
            out = None
            stage = "failed to load"
            try:
                with slot.ready(self.weights, self.counters, self.networks, wait=BUSY_WAIT_S) as session:
                    stage = "failed during a call"
                    out = session.runner.infer(feeds, index)
            except (EngineBusy, EngineClosed) as e:  # this call only: the engine is fine, just not free now
                return self.to_pytorch(str(e), call, kwargs, fallback=fallback)
            except NetworksFailed as e:  # this generation: the engine lacks the LoRA set
                self.problem = str(e)
                self.counters.error(self.problem)
                log.error("sdtrt: %s", self.problem)
                return self.to_pytorch(self.problem, call, kwargs, fallback=fallback)
            except Exception as e:  # noqa: BLE001 - fall back rather than fail a generation
                reason = self._broken(slot, e, stage)
                if stage == "failed during a call":
                    return self.to_pytorch(reason, call, kwargs, fallback=fallback)
                continue
            self.counters.engine_call()
            return out.to(device=x.device, dtype=x.dtype)
        reason, uncovered = self.no_engine_reason(seen, refused)
        if not uncovered:  # no engine takes this kind of call at all, or every engine is broken
            return self.to_pytorch(reason, call, kwargs, fallback=fallback)
        if self.policy() is FallbackPolicy.ERROR:
            raise NoMatchingProfile(reason + ". Build an engine with a profile for this size in the TensorRT "
                                    "tab, or set the sdtrt fallback policy to 'pytorch'.")
        return self.to_pytorch(reason, call, kwargs, fallback=fallback)

