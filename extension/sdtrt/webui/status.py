"""The service's state for GET /sdtrt/v1/status: settings, the active server and its engines, counters, builds and
the last generation. Never waits behind a load, refit, build or delete."""

from __future__ import annotations

from sdtrt.webui.generation import GenerationScope
from sdtrt.webui.jobs import JobState
from sdtrt.webui.reports import ActiveReport, BuildingJob, JobCounts, StatusReport
from sdtrt.webui.state import ServiceState


def snapshot(state: ServiceState, scope: GenerationScope) -> StatusReport:
    """A snapshot for /status. Never waits behind a load, refit, build or delete. An engine being built is
    not ready: it is not among the engines (nothing is published before the build ends) and `building`
    lists its job."""
    s = state.require_host().settings()
    with state.lock:
        server, label = state.active, state.active_label
    active = None
    if server is not None:
        networks = server.networks
        live = [slot for slot in server.slots if slot.session is not None and not slot.session.closed]
        active = ActiveReport(
            label=label, engines=[slot.id for slot in server.slots],
            loaded=[slot.id for slot in server.slots if slot.session is not None],
            ready=[slot.id for slot in live if slot.broken is None],
            backends=sorted({slot.manifest.key.backend for slot in server.slots}), unusable=server.unusable,
            runtime={slot.id: slot.session.runner.stats() for slot in live if slot.session is not None},
            networks=_describe_networks(networks.key if networks else ()))
    jobs = state.jobs.list()
    building = [BuildingJob(j.id, j.request.get("checkpoint"), j.request.get("profiles"), j.state.value, j.phase,
                            round(j.progress, 4)) for j in jobs if not j.state.finished]
    return StatusReport(
        enabled=s.enabled, backend=s.backend, fallback=s.fallback.value, cuda_graphs=s.cuda_graphs,
        cache_dir=str(state.registry().root), active=active, counters=state.counters.snapshot(),
        jobs=JobCounts(sum(j.state is JobState.QUEUED for j in jobs), sum(j.state is JobState.RUNNING for j in jobs)),
        building=building, generations=scope.generations, last_generation=scope.last_generation)


def _describe_networks(key: object) -> list[str]:
    """The active network set for /status: A1111's key is a tuple of (name, strength, ...) tuples."""
    if not isinstance(key, tuple):
        return [str(key)]
    return [":".join(map(str, k[:2])) if isinstance(k, tuple) else str(k) for k in key]
