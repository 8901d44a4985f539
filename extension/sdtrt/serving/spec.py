"""What serving knows of an engine before loading it, made once from its manifest: the model contract it was built
with, its profiles and the input ranges each profile takes. The slot that routes calls to an engine and the session
that runs it share one EngineSpec, so a call is routed and run against the same ranges."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sdtrt.engine_types import RefitMode
from sdtrt.errors import SdtrtError, StaleEngine
from sdtrt.models import ModelContract, bind_record
from sdtrt.profiles import Dims, Profile, TensorRange, select_profile
from sdtrt.storage.manifest import Manifest


def engine_contract(manifest: Manifest) -> ModelContract:
    """The model contract an engine was built with (StaleEngine when this version cannot serve it)."""
    try:
        return bind_record(manifest.key.io)
    except (SdtrtError, KeyError, TypeError, ValueError) as e:
        raise StaleEngine(f"engine {manifest.id}: {e}") from None


def refit_refusal(manifest: Manifest, what: str) -> str | None:
    """Why the engine of `manifest` cannot take `what` (other weights), None when it can: an engine built without
    refit (on purpose, or ahead of time without a GPU) serves the checkpoint whose weights it embeds, only."""
    if manifest.key.refit_mode is RefitMode.REFIT:
        return None
    source = manifest.source_checkpoint.get("name") or "its checkpoint"
    built = (f"built ahead of time for {', '.join(manifest.key.targets)} without refit"
             if manifest.key.targets else "built without refit")
    return (f"engine {manifest.id} cannot take {what}: it was {built} and embeds the weights of {source}; "
            "build an engine for this checkpoint (or one with refit, on a GPU of its targets) to serve it")


@dataclass(frozen=True)
class EngineSpec:
    manifest: Manifest
    contract: ModelContract
    profiles: tuple[Profile, ...]
    ranges: tuple[dict[str, TensorRange], ...]

    @classmethod
    def of(cls, manifest: Manifest) -> EngineSpec:
        """Raises StaleEngine when this version cannot serve the engine's contract."""
        contract = engine_contract(manifest)
        profiles = tuple(Profile.parse(p) for p in manifest.key.profiles)
        return cls(manifest, contract, profiles, tuple(contract.engine_ranges(p) for p in profiles))

    @property
    def id(self) -> str:
        return self.manifest.id

    def profile_for(self, dims: Mapping[str, Dims]) -> int | None:
        """The first profile whose ranges cover the call's input shapes, or None."""
        return select_profile(list(self.ranges), dict(dims))

    def uncovered(self, dims: Mapping[str, Dims]) -> str:
        """Why no profile of this engine takes a call of these shapes."""
        return (f"no profile of engine {self.id} covers this call ({self.contract.describe(dict(dims))}); its "
                f"profiles are {', '.join(map(str, self.profiles))}")


class OfSpec:
    """What a holder of an EngineSpec (a slot, a session) tells of its engine."""

    spec: EngineSpec

    @property
    def id(self) -> str:
        return self.spec.manifest.id

    @property
    def manifest(self) -> Manifest:
        return self.spec.manifest

    @property
    def contract(self) -> ModelContract:
        return self.spec.contract

    @property
    def profiles(self) -> tuple[Profile, ...]:
        return self.spec.profiles
