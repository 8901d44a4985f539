"""The service's state for GET /sdtrt/v1/status: settings, the active server and its engines, counters, builds and
the last generation. Never waits behind a load, refit, build or delete."""

from __future__ import annotations

from typing import Any

from sdtrt.webui.generation import GenerationScope
from sdtrt.webui.jobs import JobState
from sdtrt.webui.state import ServiceState


def snapshot(state: ServiceState, scope: GenerationScope) -> dict[str, Any]:
    """A snapshot for /status. Never waits behind a load, refit, build or delete. An engine being built is
    not ready: it is not among the engines (nothing is published before the build ends) and `building`
    lists its job."""
    s = state.require_host().settings()
    with state.lock:
        server, label = state.active, state.active_label
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
    jobs = state.jobs.list()
    building = [{"job_id": j.id, "checkpoint": j.request.get("checkpoint"),
                 "profiles": j.request.get("profiles"), "state": j.state, "phase": j.phase,
                 "progress": round(j.progress, 4)} for j in jobs if not j.state.finished]
    return {
        "enabled": s.enabled, "backend": s.backend, "fallback": s.fallback, "cuda_graphs": s.cuda_graphs,
        "cache_dir": str(state.registry().root), "active": active, "counters": state.counters.snapshot(),
        "jobs": {"queued": sum(j.state is JobState.QUEUED for j in jobs),
                 "running": sum(j.state is JobState.RUNNING for j in jobs)},
        "building": building, "generations": scope.generations, "last_generation": scope.last_generation,
    }


def _describe_networks(key: object) -> list[str]:
    """The active network set for /status: A1111's key is a tuple of (name, strength, ...) tuples."""
    if not isinstance(key, tuple):
        return [str(key)]
    return [":".join(map(str, k[:2])) if isinstance(k, tuple) else str(k) for k in key]
