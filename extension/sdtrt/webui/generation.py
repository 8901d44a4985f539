"""The scope of one generation: it begins (settings read once, counters noted), gets its LoRA set into the engine,
decides before each sampling pass what the engine cannot serve (other code's hooks on the UNet, ControlNet units),
and ends (the PyTorch UNet offloaded again, what it did kept for /status)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from sdtrt.serving.slot import NetworkSet, NetworksFailed
from sdtrt.webui import controlnet, foreign
from sdtrt.webui.activation import Activation
from sdtrt.webui.reports import GenerationOutcome
from sdtrt.webui.state import Generation, ServiceState

log = logging.getLogger("sdtrt")


class GenerationScope:
    def __init__(self, state: ServiceState, activation: Activation) -> None:
        self.state = state
        self.activation = activation
        self.generations = 0
        self.last_generation: GenerationOutcome | None = None

    def begin(self, p: object) -> None:
        settings = self.state.require_host().settings()
        self.rescan()
        self.state.generation = Generation(p, settings, set(), self.state.counters.snapshot())
        if self.state.active is not None:
            self.state.active.problem = self.state.active.bypass = None
        # the CUDA graphs setting changed: engines load again, with the new setting, at first use
        if self.state.sessions.cuda_graphs_differ(settings.cuda_graphs):
            for slot in self.state.active.slots if self.state.active is not None else ():
                slot.evict()
            self.state.sessions.close()

    def rescan(self, *, now: bool = False) -> bool:
        """When engines were published into (or removed from) the cache since the SD Unet list was built, rebuild
        it: the host applies it before this generation's first UNet call (see webui/fleet.py). Looks at most every
        SDTRT_RESCAN_S seconds unless `now`; never fails a generation. Returns whether the list was rebuilt."""
        try:
            if not self.state.watcher.changed(self.state.registry().root, now=now):
                return False
            self.state.require_host().refresh_unet_list()
            return True
        except Exception:  # noqa: BLE001 - housekeeping: the generation goes on with the list it has
            log.exception("sdtrt: looking for new engines in the cache failed")
            return False

    def apply_networks(self) -> None:
        """After the host activated this pass's extra networks: put its LoRA set into the engine before the first
        UNet call (no refit when the set and strengths are unchanged). A failure sends this generation to PyTorch
        with the reason; the next generation tries again."""
        server = self.state.active
        if server is None or server.unusable is not None or not self.state.settings().enabled:
            return
        host = self.state.require_host()
        try:
            _check_network_files(host.network_files())
            key = host.network_key()
            if server.networks is not None and server.networks.key == key:
                return server.set_networks(server.networks)  # engines loaded since keep it too (no-op otherwise)
            server.set_networks(NetworkSet(key, host.network_weights))
        except Exception as e:
            if isinstance(e, NetworksFailed):  # a refusal with its reason: no traceback to show
                reason = str(e)
                log.warning("sdtrt: %s", reason)
            else:
                reason = f"the LoRA weights could not be put into the engine: {type(e).__name__}: {e}"
                log.exception("sdtrt: %s", reason)
            self.state.counters.error(reason)
            server.problem = reason

    def end(self, p: object) -> None:
        """After a generation: give the device memory the fallback used back to the engine."""
        gen = self.state.generation
        if gen is not None and gen.p is p:
            self.state.generation = None
            if gen.counted is not None:
                self.generations += 1
                self.last_generation = GenerationOutcome.between(gen.counted, self.state.counters.snapshot(),
                                                                 self.generations)
        host = self.state.require_host()
        unet = host.torch_unet()
        if unet is not None:
            controlnet.uninstall(unet)
        if self.activation.unet_moved and self.state.active is not None and self.state.active.enabled() and not host.lowvram():
            unet = host.torch_unet()
            if unet is not None:
                unet.to("cpu")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        self.activation.unet_moved = False
        if self.state.active is None:
            self.state.sessions.close()

    def before_sampling(self) -> None:
        """Before each sampling pass: when the live PyTorch UNet was changed in a way the engine cannot reproduce
        (a live forward hook such as ControlNet's, tiling's circular padding; see `foreign`), every UNet call of
        this pass runs on PyTorch, also the calls that reach the class forward (and so the engine) from inside
        such a hook, and the PyTorch UNet goes back on the device. A hook that was restored does not count."""
        server = self.state.active
        unet = self.state.require_host().torch_unet()
        if server is None:
            return
        if unet is not None:
            controlnet.uninstall(unet)  # a previous pass's; installed again below when this pass is served
        hook = None if unet is None else controlnet.recognise(unet)
        if hook is not None and unet is not None:
            server.bypass = (controlnet.unsupported(hook) or controlnet.patched_module(unet)
                             or foreign.conv_problem(unet)
                             or (None if server.takes_control else controlnet.NO_CONTROL_ENGINE))
            controlnet.install(unet, hook, self.controlnet_call)  # served, or counted as PyTorch calls
        else:
            server.bypass = None if unet is None else foreign.unservable(unet)
        if server.bypass is None or unet is None or not server.enabled():
            return
        self.activation.torch_unet_to_device(unet)
        self.activation.notify(server.bypass)

    def controlnet_call(self, hook: controlnet.Hook, args: tuple[Any, ...], kwargs: dict[str, Any]
                        ) -> torch.Tensor:
        """One UNet call of a ControlNet pass, served by sdtrt.webui.controlnet with the active server."""
        return controlnet.serve_call(self.state.active, self.state.require_host().torch_unet(), hook, args, kwargs,
                                     self.activation.torch_unet_to_device, self.activation.notify)


def _check_network_files(files: Sequence[str]) -> None:
    """Refuse to refit networks loaded from pickle files (.pt/.ckpt): the engine takes safetensors LoRAs only."""
    from sdtrt.pipeline.lora import require_safetensors

    for name in files or ():
        if name:
            require_safetensors(name)
