"""The ``status`` report: job counts per queue and state, and the live workers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .statements import statements

if TYPE_CHECKING:
    from .._database import Database


@dataclass(frozen=True)
class QueueStatus:
    """Counts of one queue. ``succeeded``/``failed``/``cancelled`` cover the
    window of the report (all of history when it has none). ``waiting``:
    workflow steps waiting for their parents (not runnable yet; in neither
    ``queued`` nor ``scheduled``)."""

    name: str
    paused: bool
    waiting: int
    queued: int
    scheduled: int
    running: int
    succeeded: int
    failed: int
    cancelled: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "name": self.name,
            "paused": self.paused,
            "waiting": self.waiting,
            "queued": self.queued,
            "scheduled": self.scheduled,
            "running": self.running,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
        }


@dataclass(frozen=True)
class WorkerStatus:
    """A worker process registered in the ``workers`` table."""

    id: str
    hostname: str
    pid: int
    concurrency: int
    queues: list[str] | None
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age: float
    running: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values: timestamps as ISO 8601 strings."""
        return {
            "id": self.id,
            "hostname": self.hostname,
            "pid": self.pid,
            "concurrency": self.concurrency,
            "queues": self.queues,
            "running": self.running,
            "started_at": self.started_at.isoformat(),
            "heartbeat_at": self.heartbeat_at.isoformat(),
            "heartbeat_age_seconds": round(self.heartbeat_age, 3),
        }


@dataclass(frozen=True)
class StatusReport:
    """One snapshot of the cluster, read in one transaction."""

    time: datetime
    schema: str
    #: Finished counts cover the last this many seconds; None: all of history.
    window: float | None
    queues: list[QueueStatus]
    workers: list[WorkerStatus]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "time": self.time.isoformat(),
            "schema": self.schema,
            "window_seconds": self.window,
            "queues": [q.to_dict() for q in self.queues],
            "workers": [w.to_dict() for w in self.workers],
        }


async def status(database: Database, schema: str, *, window: float | None = None) -> StatusReport:
    """Per-queue counts and live workers.

    ``window``: count finished jobs of the last ``window`` seconds only (cheap
    on a large history); ``None`` counts all of history.
    """
    sql = statements(schema)
    # One snapshot: a job moving from jobs to history is counted once.
    async with (
        database.acquire("reading the status") as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        now = await conn.fetchval("SELECT now()")
        live = await conn.fetch(sql.live_counts)
        if window is None:
            done = await conn.fetch(sql.history_counts)
        else:
            done = await conn.fetch(sql.history_counts_since, window)
        paused = {r["name"]: r["paused"] for r in await conn.fetch(sql.paused)}
        workers = await conn.fetch(sql.workers)
    counts: dict[str, dict[str, int]] = {name: {} for name in paused}
    for r in live:
        counts.setdefault(r["queue"], {}).update(
            waiting=r["waiting"],
            queued=r["queued"],
            scheduled=r["scheduled"],
            running=r["running"],
        )
    for r in done:
        counts.setdefault(r["queue"], {}).update(
            succeeded=r["succeeded"], failed=r["failed"], cancelled=r["cancelled"]
        )
    queues = [
        QueueStatus(
            name=name,
            paused=bool(paused.get(name, False)),
            waiting=c.get("waiting", 0),
            queued=c.get("queued", 0),
            scheduled=c.get("scheduled", 0),
            running=c.get("running", 0),
            succeeded=c.get("succeeded", 0),
            failed=c.get("failed", 0),
            cancelled=c.get("cancelled", 0),
        )
        for name, c in sorted(counts.items())
    ]
    return StatusReport(
        time=now,
        schema=schema,
        window=window,
        queues=queues,
        workers=[
            WorkerStatus(
                id=w["id"],
                hostname=w["hostname"],
                pid=w["pid"],
                concurrency=w["concurrency"],
                queues=None if w["queues"] is None else list(w["queues"]),
                started_at=w["started_at"],
                heartbeat_at=w["heartbeat_at"],
                heartbeat_age=max(0.0, float(w["heartbeat_age"])),
                running=int(w["running"]),
            )
            for w in workers
        ],
    )
