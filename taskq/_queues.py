"""Queues as objects: pause, resume and cluster-wide limits, stored in Postgres."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ._database import Database
from ._limits import RateLimit, check_concurrency_limit, check_per_key_limit
from ._names import check_queue
from ._store import Store


class QueueHost(Protocol):
    """What a queue handle needs from the App: its database and statements."""

    @property
    def database(self) -> Database: ...

    @property
    def store(self) -> Store: ...


class _Unset:
    def __repr__(self) -> str:
        return "<unchanged>"


#: Leaves a setting as it is in :meth:`Queue.configure`.
UNCHANGED: Any = _Unset()


@dataclass(frozen=True)
class QueueInfo:
    """A queue's settings and how many of its jobs are queued and running.

    Attributes:
        name: the queue.
        paused: no job of it starts while paused.
        concurrency_limit: most jobs of it running at once across all workers, or None.
        rate_limit: most job starts per period across all workers, or None.
        per_key_limit: most running jobs per concurrency key (fair sharing), or None.
        queued: live jobs waiting (due now or later).
        running: jobs running now.
    """

    name: str
    paused: bool
    concurrency_limit: int | None
    rate_limit: RateLimit | None
    queued: int
    running: int
    per_key_limit: int | None = None


def info_from_row(row: Any) -> QueueInfo:
    rate = None
    if row["rate_limit"] is not None:
        rate = RateLimit(int(row["rate_limit"]), float(row["rate_period"]))
    return QueueInfo(
        name=row["queue"] if "queue" in row else row["name"],
        paused=bool(row["paused"]),
        concurrency_limit=row["concurrency_limit"],
        rate_limit=rate,
        queued=int(row["queued"]) if "queued" in row else 0,
        running=int(row["running"]) if "running" in row else 0,
        per_key_limit=row.get("per_key_limit"),
    )


async def queue_infos(database: Database, store: Store) -> list[QueueInfo]:
    """Every queue that has live jobs or settings, with its settings and counts."""
    async with database.acquire("reading queues") as conn:
        rows = await store.queue_overview(conn)
    return [info_from_row(r) for r in rows]


class Queue:
    """A handle on one queue, from ``app.queue(name)``. Settings live in Postgres
    and hold for every worker on every host: a claim reads them each time."""

    def __init__(self, app: QueueHost, name: str) -> None:
        self._database = app.database
        self._store = app.store
        self.name = check_queue(name)

    def __repr__(self) -> str:
        return f"<taskq.Queue {self.name!r}>"

    async def pause(self) -> QueueInfo:
        """Stop starting jobs of this queue, on every worker, from the next claim on.

        Running jobs go on; new jobs are still accepted and wait.
        """
        return await self._configure(paused=True)

    async def resume(self) -> QueueInfo:
        """Start jobs of this queue again; idle workers are woken at once."""
        return await self._configure(paused=False)

    async def configure(
        self,
        *,
        concurrency_limit: int | None = UNCHANGED,
        rate_limit: RateLimit | str | tuple[int, Any] | None = UNCHANGED,
        per_key_limit: int | None = UNCHANGED,
    ) -> QueueInfo:
        """Set cluster-wide limits; ``None`` removes one, an omitted one stays.

        Args:
            concurrency_limit: most jobs of this queue running at once across all
                workers (each worker's own ``concurrency`` still applies).
            rate_limit: most job starts in any window of the period, across all
                workers, e.g. ``"100/minute"`` (see :class:`taskq.RateLimit`).
            per_key_limit: most running jobs per ``concurrency_key`` across all
                workers; the claim then takes turns between keys (fair sharing
                between tenants; jobs without a key count as one more key).
        """
        changes: dict[str, Any] = {}
        if concurrency_limit is None:
            changes["clear_concurrency_limit"] = True
        elif concurrency_limit is not UNCHANGED:
            changes["concurrency_limit"] = check_concurrency_limit(concurrency_limit)
        if rate_limit is None:
            changes["clear_rate"] = True
        elif rate_limit is not UNCHANGED:
            rate = RateLimit.parse(rate_limit)
            changes["rate"] = (rate.limit, rate.period)
        if per_key_limit is None:
            changes["clear_per_key_limit"] = True
        elif per_key_limit is not UNCHANGED:
            changes["per_key_limit"] = check_per_key_limit(per_key_limit)
        return await self._configure(**changes)

    async def info(self) -> QueueInfo:
        """Settings and counts of this queue."""
        for found in await queue_infos(self._database, self._store):
            if found.name == self.name:
                return found
        return QueueInfo(self.name, False, None, None, 0, 0)

    async def _configure(self, **changes: Any) -> QueueInfo:
        async with self._database.acquire("changing queue settings") as conn:
            await self._store.configure_queue(conn, self.name, **changes)
        return await self.info()
