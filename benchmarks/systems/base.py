"""What the runner needs from a queue under test: one small adapter class per system."""

from __future__ import annotations

import abc
import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, ClassVar

import asyncpg

#: The job every workload runs: called with the job's ``i`` argument.
JobFn = Callable[[int], Awaitable[None]]


class System(abc.ABC):
    """A queue under test, bound to one fresh database.

    The runner never calls the system's library itself: every method below the
    "system process" line runs in a subprocess (``python -m benchmarks.agent``)
    started with :attr:`python`, so a peer can live in its own virtualenv. Only
    :attr:`unfinished_sql` and :meth:`check` run in the runner, as plain SQL.
    Adapters import their library inside methods, never at module level.
    """

    name: ClassVar[str]
    #: Interpreter for this system's processes (a peer points at its own venv).
    python: ClassVar[str] = sys.executable
    #: One row, one boolean: is any job still unfinished? Polled while a worker drains.
    unfinished_sql: ClassVar[str]

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    # -- in the system process ---------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect (pools, clients); called before any method below."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release what open() acquired."""

    @abc.abstractmethod
    async def setup(self) -> None:
        """Install the system's schema into the (empty, fresh) database."""

    @abc.abstractmethod
    async def enqueue_bulk(self, batch: list[dict[str, Any]]) -> None:
        """Enqueue ``batch`` with the system's fastest batch API, in one call."""

    @abc.abstractmethod
    async def enqueue_one(self, args: dict[str, Any]) -> None:
        """Enqueue one job the way a web handler would."""

    @abc.abstractmethod
    async def enqueue_times(self) -> dict[int, datetime]:
        """Database-clock enqueue time of each job enqueued by enqueue_one, by ``i``.

        The time is taken on the server by the enqueue statement itself (e.g.
        ``now()`` recorded in the job row, or returned by ``RETURNING``), so
        that latency is measured on one clock.
        """

    @abc.abstractmethod
    async def run_worker(
        self, concurrency: int, job: JobFn, ready: Callable[[], None], stop: asyncio.Event
    ) -> None:
        """Run one worker running ``job`` at most ``concurrency`` at a time.

        Call ``ready()`` once the worker is about to claim; when ``stop`` is set,
        stop claiming, finish running jobs, write back, and return.
        """

    # -- in the runner -------------------------------------------------------------

    async def check(self, conn: asyncpg.Connection, expected: int) -> list[str]:
        """After a drain: problems found in the system's own records (empty if none)."""
        return []
