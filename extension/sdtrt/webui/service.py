"""The engine service behind the WebUI glue: which engines the SD Unet dropdown offers, the UNet server each
option creates, PyTorch fallback and its notices, counters, and build jobs. One instance per process
(`service()`); it survives A1111's "Reload UI", which re-executes scripts/ but keeps this module."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdtrt.serving.catalog import BackendProbe, EngineRow, engine_rows
from sdtrt.storage.key import validate_engine_id
from sdtrt.engine_types import RefitMode
from sdtrt.errors import (
    NoMatchingProfile,
    SdtrtError,
    StaleEngine,
)
from sdtrt.storage.manifest import Manifest
from sdtrt.models import CONTROL_KW, ControlFeeds
from sdtrt.storage.registry import Registry
from sdtrt.serving.session import EngineSession, refit_refusal
from sdtrt.serving.server import (
    SWITCHED_OFF,
    Counters,
    EngineSlot,
    NetworkSet,
    NetworksFailed,
    UnetServer,
    WeightSource,
)
from sdtrt.webui import builds, controlnet, foreign
from sdtrt.webui.host import LABEL_PREFIX, OPT_ENABLED, CheckpointRef, Host, Settings
from sdtrt.webui.jobs import Job, JobQueue
from sdtrt.webui.sessions import SessionPool, close_all

log = logging.getLogger("sdtrt")


class SwapFailed(SdtrtError):
    """Switching from an active server to another failed; the previous one stays active and keeps serving."""


@dataclass(frozen=True)
class OptionSpec:
    """One entry of the SD Unet dropdown: `model_name` is the checkpoint "Automatic" picks it for (None: only
    when chosen by label); `engine_ids` are tried in order for each call."""

    label: str
    model_name: str | None
    engine_ids: tuple[str, ...]


@dataclass(frozen=True)
class LoadedArch:
    family: str | None
    arch_hash: str | None
    problem: str | None  # why no engine can serve this model (unknown architecture), else None


@dataclass
class Generation:
    p: object
    settings: Settings
    told: set[str]
    #: the counters when it began: what it did is the difference at its end (`last_generation` in /status)
    counted: dict[str, Any] | None = None


def generation_outcome(before: Mapping[str, Any], after: Mapping[str, Any], number: int) -> dict[str, Any]:
    """What one generation did, from the counters before and after it: its engine and PyTorch calls and why."""
    reasons = {k: n - int(before["fallback_reasons"].get(k, 0)) for k, n in after["fallback_reasons"].items()}
    return {"number": number, "finished": time.time(),
            "engine_calls": after["engine_calls"] - before["engine_calls"],
            "fallback_calls": after["fallback_calls"] - before["fallback_calls"],
            "fallback_reasons": {k: n for k, n in reasons.items() if n > 0}}


class EngineService:
    def __init__(self) -> None:
        self.host: Host | None = None
        self.counters = Counters()
        self.jobs = JobQueue(idempotent=True)  # an identical request while one is queued or running gets that job
        # Guards the fields below; held only for dictionary-sized work, never while hashing, loading, closing
        # or deleting an engine, so a UNet call never waits on it behind slow work of another thread.
        self._lock = threading.RLock()
        self._registry: Registry | None = None
        self.sessions = SessionPool(self.registry, lambda: self.settings().cuda_graphs, lambda: self._host().device())
        self.probe = BackendProbe()
        self._arch: tuple[int, LoadedArch] | None = None
        self.generation: Generation | None = None
        self.active: UnetServer | None = None
        self.active_label: str | None = None
        self._unet_moved = False
        self.generations = 0
        self.last_generation: dict[str, Any] | None = None

    # ---- host and settings ----------------------------------------------------------------------------------
    def attach(self, host: Host) -> None:
        self.host = host
        self.sessions.shut_down = False

    def collect_garbage(self, max_age_s: float = 3600.0) -> list[str]:
        """One cleanup pass over the cache (what dead builds left behind; see Registry.cleanup). Never raises:
        called at startup, where a read-only or missing cache must not stop the WebUI."""
        try:
            removed = self.registry().cleanup(max_age_s=max_age_s)
        except Exception:  # housekeeping only: logged, never raised
            log.exception("sdtrt: cleaning the engine cache failed")
            return []
        if removed:
            log.info("sdtrt: removed %d leftovers of dead builds from the engine cache", len(removed))
        return removed

    def _host(self) -> Host:
        if self.host is None:
            raise SdtrtError("sdtrt is not attached to a WebUI host")
        return self.host

    def settings(self) -> Settings:
        if self.generation is not None:
            return self.generation.settings
        return self._host().settings()

    def registry(self) -> Registry:
        host = self._host()
        root = host.settings().cache_path(host.models_dir())
        stale: list[EngineSession] = []
        with self._lock:
            if self._registry is None or self._registry.root != root:
                stale = self.sessions.take()
                self._registry = Registry(root)
            registry = self._registry
        close_all(stale)
        return registry

    # ---- engine table -------------------------------------------------------------------------------------
    def catalog(self) -> list[EngineRow]:
        """Every engine in the cache and whether it can serve here (see sdtrt.serving.catalog), refusals included."""
        return engine_rows(self.registry(), self.probe, self.sessions.refusal)

    def engine_rows(self) -> list[dict[str, Any]]:
        """Every engine in the cache with ok/stale and the reason, for the tab and GET /engines (the catalog's rows,
        plus whether the active SD Unet uses each)."""
        active = {s.id for s in self.active.slots} if self.active is not None else set()
        return [{**row.to_dict(), "active": row.id in active} for row in self.catalog()]

    def usable_manifests(self) -> list[Manifest]:
        backend = self.settings().backend
        return [row.manifest for row in self.catalog()
                if row.manifest is not None and row.ok and backend in ("auto", row.manifest.key.backend)]

    # ---- the loaded model ---------------------------------------------------------------------------------
    def loaded_arch(self) -> LoadedArch | None:
        """Family and architecture hash of the host's loaded UNet, from its weights' shapes (cached per model)."""
        host = self._host()
        unet = host.torch_unet()
        if unet is None:
            return None
        if self._arch is not None and self._arch[0] == id(unet):
            return self._arch[1]
        from sdtrt.pipeline.families import ConfigHints, detect, read_config

        ckpt = host.loaded_checkpoint()
        try:
            hints = read_config(Path(ckpt.config)) if ckpt and ckpt.config else ConfigHints()
        except SdtrtError:
            hints = ConfigHints()
        try:
            info = detect(unet.state_dict(), hints)
            arch = LoadedArch(info.family_id, info.arch_hash, None)
        except SdtrtError as e:
            arch = LoadedArch(None, None, f"the loaded model cannot use an engine: {e}")
        self._arch = (id(unet), arch)
        return arch

    def checkpoint_sha256(self, ref: CheckpointRef) -> str | None:
        """The host's hash when it has one, else the file's (remembered per path, size and mtime)."""
        from sdtrt.pipeline.checkpoint import file_sha256

        if ref.sha256:
            return ref.sha256
        try:
            return file_sha256(Path(ref.filename))
        except OSError:
            return None

    # ---- SD Unet options ----------------------------------------------------------------------------------
    def unet_options(self) -> list[OptionSpec]:
        """Per checkpoint with engines built from it: `[TRT] <model_name>` (what "Automatic" picks). For the loaded
        checkpoint without one of its own: `[TRT] <model_name>` over same-architecture engines, refitted with its
        weights. Per usable engine: `[TRT] <engine id>`, picked by name only."""
        return self.options_with(self._host().loaded_checkpoint(), self.loaded_arch)

    def options_with(self, loaded: CheckpointRef | None, arch_of: Callable[[], LoadedArch | None]
                     ) -> list[OptionSpec]:
        """`unet_options` as they are listed while `loaded` (of architecture `arch_of()`) is the loaded
        checkpoint."""
        host = self._host()
        manifests = self.usable_manifests()
        if not manifests:
            return []
        by_arch: dict[str, list[Manifest]] = {}
        for m in manifests:
            by_arch.setdefault(m.key.arch_hash, []).append(m)
        specs: list[OptionSpec] = []
        seen: set[str] = set()

        def add(model_name: str, own: Sequence[Manifest], arch_hash: str) -> None:
            if model_name in seen:
                return
            rest = [m for m in by_arch.get(arch_hash, []) if m not in own]
            seen.add(model_name)
            specs.append(OptionSpec(f"{LABEL_PREFIX} {model_name}", model_name, tuple(m.id for m in [*own, *rest])))

        for ref in host.checkpoints():
            base = os.path.basename(ref.filename)
            own = [m for m in manifests if (ref.sha256 and m.source_checkpoint.get("sha256") == ref.sha256)
                   or m.source_checkpoint.get("name") == base]
            if own:
                add(ref.model_name, own, own[0].key.arch_hash)
        arch = arch_of() if loaded is not None else None
        if loaded is not None and arch is not None and arch.arch_hash in by_arch:
            add(loaded.model_name, [], arch.arch_hash)
        for m in manifests:
            specs.append(OptionSpec(f"{LABEL_PREFIX} {m.id}", None, (m.id,)))
        return specs

    def close_sessions(self, keep: Sequence[str] = ()) -> None:
        """Unload every engine not in `keep`. Each close waits for that engine's call or refit in flight."""
        self.sessions.close(keep)

    # ---- serving ------------------------------------------------------------------------------------------
    def make_server(self, spec: OptionSpec) -> UnetServer:
        """The server an SdUnet delegates to. Never raises: a problem becomes the reason every call of this
        option runs on PyTorch (and the user is told), so a generation never fails on activation."""
        return self.server_for(spec, self.loaded_arch, self._weights_for_loaded)

    def server_for(self, spec: OptionSpec, arch_of: Callable[[], LoadedArch | None],
                   weights_for: Callable[[], WeightSource | None], *, counters: Counters | None = None
                   ) -> UnetServer:
        """The server of `spec` for a model of architecture `arch_of()` whose weights `weights_for()` gives (the
        loaded model's for serving; a checkpoint's identity only, for a prediction, which passes its own
        `counters` so that nothing it finds reaches /status or the log). Never raises: what those raise becomes
        the reason every call runs on PyTorch."""
        serving = counters is None
        counters = self.counters if counters is None else counters
        slots: list[EngineSlot] = []
        unusable: str | None = None
        weights: WeightSource | None = None
        try:
            registry = self.registry()
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
                slots = [EngineSlot(m, self.sessions.open, self.sessions.evict) for m in fitting]
                # plain calls go to the first slot that covers them: a plain engine before one with ControlNet
                # inputs (which serves them too, fed zeros); ControlNet calls find the latter
                slots.sort(key=lambda slot: slot.contract.takes_control)
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
        server = UnetServer(slots, fallback=self.torch_fallback, counters=counters, notify=self.notify,
                            weights=weights, policy=lambda: self.settings().fallback, unusable=unusable,
                            enabled=lambda: self.settings().enabled)
        return server

    def _weights_for_loaded(self) -> WeightSource | None:
        """Weights come from the checkpoint file when it is safetensors (free of merged LoRA and host patches),
        else from the host's UNet."""
        host = self._host()
        ref = host.loaded_checkpoint()
        if ref is None:
            return None
        sha = self.checkpoint_sha256(ref) or f"loaded:{ref.title}"
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
        usable = server.unusable is None and self.settings().enabled  # may raise: nothing changed yet
        with self._lock:
            previous, previous_label = self.active, self.active_label
        prepared = False
        if previous is not None and previous is not server and server.unusable is not None:
            raise SwapFailed(f"cannot switch to {label}: {server.unusable}; still serving {previous_label}")
        if previous is not None and previous is not server and usable and server.slots:
            server.prepare()
            if all(s.broken is not None for s in server.slots):
                reason = next(s.broken for s in server.slots if s.broken is not None)
                raise SwapFailed(f"cannot switch to {label}: {reason}; still serving {previous_label}")
            prepared = True
        with self._lock:
            self.active, self.active_label = server, label
            stale = self.sessions.take(keep=[s.id for s in server.slots])
        close_all(stale)
        if usable and not prepared:
            server.prepare()

    def deactivate(self, server: UnetServer) -> None:
        with self._lock:
            if self.active is server:
                self.active, self.active_label = None, None

    def torch_fallback(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run one call on the host's PyTorch UNet, first moving it back to the device (the host offloads it to
        the CPU while an engine is active). It goes back to the CPU when the generation ends."""
        host = self._host()
        unet = host.torch_unet()
        if unet is None:
            raise SdtrtError("no PyTorch UNet to fall back to")
        self._torch_unet_to_device(unet)
        return host.torch_forward(unet)(*args, **kwargs)

    def _torch_unet_to_device(self, unet: torch.nn.Module) -> None:
        """Back on the device (unless --lowvram, whose hooks place its blocks); `end` offloads it again."""
        host = self._host()
        if host.lowvram():
            return
        param = next(unet.parameters(), None)
        if param is not None and param.device != host.device():
            unet.to(host.device())
            self._unet_moved = True

    def notify(self, reason: str) -> None:
        gen = self.generation
        if gen is not None and reason in gen.told:
            return
        log.warning("sdtrt: running on PyTorch: %s", reason)
        if gen is not None:
            gen.told.add(reason)
            self._host().tell_user(gen.p, f"TensorRT: some UNet calls ran on PyTorch: {reason}")

    # ---- per generation -----------------------------------------------------------------------------------
    def begin(self, p: object) -> None:
        settings = self._host().settings()
        self.generation = Generation(p, settings, set(), self.counters.snapshot())
        if self.active is not None:
            self.active.problem = self.active.bypass = None
        if self.sessions.cuda_graphs_differ(settings.cuda_graphs):  # the CUDA graphs setting changed: engines load again, with the new setting, at first use
            for slot in self.active.slots if self.active is not None else ():
                slot.evict()
            self.close_sessions()

    def apply_networks(self) -> None:
        """After the host activated this pass's extra networks: put its LoRA set into the engine before the first
        UNet call (no refit when the set and strengths are unchanged). A failure sends this generation to PyTorch
        with the reason; the next generation tries again."""
        server = self.active
        if server is None or server.unusable is not None or not self.settings().enabled:
            return
        host = self._host()
        try:
            _check_network_files(host)
            key = host.network_key()
            if server.networks is not None and server.networks.key == key:
                return server.set_networks(server.networks)  # engines loaded since keep it too (no-op otherwise)
            server.set_networks(NetworkSet(key, host.network_weights))
        except Exception as e:
            reason = str(e) if isinstance(e, NetworksFailed) else \
                f"the LoRA weights could not be put into the engine: {type(e).__name__}: {e}"
            log.exception("sdtrt: %s", reason)
            self.counters.error(reason)
            server.problem = reason

    def end(self, p: object) -> None:
        """After a generation: give the device memory the fallback used back to the engine."""
        gen = self.generation
        if gen is not None and gen.p is p:
            self.generation = None
            if gen.counted is not None:
                self.generations += 1
                self.last_generation = generation_outcome(gen.counted, self.counters.snapshot(), self.generations)
        host = self._host()
        unet = host.torch_unet()
        if unet is not None:
            controlnet.uninstall(unet)
        if self._unet_moved and self.active is not None and self.active.enabled() and not host.lowvram():
            unet = host.torch_unet()
            if unet is not None:
                unet.to("cpu")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        self._unet_moved = False
        if self.active is None:
            self.close_sessions()

    def before_sampling(self) -> None:
        """Before each sampling pass: when the live PyTorch UNet was changed in a way the engine cannot reproduce
        (a live forward hook such as ControlNet's, tiling's circular padding; see `foreign`), every UNet call of
        this pass runs on PyTorch, also the calls that reach the class forward (and so the engine) from inside
        such a hook, and the PyTorch UNet goes back on the device. A hook that was restored does not count."""
        server = self.active
        unet = self._host().torch_unet()
        if server is None:
            return
        if unet is not None:
            controlnet.uninstall(unet)  # a previous pass's; installed again below when this pass is served
        hook = None if unet is None else controlnet.recognise(unet)
        if hook is not None and unet is not None:
            server.bypass = (controlnet.unsupported(hook) or controlnet.patched_module(unet)
                             or foreign.conv_problem(unet)
                             or (None if server.takes_control else controlnet.NO_CONTROL_ENGINE))
            controlnet.install(unet, hook, self._controlnet_call)  # served, or counted as PyTorch calls
        else:
            server.bypass = None if unet is None else foreign.unservable(unet)
        if server.bypass is None or unet is None or not server.enabled():
            return
        self._torch_unet_to_device(unet)
        self.notify(server.bypass)

    def _controlnet_call(self, hook: controlnet.Hook, args: tuple[Any, ...], kwargs: dict[str, Any]
                         ) -> torch.Tensor:
        """One UNet call of a ControlNet pass (see webui/controlnet.py): the hook's code, the blocks on the engine.
        Whatever the engine cannot take runs through the hook on the PyTorch UNet, told and counted."""
        server, unet = self.active, self._host().torch_unet()
        slot = None if server is None else next((s for s in server.slots if s.broken is None
                                                 and s.contract.takes_control), None)
        if server is None or unet is None:
            return hook.bound(*args, **kwargs)

        def through_hook(*_: Any, **__: Any) -> torch.Tensor:
            self._torch_unet_to_device(unet)
            return hook.bound(*args, **kwargs)

        reason = server.unusable or server.problem or server.bypass or (
            None if slot is not None else controlnet.NO_CONTROL_ENGINE)
        if not server.enabled() or reason is not None or slot is None:
            return server.to_pytorch(reason or SWITCHED_OFF, args, kwargs, user=server.enabled(),
                                     fallback=through_hook)
        contract = slot.contract

        def pytorch(*_: Any, **__: Any) -> torch.Tensor:
            raise controlnet.RunOnPyTorch()

        def engine(sample: torch.Tensor, t: Any, context: torch.Tensor, y: torch.Tensor | None,
                   feeds: ControlFeeds) -> torch.Tensor:
            call, kw = contract.make_call(sample, t, context, y, **{CONTROL_KW: feeds})  # type: ignore[attr-defined]
            return server.serve(call, kw, pytorch)

        x, timesteps, _, _ = contract.split_call(args, kwargs)  # type: ignore[attr-defined]
        try:
            return controlnet.serve(hook, args, kwargs, unet, contract.io.skips, contract.adapters,  # type: ignore[attr-defined]
                                    x, timesteps, engine)
        except controlnet.RunOnPyTorch:
            pass
        except NoMatchingProfile:
            raise  # the fallback policy is "error": the user asked for a failed generation over a slow one
        except controlnet.Unexpected as e:
            reason = f"sd-webui-controlnet did something the engine has no input for ({e}); this call ran on PyTorch"
            server.counters.fallback(reason)
            self.notify(reason)
        except Exception as e:  # noqa: BLE001 - e.g. a unit that needs the PyTorch UNet on the device
            log.exception("sdtrt: a ControlNet call failed with the engine serving it")
            reason = (f"a ControlNet call failed with the engine serving it ({type(e).__name__}: {e}); it ran on "
                      "PyTorch")
            server.counters.fallback(reason)
            server.counters.error(reason)
            self.notify(reason)
        self._torch_unet_to_device(unet)
        return hook.bound(*args, **kwargs)

    # ---- builds and deletes (sdtrt.webui.builds) ----------------------------------------------------------
    def submit_build(self, checkpoint: str, profiles: Sequence[str], backend: str = "auto",
                     dtype: str | None = None, replaces: str | None = None, controlnet: bool = False,
                     targets: str | Sequence[str] | None = None) -> Job:
        return builds.submit(self, checkpoint, profiles, backend, dtype, replaces, controlnet, targets)

    def rebuild(self, engine_id: str) -> Job:
        return builds.rebuild(self, engine_id)

    def delete(self, engine_id: str) -> None:
        builds.delete(self, engine_id)

    def shutdown(self, timeout: float = 5.0) -> dict[str, Any]:
        """Process exit (or the extension unloading for good): stop serving, cancel queued and running builds, and
        unload every engine, returning within about `timeout` seconds whatever a build is doing. A running build
        stops at its next progress report; the registry never publishes a half-built engine, and its temporary
        folder is removed by the build itself or by the next cleanup. Afterwards no engine is loaded again (a
        UNet call still routed here runs on PyTorch) until the service is attached again. Returns what was left
        running."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            self.active, self.active_label = None, None
            stale = self.sessions.stop()
        pending = [j for j in self.jobs.list() if j.state in ("queued", "running")]
        for job in pending:
            with contextlib.suppress(SdtrtError):
                self.jobs.cancel(job.id)
        closer = threading.Thread(target=close_all, args=(stale,), name="sdtrt-shutdown", daemon=True)
        closer.start()
        closer.join(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline and any(j.state in ("queued", "running") for j in pending):
            time.sleep(0.02)
        return {"unloaded": not closer.is_alive(),
                "builds_left": [j.id for j in pending if j.state in ("queued", "running")]}

    def set_enabled(self, enabled: bool) -> dict[str, bool]:
        """Switch the extension on or off (the sdtrt_enabled setting, saved); generations read it when they
        begin, so it applies from the next one."""
        setter = getattr(self._host(), "set_option", None)
        if not callable(setter):
            raise SdtrtError("this WebUI host cannot change settings; use its Settings tab")
        setter(OPT_ENABLED, bool(enabled))
        return {"enabled": self._host().settings().enabled}

    def refresh_list(self) -> None:
        with contextlib.suppress(Exception):
            self._host().refresh_unet_list()

    def status(self) -> dict[str, Any]:
        """A snapshot for /status. Never waits behind a load, refit, build or delete. An engine being built is
        not ready: it is not among the engines (nothing is published before the build ends) and `building`
        lists its job."""
        s = self._host().settings()
        with self._lock:
            server, label = self.active, self.active_label
        active = None
        if server is not None:
            networks = server.networks
            active = {"label": label, "engines": [slot.id for slot in server.slots],
                      "loaded": [slot.id for slot in server.slots if slot.session is not None],
                      "ready": [slot.id for slot in server.slots
                                if slot.session is not None and slot.broken is None and not slot.session.closed],
                      "backends": sorted({slot.manifest.key.backend for slot in server.slots}),
                      "unusable": server.unusable,
                      "runtime": {slot.id: slot.session.runner.stats() for slot in server.slots
                                  if slot.session is not None and not slot.session.closed},
                      "networks": _describe_networks(networks.key if networks else ())}
        jobs = self.jobs.list()
        building = [{"job_id": j.id, "checkpoint": j.request.get("checkpoint"),
                     "profiles": j.request.get("profiles"), "state": j.state, "phase": j.phase,
                     "progress": round(j.progress, 4)} for j in jobs if j.state in ("queued", "running")]
        return {
            "enabled": s.enabled, "backend": s.backend, "fallback": s.fallback, "cuda_graphs": s.cuda_graphs,
            "cache_dir": str(self.registry().root), "active": active, "counters": self.counters.snapshot(),
            "jobs": {"queued": sum(j.state == "queued" for j in jobs), "running": sum(j.state == "running" for j in jobs)},
            "building": building, "generations": self.generations, "last_generation": self.last_generation,
        }


def _check_network_files(host: Host) -> None:
    """Refuse to refit networks loaded from pickle files (.pt/.ckpt): the engine takes safetensors LoRAs only.
    Hosts that can tell which files the active networks came from offer `network_files()` (optional)."""
    files = getattr(host, "network_files", None)
    if not callable(files):
        return
    from sdtrt.pipeline.lora import require_safetensors

    for name in files() or ():
        if name:
            require_safetensors(name)


def _describe_networks(key: object) -> list[str]:
    """The active network set for /status: A1111's key is a tuple of (name, strength, ...) tuples."""
    if not isinstance(key, tuple):
        return [str(key)]
    return [":".join(map(str, k[:2])) if isinstance(k, tuple) else str(k) for k in key]


_SERVICE: EngineService | None = None
_SERVICE_LOCK = threading.Lock()


def service() -> EngineService:
    global _SERVICE
    with _SERVICE_LOCK:
        if _SERVICE is None:
            _SERVICE = EngineService()
        return _SERVICE
