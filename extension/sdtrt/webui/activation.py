"""Which UNet server serves: the server each SD Unet option makes (its engine slots, or why every call runs on
PyTorch), switching the active one all-or-nothing, the PyTorch fallback (the UNet moved back to the device) with its
notice, and stopping everything at process exit."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdtrt.engine_types import RefitMode
from sdtrt.errors import SdtrtError, StaleEngine
from sdtrt.models.convention import A1111
from sdtrt.serving.counters import Counters
from sdtrt.serving.server import FallbackPolicy, UnetServer
from sdtrt.serving.slot import EngineSlot, WeightSource
from sdtrt.serving.spec import refit_refusal
from sdtrt.storage.key import validate_engine_id
from sdtrt.webui.options import LoadedArch, OptionSpec, UnetOptions
from sdtrt.webui.sessions import close_all
from sdtrt.webui.state import ServiceState

log = logging.getLogger("sdtrt")


class SwapFailed(SdtrtError):
    """Switching from an active server to another failed; the previous one stays active and keeps serving."""


class Activation:
    def __init__(self, state: ServiceState, options: UnetOptions) -> None:
        self.state = state
        self.options = options
        #: the PyTorch UNet was moved back to the device for a fallback; the generation's end offloads it again
        self.unet_moved = False

    def make_server(self, spec: OptionSpec) -> UnetServer:
        """The server an SdUnet delegates to. Never raises: a problem becomes the reason every call of this
        option runs on PyTorch (and the user is told), so a generation never fails on activation."""
        return self.server_for(spec, self.options.loaded_arch, self.weights_for_loaded)

    def server_for(self, spec: OptionSpec, arch_of: Callable[[], LoadedArch | None],
                   weights_for: Callable[[], WeightSource | None], *, counters: Counters | None = None
                   ) -> UnetServer:
        """The server of `spec` for a model of architecture `arch_of()` whose weights `weights_for()` gives (the
        loaded model's for serving; a checkpoint's identity only, for a prediction, which passes its own
        `counters` so that nothing it finds reaches /status or the log). Never raises: what those raise becomes
        the reason every call runs on PyTorch."""
        serving = counters is None
        counters = self.state.counters if counters is None else counters
        slots: list[EngineSlot] = []
        unusable: str | None = None
        weights: WeightSource | None = None
        host = self.state.host
        convention = host.unet_convention() if host is not None else A1111
        try:
            registry = self.state.registry()
            manifests = [registry.get(validate_engine_id(i)) for i in spec.engine_ids]
            arch = arch_of()
            if arch is None:
                unusable = "no model is loaded"
            elif arch.problem is not None:
                unusable = arch.problem
            else:
                fitting = [m for m in manifests if m.key.arch_hash == arch.arch_hash]
                if not fitting:
                    fams = ", ".join(sorted({m.key.family for m in manifests}))
                    unusable = (f"the engine is for {fams}; the loaded checkpoint is {arch.family} with another "
                                "architecture. Pick the engine of this checkpoint or build one in the TensorRT tab")
                weights = weights_for()
                # an engine without refit serves the checkpoint it embeds, only
                own = [m for m in fitting if m.key.refit_mode is RefitMode.REFIT
                       or (weights is not None and m.source_checkpoint.get("sha256") == weights.sha256)]
                if fitting and not own:
                    unusable = refit_refusal(fitting[0], "the loaded checkpoint's weights")
                fitting = own
                slots = [EngineSlot(m, self.state.sessions.open, self.state.sessions.evict) for m in fitting]
                # plain calls go to the first slot that covers them: a plain engine before one with ControlNet
                # inputs (which serves them too, fed zeros); ControlNet calls find the latter. Among those, the
                # engines of the host's convention first (the others serve only sizes where both agree)
                slots.sort(key=lambda slot: (slot.contract.takes_control, slot.contract.io.convention != convention))
        except StaleEngine as e:  # damaged or foreign files, found by the cheap look before any load
            unusable = f"{e}; rebuild the engine (TensorRT tab) or pick another one"
        except SdtrtError as e:
            unusable = str(e)
        except Exception as e:
            if serving:
                log.exception("sdtrt: cannot prepare %s", spec.label)
            unusable = f"{type(e).__name__}: {e}"
        if unusable is not None:
            counters.error(unusable)
        server = UnetServer(slots, policy=HostPolicy(self), counters=counters, weights=weights, unusable=unusable,
                            convention=convention)
        return server

    def weights_for_loaded(self) -> WeightSource | None:
        """Weights come from the checkpoint file when it is safetensors (free of merged LoRA and host patches),
        else from the host's UNet."""
        host = self.state.require_host()
        ref = host.loaded_checkpoint()
        if ref is None:
            return None
        sha = self.options.checkpoint_sha256(ref) or f"loaded:{ref.title}"
        device = "cpu" if host.device().type != "cuda" else str(host.device())

        def load(names: Sequence[str] | None) -> Mapping[str, torch.Tensor]:
            if ref.filename.endswith(".safetensors"):
                from sdtrt.pipeline.checkpoint import read_unet_state_dict

                # straight to the GPU when there is one: A1111's LoRA maths then runs there, and the refitter
                # takes device memory
                return read_unet_state_dict(Path(ref.filename), device=device, names=names)
            unet = host.torch_unet()
            if unet is None:
                raise SdtrtError("no model is loaded to take weights from")
            sd = unet.state_dict()
            return sd if names is None else {n: sd[n] for n in names if n in sd}

        return WeightSource(sha, load)

    def activate(self, server: UnetServer, label: str) -> None:
        """Make `server` the active one. Replacing another active server is all-or-nothing: the new engine is
        loaded first, while the previous server keeps serving; if it cannot be (or anything before the switch
        raises) the previous server stays active and SwapFailed says why. Without an active server (A1111
        deactivates the old UNet before activating the new one) the other engines are unloaded first, so two
        never share the device memory, and a failed load makes this server's calls run on PyTorch."""
        usable = server.unusable is None and self.state.settings().enabled  # may raise: nothing changed yet
        with self.state.lock:
            previous, previous_label = self.state.active, self.state.active_label
        prepared = False
        if previous is not None and previous is not server and server.unusable is not None:
            raise SwapFailed(f"cannot switch to {label}: {server.unusable}; still serving {previous_label}")
        if previous is not None and previous is not server and usable and server.slots:
            server.prepare()
            if all(s.broken is not None for s in server.slots):
                reason = next(s.broken for s in server.slots if s.broken is not None)
                raise SwapFailed(f"cannot switch to {label}: {reason}; still serving {previous_label}")
            prepared = True
        with self.state.lock:
            self.state.active, self.state.active_label = server, label
            stale = self.state.sessions.take(keep=[s.id for s in server.slots])
        close_all(stale)
        if usable and not prepared:
            server.prepare()

    def deactivate(self, server: UnetServer) -> None:
        with self.state.lock:
            if self.state.active is server:
                self.state.active, self.state.active_label = None, None

    def torch_fallback(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run one call on the host's PyTorch UNet, first moving it back to the device (the host offloads it to
        the CPU while an engine is active). It goes back to the CPU when the generation ends."""
        host = self.state.require_host()
        unet = host.torch_unet()
        if unet is None:
            raise SdtrtError("no PyTorch UNet to fall back to")
        self.torch_unet_to_device(unet)
        return host.torch_forward(unet)(*args, **kwargs)

    def torch_unet_to_device(self, unet: torch.nn.Module) -> None:
        """Back on the device (unless --lowvram, whose hooks place its blocks); `end` offloads it again."""
        host = self.state.require_host()
        if host.lowvram():
            return
        param = next(unet.parameters(), None)
        if param is not None and param.device != host.device():
            unet.to(host.device())
            self.unet_moved = True

    def notify(self, reason: str) -> None:
        gen = self.state.generation
        if gen is not None and reason in gen.told:
            return
        log.warning("sdtrt: running on PyTorch: %s", reason)
        if gen is not None:
            gen.told.add(reason)
            self.state.require_host().tell_user(gen.p, f"TensorRT: some UNet calls ran on PyTorch: {reason}")

    def shutdown(self, timeout: float = 5.0) -> dict[str, Any]:
        """Process exit (or the extension unloading for good): stop serving, cancel queued and running builds, and
        unload every engine, returning within about `timeout` seconds whatever a build is doing. A running build
        stops at its next progress report; the registry never publishes a half-built engine, and its temporary
        folder is removed by the build itself or by the next cleanup. Afterwards no engine is loaded again (a
        UNet call still routed here runs on PyTorch) until the service is attached again. Returns what was left
        running."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self.state.lock:
            self.state.active, self.state.active_label = None, None
            stale = self.state.sessions.stop()
        pending = [j for j in self.state.jobs.list() if not j.state.finished]
        for job in pending:
            with contextlib.suppress(SdtrtError):
                self.state.jobs.cancel(job.id)
        closer = threading.Thread(target=close_all, args=(stale,), name="sdtrt-shutdown", daemon=True)
        closer.start()
        closer.join(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline and any(not j.state.finished for j in pending):
            time.sleep(0.02)
        return {"unloaded": not closer.is_alive(),
                "builds_left": [j.id for j in pending if not j.state.finished]}


class HostPolicy:
    """The ServingPolicy of the service's servers: the settings of the generation in progress, the host's PyTorch
    UNet (moved back to the device) and its notices."""

    def __init__(self, activation: Activation) -> None:
        self.activation = activation

    def enabled(self) -> bool:
        return self.activation.state.settings().enabled

    def on_uncovered(self) -> FallbackPolicy:
        return self.activation.state.settings().fallback

    def run_pytorch(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.activation.torch_fallback(*args, **kwargs)

    def tell(self, reason: str) -> None:
        self.activation.notify(reason)
