"""A worker's inputs and counts: WorkerHost, WorkerConfig and its defaults, WorkerStats."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from .._database import Database
from .._errors import ConfigurationError
from .._names import check_queue
from .._registry import Registry
from .._store import Store


class WorkerHost(Protocol):
    """What a worker needs from the App it runs: its parts and two settings."""

    @property
    def database(self) -> Database: ...

    @property
    def store(self) -> Store: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def max_payload_bytes(self) -> int: ...

    @property
    def history_retention(self) -> timedelta: ...


#: Jobs run at once by one worker: its back pressure. Jobs beyond it stay in Postgres.
DEFAULT_CONCURRENCY = 10
#: Fallback poll when no notification arrives (LISTEN is the normal wake-up;
#: this bounds the delay when a notification is lost, e.g. behind PgBouncer).
DEFAULT_POLL_INTERVAL = 2.0
#: A claimed job's lease; renewed every third of it while the job runs. After it
#: expires without renewal (the worker died or was cut off) the job is rescued.
DEFAULT_LEASE_SECONDS = 30.0
#: On shutdown, running jobs get this long to finish before they are cancelled
#: and returned to the queue (without using up an attempt).
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
#: Most jobs claimed, or outcomes written back, in one statement.
DEFAULT_BATCH_SIZE = 500
#: Outcomes waiting to be written back before the worker stops claiming: while
#: Postgres is unreachable, finished work piles up in memory only this far.
DEFAULT_MAX_PENDING_OUTCOMES = 5000
#: How often history is pruned.
DEFAULT_PRUNE_INTERVAL = 60.0
#: Every worker looks for expired leases when it starts and then every this
#: share of the lease (15 s by default): a killed worker's jobs are queued
#: again at most lease + rescue_interval (45 s) after its last renewal, as
#: long as any worker runs.
DEFAULT_RESCUE_INTERVAL_SHARE = 0.5
#: A process of the pool for ``executor="process"`` tasks is replaced after this
#: many jobs, so that memory a task leaks (or caches) is given back.
DEFAULT_MAX_JOBS_PER_PROCESS = 1000
#: A job whose worker stops renewing its lease this many times (it crashes
#: the worker, or is killed with it, every time) is failed as poison.
DEFAULT_MAX_RESCUES = 3


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one worker; each default is the named constant beside it.

    Attributes:
        concurrency: jobs run at once; the worker's back pressure (10).
        queues: queues served; ``None`` serves all of them.
        poll_interval: seconds between fallback polls when no notification comes (2).
        lease_seconds: a claimed job's lease, renewed every third of it (30).
        shutdown_timeout: seconds running jobs get on shutdown before they are
            cancelled and returned to the queue (30).
        batch_size: most jobs claimed, or outcomes written back, per statement (500).
        max_pending_outcomes: outcomes buffered while Postgres is unreachable
            before the worker stops claiming (5000).
        rescue_interval: seconds between looks for expired leases, the first
            when the worker starts (half the lease).
        max_rescues: rescues after which a job is failed as poison (3).
        prune_interval: seconds between history prunes (60).
        cron: run the cron scheduler in this worker (True; ``drain()`` never does).
        process_pool_size: processes for ``executor="process"`` tasks, started
            when first needed (0: the smaller of ``concurrency`` and the cores).
        max_jobs_per_process: jobs after which such a process is replaced (1000).
    """

    concurrency: int = DEFAULT_CONCURRENCY
    queues: tuple[str, ...] | None = None
    poll_interval: float = DEFAULT_POLL_INTERVAL
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    batch_size: int = DEFAULT_BATCH_SIZE
    max_pending_outcomes: int = DEFAULT_MAX_PENDING_OUTCOMES
    rescue_interval: float = 0.0  # 0: DEFAULT_RESCUE_INTERVAL_SHARE of the lease
    max_rescues: int = DEFAULT_MAX_RESCUES

    def __post_init__(self) -> None:
        lease = self.lease_seconds
        if not self.rescue_interval and isinstance(lease, int | float) and lease > 0:
            object.__setattr__(self, "rescue_interval", lease * DEFAULT_RESCUE_INTERVAL_SHARE)

    prune_interval: float = DEFAULT_PRUNE_INTERVAL
    cron: bool = True
    process_pool_size: int = 0
    max_jobs_per_process: int = DEFAULT_MAX_JOBS_PER_PROCESS

    @classmethod
    def make(cls, *, queues: Any = None, **settings: Any) -> WorkerConfig:
        """Validate settings and build a config; unknown or bad values raise ConfigurationError."""
        unknown = set(settings) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigurationError(
                f"unknown worker setting(s) {sorted(unknown)}; known: "
                f"{sorted(cls.__dataclass_fields__)}"
            )
        if isinstance(queues, str):
            raise ConfigurationError(f"queues must be a list of names, e.g. [{queues!r}]")
        qs = None if queues is None else tuple(check_queue(q) for q in queues)
        if qs is not None and not qs:
            raise ConfigurationError("queues must not be empty (None means: all queues)")
        config = cls(queues=qs, **settings)
        names = ("concurrency", "batch_size", "max_pending_outcomes", "max_rescues")
        for name in (*names, "max_jobs_per_process"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{name} must be a positive int, got {value!r}")
        for name in ("poll_interval", "lease_seconds", "rescue_interval", "prune_interval"):
            value = getattr(config, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ConfigurationError(f"{name} must be a positive number of seconds")
        size = config.process_pool_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ConfigurationError(
                f"process_pool_size must be an int >= 0 (0: as many as cores), got {size!r}"
            )
        if not isinstance(config.cron, bool):
            raise ConfigurationError(f"cron must be True or False, got {config.cron!r}")
        if not config.shutdown_timeout >= 0:
            raise ConfigurationError("shutdown_timeout must be >= 0 seconds")
        return config


@dataclass
class WorkerStats:
    """What a worker did: counts of outcomes it recorded."""

    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    released: int = 0
    lost: int = 0
    #: Claim statements run, and write-back statements run: with batching both
    #: stay far below the number of jobs under load.
    claims: int = 0
    writebacks: int = 0

    @property
    def processed(self) -> int:
        """Jobs whose attempt ended (succeeded, failed, retried or cancelled)."""
        return self.succeeded + self.failed + self.retried + self.cancelled
