"""The engine service behind the WebUI glue: which engines the SD Unet dropdown offers, the UNet server each
option creates, PyTorch fallback and its notices, counters, and build jobs. One instance per process
(`service()`); it survives A1111's "Reload UI", which re-executes scripts/ but keeps this module."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdtrt.backends import backend_class
from sdtrt.backends.base import BackendInfo
from sdtrt.errors import (
    BackendUnavailable,
    CacheNotWritable,
    EngineNotFound,
    ProfileError,
    SdtrtError,
    StaleEngine,
)
from sdtrt.profiles import Profile
from sdtrt.registry import Manifest, Registry, stale_reason, validate_engine_id
from sdtrt.runtime import CorruptEngine, EngineBusy, EngineSession
from sdtrt.webui import foreign
from sdtrt.webui.host import BACKEND_CHOICES, LABEL_PREFIX, CheckpointRef, Host, Settings
from sdtrt.webui.jobs import Job, JobQueue
from sdtrt.webui.serving import (
    BUSY_WAIT_S,
    Counters,
    EngineSlot,
    NetworkSet,
    NetworksFailed,
    UnetServer,
    WeightSource,
)

log = logging.getLogger("sdtrt")


class EngineInUse(SdtrtError):
    """The engine serves the active SD Unet; switch SD Unet to None (or another engine) first."""


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


def engine_size(manifest: Manifest) -> int:
    return sum(f.size for f in manifest.files)


class EngineService:
    def __init__(self) -> None:
        self.host: Host | None = None
        self.counters = Counters()
        self.jobs = JobQueue()
        # Guards the fields below; held only for dictionary-sized work, never while hashing, loading, closing
        # or deleting an engine, so a UNet call never waits on it behind slow work of another thread.
        self._lock = threading.RLock()
        self._registry: Registry | None = None
        self._sessions: dict[str, EngineSession] = {}
        self._opening: dict[str, threading.Lock] = {}  # per engine id: one thread loads it, others do not wait long
        self._deleting: set[str] = set()
        #: engines refused at load because their files do not match the manifest: id -> (file signature, reason).
        #: Listed as not ok (and not offered) until their files change, so nobody re-hashes them on every switch.
        self._refused: dict[str, tuple[tuple[object, ...], str]] = {}
        self._shut_down = False  # after shutdown(): no engine is loaded again (calls run on PyTorch)
        self._infos: dict[str, BackendInfo | str] = {}
        self._arch: tuple[int, LoadedArch] | None = None
        self._sha: dict[tuple[str, int, int], str] = {}
        self.generation: Generation | None = None
        self.active: UnetServer | None = None
        self.active_label: str | None = None
        self._unet_moved = False

    # ---- host and settings ----------------------------------------------------------------------------------
    def attach(self, host: Host) -> None:
        self.host = host
        self._shut_down = False

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
                stale = self._take_sessions()
                self._registry = Registry(root)
            registry = self._registry
        _close_all(stale)
        return registry

    def backend_info(self, name: str) -> BackendInfo | str:
        """The running backend's identity, or the reason it cannot run here (cached: probing may touch the GPU, so
        it runs outside the lock; two threads probing at once both get the same answer)."""
        with self._lock:
            known = self._infos.get(name)
        if known is not None:
            return known
        info: BackendInfo | str
        try:
            cls = backend_class(name)
            reason = cls.unavailable_reason()
            info = reason if reason is not None else cls().info()
        except SdtrtError as e:
            info = str(e)
        with self._lock:
            return self._infos.setdefault(name, info)

    # ---- engine table -------------------------------------------------------------------------------------
    def _checked(self) -> list[tuple[str, Manifest | None, str | None]]:
        """(id, manifest, why it cannot run here or None) for every engine in the cache."""
        out = []
        for st in self.registry().list():
            m, reason = st.manifest, st.reason
            if m is not None and reason is None:
                info = self.backend_info(m.key.backend)
                reason = (f"backend {m.key.backend} cannot run here: {info}" if isinstance(info, str)
                          else stale_reason(m.key, info))
            if m is not None and reason is None:
                reason = self._refusal(m)
            out.append((st.id, m, reason))
        return out

    def engine_rows(self) -> list[dict[str, Any]]:
        """Every engine in the cache with ok/stale and the reason, for the tab and GET /engines."""
        rows = []
        for engine_id, m, reason in self._checked():
            rows.append({
                "id": engine_id,
                "ok": reason is None,
                "reason": reason,
                "family": m.key.family if m else None,
                "profiles": list(m.key.profiles) if m else [],
                "backend": m.key.backend if m else None,
                "backend_version": m.key.backend_version if m else None,
                "device": m.key.device if m else None,
                "dtype": m.key.export.get("dtype") if m else None,
                "size_bytes": engine_size(m) if m else None,
                "checkpoint": m.source_checkpoint.get("name") if m else None,
                "created": m.created if m else None,
                "active": self.active is not None and any(s.id == engine_id for s in self.active.slots),
            })
        return rows

    def usable_manifests(self) -> list[Manifest]:
        backend = self.settings().backend
        return [m for _, m, reason in self._checked()
                if m is not None and reason is None and backend in ("auto", m.key.backend)]

    # ---- the loaded model ---------------------------------------------------------------------------------
    def loaded_arch(self) -> LoadedArch | None:
        """Family and architecture hash of the host's loaded UNet, from its weights' shapes (cached per model)."""
        host = self._host()
        unet = host.torch_unet()
        if unet is None:
            return None
        if self._arch is not None and self._arch[0] == id(unet):
            return self._arch[1]
        from sdtrt.families import ConfigHints, detect, read_config

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

    def _file_sha256(self, filename: str) -> str:
        from sdtrt.checkpoint import file_sha256

        st = os.stat(filename)
        key = (filename, st.st_size, st.st_mtime_ns)
        if key not in self._sha:
            self._sha[key] = file_sha256(Path(filename))
        return self._sha[key]

    def checkpoint_sha256(self, ref: CheckpointRef) -> str | None:
        if ref.sha256:
            return ref.sha256
        try:
            return self._file_sha256(ref.filename)
        except OSError:
            return None

    # ---- SD Unet options ----------------------------------------------------------------------------------
    def unet_options(self) -> list[OptionSpec]:
        """Per checkpoint with engines built from it: `[TRT] <model_name>` (what "Automatic" picks). For the loaded
        checkpoint without one of its own: `[TRT] <model_name>` over same-architecture engines, refitted with its
        weights. Per usable engine: `[TRT] <engine id>`, picked by name only."""
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
        loaded = host.loaded_checkpoint()
        arch = self.loaded_arch()
        if loaded is not None and arch is not None and arch.arch_hash in by_arch:
            add(loaded.model_name, [], arch.arch_hash)
        for m in manifests:
            specs.append(OptionSpec(f"{LABEL_PREFIX} {m.id}", None, (m.id,)))
        return specs

    # ---- serving ------------------------------------------------------------------------------------------
    def _open_session(self, engine_id: str) -> EngineSession:
        """The loaded engine, shared by every server that uses it. Loading (hashing, deserializing) runs under a
        per-engine lock, not the service's: a caller that finds another thread loading the same engine gets
        EngineBusy after BUSY_WAIT_S (its call runs on PyTorch) instead of waiting for the load."""
        with self._lock:
            session = self._sessions.get(engine_id)
            if session is not None and not session.closed:
                return session
            if engine_id in self._deleting:
                raise EngineNotFound(f"engine {engine_id} is being deleted")
            if self._shut_down:
                raise SdtrtError("sdtrt was shut down; engines are not loaded any more")
            opening = self._opening.setdefault(engine_id, threading.Lock())
        if not opening.acquire(timeout=BUSY_WAIT_S):
            raise EngineBusy(f"engine {engine_id} is being loaded by another thread")
        try:
            with self._lock:
                session = self._sessions.get(engine_id)
                if session is not None and not session.closed:
                    return session
            registry = self.registry()
            graphs = self.settings().cuda_graphs
            try:
                session = self._in_device(lambda: EngineSession.open(registry, engine_id, cuda_graphs=graphs))
            except CorruptEngine as e:
                with contextlib.suppress(Exception):
                    signature = self._signature(registry.status(engine_id).manifest or registry.get(engine_id))
                    with self._lock:
                        self._refused[engine_id] = (signature, str(e))
                raise
            with self._lock:
                if engine_id not in self._deleting and not self._shut_down:
                    self._sessions[engine_id] = session
                    return session
            session.close()
            raise EngineNotFound(f"engine {engine_id} was deleted (or sdtrt shut down) while it loaded")
        finally:
            opening.release()

    def _in_device(self, fn: Any) -> Any:
        device = self._host().device()
        if device.type == "cuda" and torch.cuda.is_available():
            with torch.cuda.device(device):
                return fn()
        return fn()

    def _signature(self, manifest: Manifest) -> tuple[object, ...]:
        d = self.registry().engine_dir(manifest.id)
        out: list[object] = []
        for f in manifest.files:
            try:
                st = os.stat(d / f.name)
                out.append((f.name, st.st_size, st.st_mtime_ns, st.st_ino))
            except OSError:
                out.append((f.name, None))
        return tuple(out)

    def _refusal(self, manifest: Manifest) -> str | None:
        """Why this engine was refused at load, while its files are the ones that were refused."""
        with self._lock:
            refused = self._refused.get(manifest.id)
        if refused is None:
            return None
        if refused[0] != self._signature(manifest):
            with self._lock:
                self._refused.pop(manifest.id, None)
            return None
        return refused[1]

    def _evict_session(self, engine_id: str, session: EngineSession) -> None:
        with self._lock:
            if self._sessions.get(engine_id) is session:
                del self._sessions[engine_id]
        _close_all([session])

    def _take_sessions(self, keep: Sequence[str] = ()) -> list[EngineSession]:
        """Under self._lock: remove the sessions not in `keep` from the table; the caller closes them unlocked."""
        return [self._sessions.pop(i) for i in [i for i in self._sessions if i not in keep]]

    def close_sessions(self, keep: Sequence[str] = ()) -> None:
        """Unload every engine not in `keep`. Each close waits for that engine's call or refit in flight."""
        with self._lock:
            stale = self._take_sessions(keep)
        _close_all(stale)

    def make_server(self, spec: OptionSpec) -> UnetServer:
        """The server an SdUnet delegates to. Never raises: a problem becomes the reason every call of this
        option runs on PyTorch (and the user is told), so a generation never fails on activation."""
        slots: list[EngineSlot] = []
        unusable: str | None = None
        weights: WeightSource | None = None
        try:
            registry = self.registry()
            manifests = [registry.get(validate_engine_id(i)) for i in spec.engine_ids]
            arch = self.loaded_arch()
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
                slots = [EngineSlot(m, self._open_session, self._evict_session) for m in fitting]
                weights = self._weights_for_loaded()
        except StaleEngine as e:  # damaged or foreign files, found by the cheap look before any load
            unusable = f"{e}; rebuild the engine (TensorRT tab) or pick another one"
        except SdtrtError as e:
            unusable = str(e)
        except Exception as e:
            log.exception("sdtrt: cannot prepare %s", spec.label)
            unusable = f"{type(e).__name__}: {e}"
        if unusable is not None:
            self.counters.error(unusable)
        server = UnetServer(slots, fallback=self.torch_fallback, counters=self.counters, notify=self.notify,
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
                from sdtrt.checkpoint import read_unet_state_dict

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
            stale = self._take_sessions(keep=[s.id for s in server.slots])
        _close_all(stale)
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
        self.generation = Generation(p, settings, set())
        if self.active is not None:
            self.active.problem = self.active.bypass = None
        with self._lock:
            changed = any(s.cuda_graphs != settings.cuda_graphs for s in self._sessions.values())
        if changed:  # the CUDA graphs setting changed: engines load again, with the new setting, at first use
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
        if self.generation is not None and self.generation.p is p:
            self.generation = None
        host = self._host()
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
        server.bypass = None if unet is None else foreign.unservable(unet)
        if server.bypass is None or unet is None or not server.enabled():
            return
        self._torch_unet_to_device(unet)
        self.notify(server.bypass)

    # ---- builds and deletes -------------------------------------------------------------------------------
    def submit_build(self, checkpoint: str, profiles: Sequence[str], backend: str = "auto",
                     dtype: str | None = None, replaces: str | None = None) -> Job:
        """Validate now (unknown checkpoint, bad profile, unknown backend raise), build later on the job thread."""
        host = self._host()
        if not isinstance(checkpoint, str) or not checkpoint:
            raise SdtrtError("give the checkpoint to build for (its title or name as the WebUI lists it)")
        ref = host.resolve_checkpoint(checkpoint)
        if not isinstance(profiles, (list, tuple)) or not profiles:
            raise ProfileError("give at least one profile, e.g. ['1x512x512x75']")
        parsed = [Profile.parse(p) for p in profiles]
        backend = backend or "auto"
        if backend not in BACKEND_CHOICES:
            raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
        if dtype not in (None, "float16", "float32"):
            raise SdtrtError(f"dtype must be float16 or float32, not {dtype!r}")
        registry = self.registry()
        if not registry.writable():  # refused now (API 503), not as a job that fails later
            raise CacheNotWritable(
                f"the engine cache {registry.root} is not writable by this WebUI (read-only mount or no permission); "
                "engines already there are still served. Build on a machine that can write it, or change the "
                "cache folder in Settings > TensorRT"
            )
        cache = registry.root
        request = {"checkpoint": ref.title, "profiles": [str(p) for p in parsed], "backend": backend,
                   "dtype": dtype, "replaces": replaces}

        def work(job: Job, progress: Any) -> dict[str, Any]:
            from sdtrt.backends import get_backend
            from sdtrt.pipeline import build_engine

            on_gpu = get_backend(backend).info().device != "cpu"

            def quiet() -> contextlib.AbstractContextManager[object]:
                return host.quiet_torch(lambda why: progress(why, 0.0))

            progress("starting", 0.0)
            # on a GPU the whole build waits for the WebUI to be idle (it competes for device memory); on a CPU only
            # the export does (it creates torch modules, which a model load in progress would break)
            with quiet() if on_gpu else contextlib.nullcontext():
                outcome = build_engine(Path(ref.filename), parsed, cache,
                                       config=Path(ref.config) if ref.config else None,
                                       backend=backend, dtype=dtype, progress=progress,
                                       torch_guard=contextlib.nullcontext if on_gpu else quiet)
            if replaces and replaces != outcome.manifest.id:
                with contextlib.suppress(SdtrtError):
                    self.delete(replaces)
            self.refresh_list()
            return {"engine_id": outcome.manifest.id, "built": outcome.built,
                    "size_bytes": engine_size(outcome.manifest)}

        return self.jobs.submit(request, work)

    def rebuild(self, engine_id: str) -> Job:
        """Rebuild a (stale) engine for this machine from its source checkpoint with the same profiles."""
        m = self._manifest_any(engine_id)
        name = m.source_checkpoint.get("name")
        sha = m.source_checkpoint.get("sha256")
        ref = next((c for c in self._host().checkpoints()
                    if (sha and c.sha256 == sha) or os.path.basename(c.filename) == name), None)
        if ref is None:
            raise SdtrtError(f"engine {engine_id} was built from {name}, which the WebUI does not list any more")
        backend = self.settings().backend
        return self.submit_build(ref.title, list(m.key.profiles), backend, m.key.export.get("dtype"),
                                 replaces=engine_id)

    def _manifest_any(self, engine_id: str) -> Manifest:
        """The manifest of an engine even when it is stale (for rebuilding)."""
        validate_engine_id(engine_id)
        st = self.registry().status(engine_id)
        if st.manifest is None:
            raise EngineNotFound(f"engine {engine_id} has no readable manifest ({st.reason}); delete it")
        return st.manifest

    def delete(self, engine_id: str) -> None:
        """Unload and delete an engine no active server uses. The slow part (closing, removing files) runs
        outside the service lock, with the id marked so nothing loads it meanwhile."""
        validate_engine_id(engine_id)
        registry = self.registry()
        with self._lock:
            if self.active is not None and any(s.id == engine_id for s in self.active.slots):
                raise EngineInUse(f"engine {engine_id} is in use by SD Unet '{self.active_label}'; set SD Unet "
                                  "to None (or another engine) and generate once, then delete it")
            if engine_id in self._deleting:
                raise EngineInUse(f"engine {engine_id} is being deleted by another request")
            self._deleting.add(engine_id)
            session = self._sessions.pop(engine_id, None)
        try:
            if session is not None:
                _close_all([session])
            registry.delete(engine_id)
        except SdtrtError:
            raise
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise CacheNotWritable(f"engine {engine_id} could not be deleted: the engine cache is read-only for "
                                       f"this process ({e})") from e
            raise SdtrtError(f"engine {engine_id} could not be deleted: {type(e).__name__}: {e}") from e
        except Exception as e:  # anything else: still one of the listed error types
            raise SdtrtError(f"engine {engine_id} could not be deleted: {type(e).__name__}: {e}") from e
        finally:
            with self._lock:
                self._deleting.discard(engine_id)
        self.refresh_list()

    def shutdown(self, timeout: float = 5.0) -> dict[str, Any]:
        """Process exit (or the extension unloading for good): stop serving, cancel queued and running builds, and
        unload every engine, returning within about `timeout` seconds whatever a build is doing. A running build
        stops at its next progress report; the registry never publishes a half-built engine, and its temporary
        folder is removed by the build itself or by the next cleanup. Afterwards no engine is loaded again (a
        UNet call still routed here runs on PyTorch) until the service is attached again. Returns what was left
        running."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            self._shut_down = True
            self.active, self.active_label = None, None
            stale = self._take_sessions()
        pending = [j for j in self.jobs.list() if j.state in ("queued", "running")]
        for job in pending:
            with contextlib.suppress(SdtrtError):
                self.jobs.cancel(job.id)
        closer = threading.Thread(target=_close_all, args=(stale,), name="sdtrt-shutdown", daemon=True)
        closer.start()
        closer.join(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline and any(j.state in ("queued", "running") for j in pending):
            time.sleep(0.02)
        return {"unloaded": not closer.is_alive(),
                "builds_left": [j.id for j in pending if j.state in ("queued", "running")]}

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
            "building": building,
        }


def _check_network_files(host: Host) -> None:
    """Refuse to refit networks loaded from pickle files (.pt/.ckpt): the engine takes safetensors LoRAs only.
    Hosts that can tell which files the active networks came from offer `network_files()` (optional)."""
    files = getattr(host, "network_files", None)
    if not callable(files):
        return
    from sdtrt.lora import require_safetensors

    for name in files() or ():
        if name:
            require_safetensors(name)


def _close_all(sessions: Sequence[EngineSession]) -> None:
    """Close engines (each waits for its call or refit in flight); one that fails to close is logged, not raised."""
    for session in sessions:
        try:
            session.close()
        except Exception:
            log.exception("sdtrt: closing engine %s failed", session.manifest.id)


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
