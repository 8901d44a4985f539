"""Engine builds as jobs: one runs at a time on one worker thread, the others wait in FIFO order. Each job has
an id, a state, a progress fraction and phase, and its result or error, readable from any thread.

Submitting is bounded and, for an `idempotent` queue (the service creates its queue so), idempotent: a request
equal to one that is queued or running returns that job instead of queueing a second build, and past `max_queued`
waiting jobs a new one is refused with QueueFull (the API's 429), so a client retrying in a loop cannot queue hours
of builds or grow memory."""

from __future__ import annotations

import enum
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdtrt.errors import SdtrtError

log = logging.getLogger("sdtrt")


class JobState(str, enum.Enum):
    """Where a job is. A str: the value ("queued", ...) is what JSON, the tab and comparisons with text see."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Done, failed or cancelled: nothing more happens to the job."""
        return self not in (JobState.QUEUED, JobState.RUNNING)

    def __str__(self) -> str:  # Python 3.11+ would print "JobState.DONE" in f-strings otherwise
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# the short names the tab and the tests use
QUEUED, RUNNING, DONE, FAILED = JobState.QUEUED, JobState.RUNNING, JobState.DONE, JobState.FAILED
CANCELLED = JobState.CANCELLED
#: Job ids are uuid4 hex (the API validates path ids with this pattern too).
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
_ID_RE = re.compile(JOB_ID_PATTERN)
#: Finished jobs kept for GET /jobs/{id}; older ones are forgotten first.
KEEP_FINISHED = 200
#: Jobs that may wait behind the running one; more are refused (QueueFull).
MAX_QUEUED = 32


class JobNotFound(SdtrtError, KeyError):
    """No job with that id (or an id that is not one)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


class QueueFull(SdtrtError):
    """Too many builds are waiting; try again once some finished (or cancel one)."""


class JobCancelled(SdtrtError):
    """Raised inside a job's progress callback once it was cancelled."""


@dataclass
class Job:
    id: str
    request: dict[str, Any]
    state: JobState = JobState.QUEUED
    phase: str = "queued"
    progress: float = 0.0
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state.value, "phase": self.phase, "progress": round(self.progress, 4),
            "request": self.request, "result": self.result, "error": self.error,
            "engine_id": (self.result or {}).get("engine_id"),
            "created": self.created, "started": self.started, "finished": self.finished,
        }


#: work(job, progress) -> result dict. progress(phase, fraction) raises JobCancelled after cancel().
Work = Callable[[Job, Callable[[str, float], None]], dict[str, Any]]


class JobQueue:
    def __init__(self, max_queued: int = MAX_QUEUED, idempotent: bool = False) -> None:
        self.max_queued = max_queued
        self.idempotent = idempotent
        self._jobs: dict[str, Job] = {}
        self._work: dict[str, Work] = {}
        self._queue: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, request: dict[str, Any], work: Work) -> Job:
        """Queue `work` for `request`; when `idempotent`, return instead the queued or running job of an equal
        request (unless it is being cancelled). Raises QueueFull when `max_queued` jobs already wait."""
        with self._lock:
            waiting = 0
            for other in self._jobs.values():
                active = other.state in (QUEUED, RUNNING) and not other.cancel_requested
                if self.idempotent and active and other.request == request:
                    return other
                waiting += other.state == QUEUED
            if waiting >= self.max_queued:
                raise QueueFull(f"{waiting} builds are already waiting (the limit is {self.max_queued}); try again "
                                "when some have finished, or cancel one (DELETE /sdtrt/v1/jobs/{id})")
            job = Job(uuid.uuid4().hex, request)
            self._jobs[job.id] = job
            self._work[job.id] = work
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sdtrt-builds", daemon=True)
                self._thread.start()
        self._queue.put(job.id)
        return job

    def get(self, job_id: object) -> Job:
        if not isinstance(job_id, str) or not _ID_RE.fullmatch(job_id):
            raise JobNotFound(f"invalid job id {job_id!r}: a job id is 32 hexadecimal digits")
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        return job

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self._lock:
            if job.state == QUEUED:
                job.state, job.phase, job.finished = CANCELLED, "cancelled", time.time()
            elif job.state == RUNNING:
                job.cancel_requested = True
        return job

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.05) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(job_id)
        while job.state in (QUEUED, RUNNING):
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(poll)
        return job

    def _run(self) -> None:
        while True:
            job_id = self._queue.get()
            with self._lock:
                job = self._jobs[job_id]
                work = self._work.pop(job_id)
                if job.state != QUEUED:
                    continue
                job.state, job.started, job.phase = RUNNING, time.time(), "starting"

            def progress(phase: str, fraction: float, job: Job = job) -> None:
                if job.cancel_requested:
                    raise JobCancelled(f"job {job.id} was cancelled")
                job.phase, job.progress = phase, max(job.progress, min(1.0, max(0.0, float(fraction))))

            state = DONE
            error: str | None = None
            result: dict[str, Any] | None = None
            try:
                result = work(job, progress)
            except JobCancelled:
                state, error, result = CANCELLED, None, None
            except SdtrtError as e:
                state, error, result = FAILED, str(e), None
            except Exception as e:
                log.exception("sdtrt: build job %s failed", job.id)
                state, error, result = FAILED, f"{type(e).__name__}: {e}", None
            with self._lock:
                job.state, job.error, job.result, job.finished = state, error, result, time.time()
                job.phase = state.value
                if state == DONE:
                    job.progress = 1.0
                self._forget_old()

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state not in (QUEUED, RUNNING)]
        for j in sorted(finished, key=lambda j: j.created)[:-KEEP_FINISHED or None]:
            del self._jobs[j.id]
