"""A loaded engine that answers UNet calls: verified before loading, weights filled by refit, one profile picked
per call from the call's shapes.

Thread safety: every use of the loaded engine (a call, a refit, closing it) happens under the session's lock, so a
refit never runs while a call reads the weights (calls see the old weights or the new ones, never a mix) and a
closed engine is never called. Callers that must not block for long (the sampler's UNet calls) pass a timeout to
`hold` and get EngineBusy instead of waiting.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sdtrt.backends import backend_class
from sdtrt.backends.base import Backend, EngineRunner
from sdtrt.engine_types import WeightsMode
from sdtrt.errors import (
    CorruptEngine,
    EngineBusy,
    EngineClosed,
    EngineNotFound,
    NoMatchingProfile,
    RefitError,
    RefitRejected,
    SdtrtError,
    StaleEngine,
    UnknownWeights,
)
from sdtrt.pipeline.refit import BaseLoader, RefitPlan, WeightTracker
from sdtrt.serving.spec import EngineSpec, OfSpec, refit_refusal
from sdtrt.storage.manifest import Manifest, stale_reason
from sdtrt.storage.registry import Registry


def _check_files(registry: Registry, engine_id: str, backend: Backend, quarantine: bool) -> Manifest:
    """registry.verify, telling damaged files (CorruptEngine) from a foreign backend version or GPU and manifest
    problems (StaleEngine). With `quarantine`, a damaged engine is also moved aside (kept, never deleted)."""
    info = backend.info()
    try:
        return registry.verify(engine_id, info)
    except StaleEngine as e:
        try:
            st = registry.status(engine_id)  # cheap look again: which part failed?
        except SdtrtError:
            raise e from None
        m = st.manifest
        if m is None or m.id != engine_id or stale_reason(m.key, info) is not None or "cannot read" in str(e):
            raise  # unreadable manifest, another backend version/GPU (rebuild offered), or a read error (retried)
        action = "Rebuild it (the TensorRT tab's Rebuild, or `python -m sdtrt build`): the damaged files are moved " \
                 "aside for inspection, not deleted"
        if quarantine:
            try:
                action = f"It was moved aside to {registry.quarantine(engine_id).name} for inspection; rebuild it"
            except EngineNotFound:
                action = "Another process already moved it aside; rebuild it"
            except (OSError, SdtrtError) as q:
                action = f"Moving it aside failed ({type(q).__name__}: {q}); rebuild it"
        raise CorruptEngine(f"{e}. It was never deserialized. {action}") from None


@dataclass
class EngineSession(OfSpec):
    spec: EngineSpec
    runner: EngineRunner
    weights_from: str | None  # sha256 of the checkpoint whose weights are in the engine
    deltas: WeightTracker = field(default_factory=WeightTracker)  # what differs from that checkpoint (LoRA)
    #: set when a refit failed half-way in a backend that cannot undo it: the weights are unknown, reload the engine
    weights_unknown: str | None = None
    closed: bool = False
    lock: Any = field(default_factory=threading.RLock, repr=False, compare=False)  # an RLock
    cuda_graphs: bool = True  # loaded with CUDA graphs allowed (the backend decides whether it has any)

    @classmethod
    def open(cls, registry: Registry, engine_id: str, *, quarantine: bool = False, cuda_graphs: bool = True
             ) -> EngineSession:
        """Verify (manifest, sizes, sha256, backend version and device) before any deserialization, then load.
        Files that do not match the manifest raise CorruptEngine (with `quarantine`, after moving the engine
        aside); another backend version or GPU raises StaleEngine. `cuda_graphs=False` loads without CUDA graphs."""
        manifest = registry.get(engine_id)
        backend = backend_class(manifest.key.backend)(cuda_graphs=cuda_graphs)
        reason = backend.unavailable_reason()
        if reason is not None:
            raise StaleEngine(f"engine {engine_id} needs backend {manifest.key.backend}: {reason}")
        manifest = _check_files(registry, engine_id, backend, quarantine)
        spec = EngineSpec.of(manifest)
        runner = backend.load(registry.engine_dir(engine_id), [f.name for f in manifest.files], list(spec.ranges),
                              digests={f.name: f.sha256 for f in manifest.files})
        if runner is None:  # a runtime that answers None instead of raising (deserialize_cuda_engine does)
            raise StaleEngine(f"backend {manifest.key.backend} returned no engine for {engine_id}; rebuild it")
        embedded = manifest.key.weights is WeightsMode.EMBEDDED and not runner.needs_weights
        return cls(spec, runner, manifest.source_checkpoint.get("sha256") if embedded else None,
                   cuda_graphs=cuda_graphs)

    @contextlib.contextmanager
    def hold(self, timeout: float | None = None) -> Iterator[EngineSession]:
        """Exclusive use of the engine. timeout None waits as long as it takes; else EngineBusy after `timeout` s.
        Raises EngineClosed once the session was closed."""
        if not self.lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise EngineBusy(f"engine {self.manifest.id} is busy in another thread (a refit or load) for more "
                             f"than {timeout:g} s")
        try:
            if self.closed:
                raise EngineClosed(f"engine {self.manifest.id} was unloaded (switched away, deleted or released)")
            yield self
        finally:
            self.lock.release()

    def _refit(self, weights: Mapping[str, torch.Tensor], fill: BaseLoader | None = None) -> None:
        """runner.refit; when it fails inside a backend that cannot promise 'all or nothing', the engine's weights
        are unknown from then on (`weights_unknown`): the caller must reload the engine before using it."""
        try:
            self.runner.refit(weights, fill=fill)
        except BaseException as e:
            if not self.runner.refit_is_atomic and not isinstance(e, RefitRejected):
                self.weights_unknown = f"a refit failed half-way ({type(e).__name__}: {e})"
            raise

    def _refuse_refit(self, what: str) -> None:
        """RefitRejected (nothing changes) for an engine built without refit: it serves its own checkpoint only."""
        reason = refit_refusal(self.manifest, what)
        if reason is not None:
            raise RefitRejected(reason)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], checkpoint_sha256: str) -> bool:
        """Refit every engine weight from a checkpoint's UNet state dict unless they are already in. Returns
        whether a refit happened. On any error the engine keeps its previous weights (or, see `_refit`, is marked
        `weights_unknown`)."""
        with self.hold():
            if self.weights_from == checkpoint_sha256:
                return False
            self._refuse_refit("another checkpoint's weights")
            names = self.runner.weight_names()
            missing = sorted(names - set(state_dict))
            if missing:
                raise RefitError(f"the checkpoint lacks {len(missing)} engine weights, e.g. {missing[:3]}")
            self._refit({n: state_dict[n] for n in names})
            self.weights_from = checkpoint_sha256
            self.deltas.reset()
            return True

    def apply_deltas(self, key: Hashable, deltas: Mapping[str, torch.Tensor], base: BaseLoader) -> RefitPlan | None:
        """Make the engine hold the checkpoint's weights with the names in `deltas` replaced by the given values
        (what a LoRA set makes of them); names the previous set changed go back to base. `base` loads weights of
        the checkpoint in `weights_from`. Returns the applied plan, None when nothing to do. Errors before the
        backend's refit (unknown names, the plan, loading base weights) change nothing."""
        with self.hold():
            if self.weights_from is None:
                raise RefitError("the engine holds no checkpoint weights yet; load a checkpoint's weights first")
            if key == self.deltas.key:
                return None
            if deltas:
                self._refuse_refit("LoRA weights")
            unknown = sorted(set(deltas) - self.runner.weight_names())
            if unknown:
                raise UnknownWeights(f"{len(unknown)} weight updates name no engine weight, e.g. {unknown[:3]}")
            plan = self.deltas.plan(key, deltas, base)
            if plan is None:
                return None
            if plan.weights:
                self._refit(plan.weights, fill=base)
            self.deltas.applied(plan)
            return plan

    def __call__(self, feeds: Mapping[str, torch.Tensor], profile: int | None = None,
                 wait: float | None = None) -> torch.Tensor:
        """Run the engine on its feeds (`contract.feeds` of a host call, or `contract.random_feeds`) with `profile`
        (the first that covers the feeds when None). NoMatchingProfile when none does; EngineBusy after `wait`."""
        if profile is None:
            dims = {k: tuple(v.shape) for k, v in feeds.items()}
            profile = self.spec.profile_for(dims)
            if profile is None:
                raise NoMatchingProfile(self.spec.uncovered(dims))
        with self.hold(wait):
            return self.runner.infer(dict(feeds), profile)

    def close(self) -> None:
        """Free the engine once no call or refit uses it (waits for the one in flight). Safe to call twice."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.runner.close()
