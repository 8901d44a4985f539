"""A loaded engine that answers UNet calls: verified before loading, weights filled by refit, one profile picked
per call from the call's shapes."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import torch

from sdtrt.backends import backend_class
from sdtrt.backends.base import EngineRunner
from sdtrt.constants import INPUT_CONTEXT, INPUT_SAMPLE, INPUT_TIMESTEPS, INPUT_Y
from sdtrt.errors import NoMatchingProfile, RefitError, StaleEngine
from sdtrt.profiles import Dims, Profile, TensorIO, TensorRange, engine_ranges, select_profile
from sdtrt.refit import BaseLoader, RefitPlan, WeightTracker
from sdtrt.registry import Manifest, Registry


@dataclass
class EngineSession:
    manifest: Manifest
    runner: EngineRunner
    profiles: list[Profile]
    ranges: list[dict[str, TensorRange]]
    io: TensorIO
    weights_from: str | None  # sha256 of the checkpoint whose weights are in the engine
    deltas: WeightTracker = field(default_factory=WeightTracker)  # what differs from that checkpoint (LoRA)

    @classmethod
    def open(cls, registry: Registry, engine_id: str) -> EngineSession:
        """Verify (manifest, sizes, sha256, backend version and device) before any deserialization, then load."""
        manifest = registry.get(engine_id)
        backend = backend_class(manifest.key.backend)()
        reason = backend.unavailable_reason()
        if reason is not None:
            raise StaleEngine(f"engine {engine_id} needs backend {manifest.key.backend}: {reason}")
        manifest = registry.verify(engine_id, backend.info())
        io = TensorIO(int(manifest.key.io["in_channels"]), int(manifest.key.io["context_dim"]),
                      None if manifest.key.io.get("y_dim") is None else int(manifest.key.io["y_dim"]))
        profiles = [Profile.parse(p) for p in manifest.key.profiles]
        ranges = [engine_ranges(p, io) for p in profiles]
        runner = backend.load(registry.engine_dir(engine_id), [f.name for f in manifest.files], ranges)
        embedded = manifest.key.weights == "embedded" and not runner.needs_weights
        return cls(manifest, runner, profiles, ranges, io,
                   manifest.source_checkpoint.get("sha256") if embedded else None)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], checkpoint_sha256: str) -> bool:
        """Refit every engine weight from a checkpoint's UNet state dict unless they are already in. Returns
        whether a refit happened."""
        if self.weights_from == checkpoint_sha256:
            return False
        names = self.runner.weight_names()
        missing = sorted(names - set(state_dict))
        if missing:
            raise RefitError(f"the checkpoint lacks {len(missing)} engine weights, e.g. {missing[:3]}")
        self.runner.refit({n: state_dict[n] for n in names})
        self.weights_from = checkpoint_sha256
        self.deltas.reset()
        return True

    def apply_deltas(self, key: Hashable, deltas: Mapping[str, torch.Tensor], base: BaseLoader) -> RefitPlan | None:
        """Make the engine hold the checkpoint's weights with the names in `deltas` replaced by the given values
        (what a LoRA set makes of them); names the previous set changed go back to base. `base` loads weights of
        the checkpoint in `weights_from`. Returns the applied plan, None when nothing to do. On a RefitError the
        engine's weights are unknown: the caller must reload it."""
        if self.weights_from is None:
            raise RefitError("the engine holds no checkpoint weights yet; load a checkpoint's weights first")
        if key == self.deltas.key:
            return None
        unknown = sorted(set(deltas) - self.runner.weight_names())
        if unknown:
            raise RefitError(f"{len(unknown)} weight updates name no engine weight, e.g. {unknown[:3]}")
        plan = self.deltas.plan(key, deltas, base)
        if plan is None:
            return None
        if plan.weights:
            self.runner.refit(plan.weights, fill=base)
        self.deltas.applied(plan)
        return plan

    def profile_for(self, dims: dict[str, Dims]) -> int | None:
        return select_profile(self.ranges, dims)

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        feeds = {INPUT_SAMPLE: x, INPUT_TIMESTEPS: timesteps.float(), INPUT_CONTEXT: context}
        if self.io.y_dim is not None:
            if y is None:
                raise NoMatchingProfile("this engine (SDXL) needs the y vector")
            feeds[INPUT_Y] = y
        dims = {k: tuple(v.shape) for k, v in feeds.items()}
        index = self.profile_for(dims)
        if index is None:
            raise NoMatchingProfile(
                f"no profile of engine {self.manifest.id} covers sample {dims[INPUT_SAMPLE]}, context "
                f"{dims[INPUT_CONTEXT]}; its profiles are {', '.join(map(str, self.profiles))}"
            )
        return self.runner.infer(feeds, index).to(x.dtype)

    def close(self) -> None:
        self.runner.close()

