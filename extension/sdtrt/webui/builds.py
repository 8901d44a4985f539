"""Engine builds and deletes requested from the WebUI (tab, REST API): validated at once, built on the service's
job queue (waiting for the WebUI to be idle where torch is touched), rebuilt from the source checkpoint, deleted
once nothing serves them."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdtrt.backends.base import BuildOptions
from sdtrt.engine_types import BackendInfo
from sdtrt.errors import (
    BackendUnavailable,
    CacheCannotRename,
    CacheNotWritable,
    EngineNotFound,
    ProfileError,
    SdtrtError,
)
from sdtrt.models import record_convention, record_takes_control
from sdtrt.models.convention import check_convention
from sdtrt.profiles import Profile
from sdtrt.storage.key import validate_engine_id
from sdtrt.storage.manifest import Manifest, stale_reason
from sdtrt.targets import parse_targets
from sdtrt.webui.host import BACKEND_CHOICES
from sdtrt.webui.jobs import Job
from sdtrt.webui.sessions import close_all
from sdtrt.webui.state import ServiceState

log = logging.getLogger("sdtrt")


class EngineInUse(SdtrtError):
    """The engine serves the active SD Unet; switch SD Unet to None (or another engine) first."""


def engine_size(manifest: Manifest) -> int:
    return sum(f.size for f in manifest.files)


class Builds:
    """Build, rebuild and delete requests of one service (its cache, jobs, sessions and active server)."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def submit(self, checkpoint: str, profiles: Sequence[str], backend: str = "auto",
               dtype: str | None = None, replaces: str | None = None, controlnet: bool = False,
               targets: str | Sequence[str] | None = None, convention: str | None = None) -> Job:
        """Validate now (unknown checkpoint, bad profile, unknown backend, target or convention raise), build later
        on the job thread. `targets`: GPU compute capabilities to build for ahead of time ("sm86,sm89"); none: this
        GPU. `convention`: whose UNet numerics the engine follows (`sdtrt.models.convention`); none: the host's."""
        self.state.fleet.require_builds("build")
        host = self.state.require_host()
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
        registry = self.state.registry()
        try:  # refused now (API 503), not as a job that fails later
            registry.require_writable()
        except CacheCannotRename:
            raise
        except (CacheNotWritable, OSError) as e:
            raise CacheNotWritable(
                f"the engine cache {registry.root} is not writable by this WebUI (read-only mount or no permission); "
                "engines already there are still served. Build on a machine that can write it, or change the "
                "cache folder in Settings > TensorRT"
            ) from e
        cache = registry.root
        if not isinstance(controlnet, bool):
            raise SdtrtError(f"controlnet must be true or false, not {controlnet!r}")
        convention = check_convention(host.unet_convention() if convention is None else convention)
        aot = parse_targets(targets)
        if aot:  # refused now (API 400) when no backend here builds ahead of time
            from sdtrt.backends import get_backend

            get_backend(backend, targets=aot)
        options = BuildOptions(cache_dir=cache / ".cache", targets=aot)
        request = {"checkpoint": ref.title, "profiles": [str(p) for p in parsed], "backend": backend,
                   "dtype": dtype, "replaces": replaces, "controlnet": controlnet, "targets": list(aot),
                   "convention": convention}

        def work(job: Job, progress: Any) -> dict[str, Any]:
            from sdtrt.backends import get_backend
            from sdtrt.pipeline.build import build_engine

            chosen = get_backend(backend, targets=aot)
            # the build uses the GPU unless it runs on the CPU: an ONNX Runtime CPU engine, or ahead of time for
            # targets without this machine's GPU (the weights are then embedded and nothing is checked on a device)
            _, without_gpu = chosen.build_options(options)  # a note when no GPU of the targets takes part
            on_gpu = chosen.build_info(options).device != "cpu" and not (aot and without_gpu)

            def quiet() -> contextlib.AbstractContextManager[object]:
                return host.quiet_torch(lambda why: progress(why, 0.0))

            progress("starting", 0.0)
            # on a GPU the whole build waits for the WebUI to be idle (it competes for device memory); on a CPU only
            # the export does (it creates torch modules, which a model load in progress would break)
            with quiet() if on_gpu else contextlib.nullcontext():
                outcome = build_engine(Path(ref.filename), parsed, cache,
                                       config=Path(ref.config) if ref.config else None,
                                       backend=backend, dtype=dtype, options=options, progress=progress,
                                       torch_guard=contextlib.nullcontext if on_gpu else quiet,
                                       checkpoint_sha256=ref.sha256, controlnet=controlnet,
                                       convention=convention)
            if replaces and replaces != outcome.manifest.id:
                with contextlib.suppress(SdtrtError):
                    self.delete(replaces)
            self.state.refresh_list()
            return {"engine_id": outcome.manifest.id, "built": outcome.built,
                    "size_bytes": engine_size(outcome.manifest), "notes": list(outcome.notes)}

        return self.state.jobs.submit(request, work)

    def rebuild(self, engine_id: str) -> Job:
        """Rebuild a (stale) engine for this machine from its source checkpoint with the same profiles."""
        self.state.fleet.require_builds("rebuild")
        m = self.manifest_even_if_stale(engine_id)
        name = m.source_checkpoint.get("name")
        sha = m.source_checkpoint.get("sha256")
        ref = next((c for c in self.state.require_host().checkpoints()
                    if (sha and c.sha256 == sha) or os.path.basename(c.filename) == name), None)
        if ref is None:
            raise SdtrtError(f"engine {engine_id} was built from {name}, which the WebUI does not list any more")
        backend = self.state.settings().backend
        targets = m.key.targets
        if targets:
            # an ahead-of-time engine: rebuilt with its own backend; for this machine's GPU when it was stale here
            # because of its targets (the same targets again would give the same engine)
            backend = m.key.backend
            info = self.state.probe.info(m.key.backend)
            if isinstance(info, BackendInfo) and stale_reason(m.key, info) is not None:
                targets = ()
        return self.submit(ref.title, list(m.key.profiles), backend, m.key.export.get("dtype"),
                           replaces=engine_id, controlnet=record_takes_control(m.key.io), targets=targets,
                           convention=record_convention(m.key.io))

    def manifest_even_if_stale(self, engine_id: str) -> Manifest:
        """The manifest of an engine even when it is stale (for rebuilding)."""
        validate_engine_id(engine_id)
        st = self.state.registry().status(engine_id)
        if st.manifest is None:
            raise EngineNotFound(f"engine {engine_id} has no readable manifest ({st.reason}); delete it")
        return st.manifest

    def delete(self, engine_id: str) -> None:
        """Unload and delete an engine no active server uses. The slow part (closing, removing files) runs
        outside the service lock, with the id marked so nothing loads it meanwhile."""
        self.state.fleet.require_builds("delete")
        validate_engine_id(engine_id)
        registry = self.state.registry()
        with self.state.lock:
            if self.state.active is not None and any(s.id == engine_id for s in self.state.active.slots):
                raise EngineInUse(f"engine {engine_id} is in use by SD Unet '{self.state.active_label}'; set SD Unet "
                                  "to None (or another engine) and generate once, then delete it")
            try:
                session = self.state.sessions.start_delete(engine_id)
            except SdtrtError as e:
                raise EngineInUse(str(e)) from None
        try:
            if session is not None:
                close_all([session])
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
            self.state.sessions.finish_delete(engine_id)
        self.state.refresh_list()

    def collect_garbage(self, max_age_s: float = 3600.0) -> list[str]:
        """One cleanup pass over the cache (what dead builds left behind; see Registry.cleanup). Never raises:
        called at startup, where a read-only or missing cache must not stop the WebUI; a cache on a file system
        that cannot rename is reported there (a warning in the log) and left alone. Fleet replicas that do not
        build (SDTRT_BUILDS=off) write nothing to the cache: they skip it."""
        if not self.state.fleet.builds:
            return []
        try:
            registry = self.state.registry()
            if os.path.isdir(registry.root):
                registry.require_writable()
            removed = registry.cleanup(max_age_s=max_age_s)
        except CacheCannotRename as e:  # said at start, not first when a build is asked for
            log.warning("sdtrt: %s", e)
            return []
        except CacheNotWritable:  # a read-only cache is served as it is
            return []
        except Exception:  # housekeeping only: logged, never raised
            log.exception("sdtrt: cleaning the engine cache failed")
            return []
        if removed:
            log.info("sdtrt: removed %d leftovers of dead builds from the engine cache", len(removed))
        return removed
