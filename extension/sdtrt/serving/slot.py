"""One engine a UNet server may use (its slot), and what it must hold: the checkpoint's weights (`WeightSource`) and
a LoRA set on top (`NetworkSet`). The slot loads its engine the first time a call fits it and keeps its weights
right under the session's lock."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from sdtrt.errors import EngineClosed, SdtrtError
from sdtrt.pipeline.refit import BaseLoader
from sdtrt.profiles import Dims
from sdtrt.serving.counters import Counters
from sdtrt.serving.session import EngineSession
from sdtrt.serving.spec import EngineSpec, OfSpec, refit_refusal
from sdtrt.storage.manifest import Manifest


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


class EngineSlot(OfSpec):
    """One engine a server may use. Its profile ranges come from the manifest, so choosing a profile never
    loads anything; the engine is opened (verified, loaded, refitted) the first time a call fits it.

    Every use happens under the session's lock (`ready`): the weights are made right and the call runs in one hold,
    so a refit from another thread (another server sharing the engine, a LoRA change) never interleaves."""

    def __init__(self, manifest: Manifest, opener: Callable[[str], EngineSession],
                 on_evict: Callable[[str, EngineSession], None] = lambda engine_id, session: session.close()):
        self._on_evict = on_evict
        self.spec = EngineSpec.of(manifest)
        self._opener = opener
        self.session: EngineSession | None = None
        self.broken: str | None = None

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
        return self.spec.profile_for(dims)

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
                except NetworksFailed:  # the host's own refusal says why already
                    raise
                except Exception as e:
                    raise NetworksFailed(f"the LoRA weights could not be put into the engine: {type(e).__name__}: "
                                         f"{e}") from e
                if plan is not None and plan.weights:
                    counters.refit(len(plan.weights), time.perf_counter() - start)
        finally:
            if session.weights_unknown is not None:
                self.evict(session)
