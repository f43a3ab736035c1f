"""What the runner needs from a queue under test: one small adapter class per system."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import asyncpg

#: The job every workload runs: called with the job's ``i`` argument.
JobFn = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Venv:
    """A peer's own virtualenv, made on demand by ``benchmarks.venvs``.

    ``requirements`` are pip requirement strings with exact pins; the harness's
    own needs (asyncpg, orjson, uvloop, psutil) are added at the versions the
    runner itself uses, so that every system talks to Postgres through the same
    driver build where it uses asyncpg at all.
    """

    name: str
    version: str
    requirements: tuple[str, ...]

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.version}"


class System(abc.ABC):
    """A queue under test, bound to one fresh database.

    The runner never calls the system's library itself: every method below the
    "system process" line runs in a subprocess (``python -m benchmarks.agent``)
    started with the system's interpreter (its own virtualenv for a peer, see
    :attr:`venv`). Only the SQL attributes, :meth:`prepare`, :meth:`plans` and
    :meth:`check` run in the runner, as plain SQL. Adapters import their library inside
    methods, never at module level.
    """

    name: ClassVar[str]
    #: variant -> row label. A variant is one configuration of the system
    #: (``pgqueuer`` at its defaults and tuned); ``""`` is the only one by default.
    variants: ClassVar[dict[str, str]]
    #: ``None``: runs in the runner's interpreter (taskq, the floor).
    venv: ClassVar[Venv | None] = None
    #: Distributions whose versions the report lists (read in the system's process).
    packages: ClassVar[tuple[str, ...]] = ("asyncpg",)
    #: One row, one boolean: is any job still unfinished? Polled while a worker drains.
    unfinished_sql: ClassVar[str]
    #: One row, one int: jobs enqueued but not finished yet (queued or running).
    backlog_sql: ClassVar[str]
    #: What the variant's settings are, in words, for the report.
    settings: ClassVar[dict[str, str]] = {}

    def __init__(self, dsn: str, variant: str = "") -> None:
        if variant not in self.variants:
            raise ValueError(f"{self.name} has no variant {variant!r}")
        self.dsn = dsn
        self.variant = variant
        #: Worker processes of this run (workload D); set by the agent.
        self.processes = 1
        #: Worker concurrency of this run, when the command was given it (``worker``,
        #: and ``setup`` in workload F, whose variants may configure limits from it).
        self.concurrency: int | None = None

    @classmethod
    def describe(cls, variant: str, concurrencies: tuple[int, ...]) -> str:
        """The variant's settings in words, for the report (at the run's concurrencies)."""
        return cls.settings.get(variant, "")

    @classmethod
    def runs_per_job(cls, variant: str) -> int:
        """How often each job runs before it succeeds (2 when every job is retried once)."""
        return 1

    @classmethod
    def jobs_share(cls, variant: str, workload: str) -> float:
        """Share of a bulk workload's jobs this row runs (1: all).

        A much slower peer drains fewer jobs so that the whole run stays within
        its time; rates are per second all the same, and the report lists the
        rows that ran fewer.
        """
        return 1.0

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

    async def sleep(self, seconds: float) -> None:
        """The sleep a job body of this system would use (workload E)."""
        await asyncio.sleep(seconds)

    # -- in the runner -------------------------------------------------------------

    async def prepare(self, conn: asyncpg.Connection, options: dict[str, Any]) -> None:  # noqa: B027
        """After setup, before the run: put the database in the state the run needs."""

    async def plans(self) -> list[dict[str, Any]]:
        """Plans of the statements a worker's claim and write-back run, rolled back
        (workload H; see TaskqSystem.plans). Empty: not measured for this system."""
        return []

    async def check(self, conn: asyncpg.Connection, expected: int) -> list[str]:
        """After a drain: problems found in the system's own records (empty if none).

        ``expected`` jobs were enqueued by the run; each must be finished,
        successfully, once.
        """
        return []
