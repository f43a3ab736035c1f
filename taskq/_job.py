"""Job handles: what ``enqueue()`` returns and ``App.get_job(id)`` rebuilds."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from ._errors import JobCancelled, JobFailed
from ._serialization import decode


class JobState(enum.StrEnum):
    """Where a job is in its life.

    ``queued`` (runnable at ``run_at``) -> ``running`` -> ``succeeded`` | ``failed`` |
    ``cancelled``. A retry goes from ``running`` back to ``queued``. A workflow
    step starts ``waiting`` (for its parent steps; no worker sees it) and is
    ``queued`` when the last of its parents ends.
    """

    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """True for the final states: succeeded, failed and cancelled."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of a job, from ``await job.status()``.

    ``error`` is the last attempt's error as ``{"type", "message", "traceback"}``
    (kept while a job waits for a retry, and on a dead letter); ``result`` is the
    decoded return value of a succeeded job (``None`` if it returned nothing).
    ``run_at`` is only known while the job is live. ``errors`` keeps the errors
    of the job's last attempts (``error`` is only the newest); ``progress`` is
    the last progress its task reported.
    """

    id: int
    task: str
    queue: str
    state: JobState
    args: dict[str, Any]
    priority: int
    attempts: int
    max_attempts: int
    enqueued_at: datetime
    run_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: dict[str, Any] | None
    result: Any
    worker_id: str | None
    #: The key given with ``options(unique_key=...)``, if any.
    unique_key: str | None = None
    #: Metadata carried with the job (``options(meta=...)``, and the trace
    #: context added by tracing integrations); empty if none.
    meta: dict[str, Any] = field(default_factory=dict)
    #: The errors of the last attempts that failed or were retried (and of
    #: rescues: ``taskq.LeaseExpired``, ``taskq.PoisonJob``), oldest first, at
    #: most 10: ``{"attempt", "type", "message", "traceback", "at"}``, the
    #: traceback cut to its last 4,000 characters and ``at`` an ISO 8601 time.
    #: Empty if no attempt failed (or the job ended before taskq kept them).
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: The last progress the task reported with ``ctx.progress()``:
    #: ``{"fraction", "message", "at"}``; ``None`` if none. Kept across
    #: retries and when the job ends; a manual re-run starts without it.
    progress: dict[str, Any] | None = None
    #: The workflow this job is a step of (``app.get_workflow(id)``), if any.
    workflow_id: int | None = None
    #: The step's name in its workflow, if the job is a step.
    step: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The status as JSON-ready values: timestamps as ISO 8601 strings.

        Handy for a web endpoint that reports a job, or for scripts.
        """
        return {
            "id": self.id,
            "task": self.task,
            "queue": self.queue,
            "state": str(self.state),
            "args": self.args,
            "priority": self.priority,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "enqueued_at": _iso(self.enqueued_at),
            "run_at": _iso(self.run_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "error": self.error,
            "result": self.result,
            "worker_id": self.worker_id,
            "unique_key": self.unique_key,
            "meta": self.meta,
            "errors": self.errors,
            "progress": self.progress,
            "workflow_id": self.workflow_id,
            "step": self.step,
        }

    @property
    def last_error(self) -> str | None:
        """``"Type: message"`` of the last failed attempt, if any."""
        if not self.error:
            return None
        return f"{self.error.get('type')}: {self.error.get('message')}"


class JobBackend(Protocol):
    """What a job handle asks: the App's results (status, waiting, cancel, re-run)."""

    async def status(self, job_id: int) -> JobStatus: ...

    async def result(self, job_id: int, timeout: float | None) -> Any: ...

    async def cancel(self, job_id: int) -> bool: ...

    async def rerun(self, job_id: int) -> bool: ...


class Job:
    """A handle on one job. Cheap to make; every method asks the database."""

    __slots__ = ("_results", "duplicate", "id")

    def __init__(self, results: JobBackend, job_id: int, *, duplicate: bool = False) -> None:
        self._results = results
        self.id = job_id
        #: True when ``enqueue()`` with a unique key found the key taken and
        #: returned the job holding it instead of writing a new one.
        self.duplicate = duplicate

    def __repr__(self) -> str:
        return f"<taskq.Job {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and other.id == self.id and other._results is self._results

    def __hash__(self) -> int:
        return hash(self.id)

    async def status(self) -> JobStatus:
        """The job's current state, attempts, timestamps and last error.

        Raises:
            JobNotFound: no such job (or it was pruned from history).
        """
        return await self._results.status(self.id)

    async def result(self, timeout: float | None = None) -> Any:
        """Wait until the job finishes and return its decoded return value.

        Waits on a notification from the worker, not by polling. ``timeout`` is in
        seconds (``None`` waits for ever).

        The value is decoded by the task's return annotation when this process
        has the task registered (``-> datetime`` gives a datetime), and is plain
        JSON otherwise, as in ``status().result``.

        Raises:
            JobFailed: the job failed for good; carries the last error and traceback.
            DecodeError: the stored result does not decode to the annotated type.
            JobCancelled: the job was cancelled.
            TimeoutError: the job did not finish within ``timeout``.
        """
        return await self._results.result(self.id, timeout)

    async def cancel(self) -> bool:
        """Cancel the job.

        A queued job is removed at once and never runs. A running job is asked to
        stop: its worker cancels the coroutine (finally-blocks run) and records it
        as cancelled. Returns ``False`` if the job had already finished.
        """
        return await self._results.cancel(self.id)

    async def retry(self) -> bool:
        """Run a failed or cancelled job again, with a fresh attempt budget.

        Returns ``False`` if the job is not failed or cancelled, or if it has a
        unique key that a live job holds now.
        """
        return await self._results.rerun(self.id)


def outcome_of(status: JobStatus) -> Any:
    """The value of a finished job, or the error it ended with."""
    if status.state is JobState.SUCCEEDED:
        return status.result
    if status.state is JobState.FAILED:
        raise JobFailed.from_error(status.id, status.error, status.attempts)
    if status.state is JobState.CANCELLED:
        raise JobCancelled(f"job {status.id} was cancelled", job_id=status.id)
    raise RuntimeError(f"job {status.id} is {status.state}, not finished")


def status_from_row(row: Any) -> JobStatus:
    return JobStatus(
        id=row["id"],
        task=row["task"],
        queue=row["queue"],
        state=JobState(row["state"]),
        args=decode(row["args"]),
        priority=row["priority"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        enqueued_at=row["enqueued_at"],
        run_at=row["run_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=decode(row["error"]),
        result=decode(row["result"]),
        worker_id=row["worker_id"],
        unique_key=row["unique_key"],
        meta=decode(row.get("meta")) or {},
        errors=decode(row.get("errors")) or [],
        progress=decode(row.get("progress")),
        workflow_id=row.get("workflow_id"),
        step=row.get("step"),
    )


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
