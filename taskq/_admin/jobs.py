"""Reading jobs for operators: one job in full, listings by state, queue and task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._errors import JobNotFound
from .._job import JobState, JobStatus, status_from_row
from .statements import statements

if TYPE_CHECKING:
    from .._database import Database

#: States a job can be in, in lifecycle order (``waiting``: a workflow step
#: whose parent steps have not all ended).
ALL_STATES: tuple[str, ...] = tuple(str(s) for s in JobState)
LIVE_STATES = ("waiting", "queued", "running")
FINISHED_STATES = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class JobDetail:
    """A job's status plus what only operators look at."""

    status: JobStatus
    #: Times the job's lease expired under a worker (crash, kill, partition).
    rescues: int
    #: A cancel was asked for while it was running and has not landed yet.
    cancel_requested: bool
    #: For a workflow step waiting for its parents (``jobs show`` only): the
    #: names of the parent steps that have not ended yet.
    waiting_for: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """``JobStatus.to_dict()`` with ``rescues``, ``cancel_requested`` and ``waiting_for``."""
        return {
            **self.status.to_dict(),
            "rescues": self.rescues,
            "cancel_requested": self.cancel_requested,
            "waiting_for": self.waiting_for,
        }


def _detail(row: Any) -> JobDetail:
    waiting_for = row.get("waiting_for")
    return JobDetail(
        status_from_row(row),
        int(row["rescues"]),
        bool(row["cancel_requested"]),
        None if waiting_for is None else list(waiting_for),
    )


async def get_job(database: Database, schema: str, job_id: int) -> JobDetail:
    """One job, live or finished.

    Raises:
        JobNotFound: no job with that id (or it was pruned from history).
    """
    async with database.acquire("reading a job") as conn:
        row = await conn.fetchrow(statements(schema).get_job, job_id)
    if row is None:
        raise JobNotFound(f"no job with id {job_id} in schema {schema!r}")
    return _detail(row)


async def list_jobs(
    database: Database,
    schema: str,
    *,
    states: Sequence[str] = ALL_STATES,
    queue: str | None = None,
    task: str | None = None,
    limit: int = 50,
) -> list[JobDetail]:
    """Live and finished jobs, newest (highest id) first."""
    sql = statements(schema)
    wanted = list(dict.fromkeys(states))
    live = any(s in LIVE_STATES for s in wanted)
    finished = any(s in FINISHED_STATES for s in wanted)
    if not (live or finished) or limit <= 0:
        return []
    query = sql.list_all if live and finished else sql.list_live if live else sql.list_history
    async with database.acquire("listing jobs") as conn:
        rows = await conn.fetch(query, wanted, queue, task, limit)
    return [_detail(r) for r in rows]


async def known_tasks(database: Database, schema: str) -> list[str]:
    """Task names that workers registered or that live jobs name, sorted."""
    async with database.acquire("listing task names") as conn:
        rows = await conn.fetch(statements(schema).known_tasks)
    return [r[0] for r in rows]


async def task_in_history(database: Database, schema: str, name: str) -> bool:
    """Whether a finished job of task ``name`` is in history (a scan of history)."""
    async with database.acquire("looking up a task name") as conn:
        return bool(await conn.fetchval(statements(schema).task_in_history, name))
