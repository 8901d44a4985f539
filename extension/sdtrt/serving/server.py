"""Serving the sampler's UNet calls: per call, the first engine profile that covers the call's shapes runs it
(`route.plan`); a call no profile covers runs on the PyTorch UNet instead (or fails, by policy), and the user is told
once.

Host-agnostic: what the host decides (switched on, the fallback policy, the PyTorch forward, telling the user) comes
in as one `ServingPolicy`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sdtrt.errors import EngineBusy, EngineClosed, NoMatchingProfile, SdtrtError
from sdtrt.models import ControlFeeds, NotServable
from sdtrt.models.convention import A1111
from sdtrt.profiles import Dims
from sdtrt.serving.counters import Counters
from sdtrt.serving.route import InputsOf, Route, plan
from sdtrt.serving.slot import KEEP_NETWORKS, EngineSlot, NetworkSet, NetworksFailed, WeightSource

log = logging.getLogger("sdtrt")
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


class ServingPolicy(Protocol):
    """What the host decides for a server. Read per call: a per-request override must neither be missed nor outlive
    its request."""

    def enabled(self) -> bool:
        """Whether the extension is switched on (off: every call on PyTorch, nobody told)."""

    def on_uncovered(self) -> FallbackPolicy:
        """What a call no profile covers does."""

    def run_pytorch(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One call on the host's PyTorch UNet: run_pytorch(x, timesteps, context, *args, **kwargs)."""

    def tell(self, reason: str) -> None:
        """Tell the user why calls ran on PyTorch (the host deduplicates)."""


@dataclass
class FixedPolicy:
    """A ServingPolicy that does not change: headless use (benchmarks, checks)."""

    pytorch: Callable[..., torch.Tensor]
    switched_on: bool = True
    uncovered: FallbackPolicy = FallbackPolicy.PYTORCH

    def enabled(self) -> bool:
        return self.switched_on

    def on_uncovered(self) -> FallbackPolicy:
        return self.uncovered

    def run_pytorch(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.pytorch(*args, **kwargs)

    def tell(self, reason: str) -> None:
        log.info("sdtrt: running on PyTorch: %s", reason)


class UnetServer:
    """The callable behind an SdUnet: `server(x, timesteps, context, y=...)` returns what the torch UNet would."""

    def __init__(self, slots: list[EngineSlot], *, policy: ServingPolicy, counters: Counters,
                 weights: WeightSource | None = None, unusable: str | None = None, convention: str = A1111):
        self.slots = slots
        #: how the host's UNet upsamples (`sdtrt.models.convention`): an engine following the other convention
        #: serves only the latent sizes where both compute the same
        self.convention = convention
        self.policy = policy
        self.counters = counters
        self.weights = weights
        self.unusable = unusable  # a reason every call goes to PyTorch (wrong family, failed activation)
        self.networks: NetworkSet | None = None
        self.problem: str | None = None  # why this generation runs on PyTorch (a failed LoRA refit); reset per generation
        #: why this sampling pass runs on PyTorch (the live UNet was changed: a forward hook, tiling); set per pass
        self.bypass: str | None = None

    def enabled(self) -> bool:
        return self.policy.enabled()

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
            self.policy.tell(reason)
        return (fallback or self.policy.run_pytorch)(*args, **kwargs)

    @property
    def takes_control(self) -> bool:
        """Whether a usable engine of this server has ControlNet inputs."""
        return any(s.broken is None and s.contract.takes_control for s in self.slots)

    def gate(self) -> str | None:
        """Why every call runs on PyTorch now, before looking at the call (None: the engines decide per call)."""
        if not self.enabled():
            return SWITCHED_OFF
        return self.unusable or self.problem or self.bypass

    def route(self, dims_of: Callable[[EngineSlot], Mapping[str, Dims]]) -> Route:
        """Where a call would run, decided by the same `plan` as `serve` but without loading or running anything.
        `dims_of(slot)` gives the call's input shapes for that slot's contract (raising NotServable when the
        contract cannot take it)."""
        return plan(self.gate(), self.slots, self._same_numerics(lambda slot: (dims_of(slot), None)))

    def _same_numerics(self, inputs_of: InputsOf) -> InputsOf:
        """`inputs_of`, refusing (NotServable) a call an engine of the other convention would compute otherwise
        than the host's UNet."""
        def checked(slot: EngineSlot) -> tuple[Mapping[str, Dims], Any]:
            dims, inputs = inputs_of(slot)
            why = slot.contract.convention_refusal(dims, self.convention, slot.id)
            if why is not None:
                raise NotServable(why)
            return dims, inputs
        return checked

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        return self.serve((x, timesteps, context, *args), kwargs, self.policy.run_pytorch)

    def serve(self, call: tuple[Any, ...], kwargs: dict[str, Any], fallback: Callable[..., torch.Tensor],
              control: ControlFeeds | None = None) -> torch.Tensor:
        """One UNet call `forward(*call, **kwargs)` plus what a ControlNet hook adds to it (`control`: only the
        engines with ControlNet inputs take it): on the engine its route names, else `fallback(*call, **kwargs)`
        (counted, and told unless the extension is off). An engine that fails to load is marked broken and the call
        routed again."""
        x = call[0]

        def inputs_of(slot: EngineSlot) -> tuple[dict[str, Dims], dict[str, torch.Tensor]]:
            feeds = slot.contract.feeds(call, kwargs, control)
            return {name: tuple(t.shape) for name, t in feeds.items()}, feeds

        while True:
            route = plan(self.gate(), self.slots, self._same_numerics(inputs_of))
            slot = route.slot
            if slot is None:
                break
            stage = "failed to load"
            try:
                with slot.ready(self.weights, self.counters, self.networks, wait=BUSY_WAIT_S) as session:
                    stage = "failed during a call"
                    out = session(route.inputs, route.profile)
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
                continue  # this slot is broken now: route the call again
            self.counters.engine_call()
            return out.to(device=x.device, dtype=x.dtype)
        reason = route.reason or "no engine"
        if route.uncovered and self.policy.on_uncovered() is FallbackPolicy.ERROR:
            raise NoMatchingProfile(reason + ". Build an engine with a profile for this size in the TensorRT "
                                    "tab, or set the sdtrt fallback policy to 'pytorch'.")
        return self.to_pytorch(reason, call, kwargs, user=reason != SWITCHED_OFF, fallback=fallback)
