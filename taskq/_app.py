"""The App: the public face that wires taskq's parts together.

Each part lives in its own module and receives what it needs when it is made;
the App keeps the public methods, each delegating to a part:

- ``Database`` (``_database``): the DSN, the pool, connections, the LISTEN connection;
- ``Store`` (``_store``): every SQL statement;
- ``Registry`` (``_registry``): tasks, cron entries and hooks;
- ``Enqueuer`` (``_enqueue``): writing jobs;
- ``Results`` (``_results``), ``Workflows`` (``_workflow_run``): handles, waiting, status;
- ``Worker`` (``worker``): claiming and running jobs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar, overload

import anyio
import asyncpg

from . import _migrations
from ._app_hooks import HookMethods
from ._cron import CronEntry
from ._database import (
    DEFAULT_CONNECT_RETRY_SECONDS,
    DEFAULT_POOL_MAX_SIZE,
    Database,
    translate_errors,
)
from ._enqueue import Enqueuer
from ._errors import ConfigurationError
from ._job import Job
from ._limits import RateLimit
from ._names import DEFAULT_QUEUE, DEFAULT_SCHEMA, quote_schema
from ._queues import Queue, QueueInfo, queue_infos
from ._registry import Registry
from ._results import Results
from ._retry import Retry
from ._serialization import DEFAULT_MAX_PAYLOAD_BYTES
from ._store import Store
from ._task import Task, TaskSettings, make_task
from ._workflow_run import WorkflowRun, Workflows, WorkflowStatus
from .worker import DEFAULT_CONCURRENCY, Worker, WorkerConfig, WorkerStats

F = TypeVar("F", bound=Callable[..., Any])

#: Finished jobs are kept this long in history (results, dead letters), then pruned.
DEFAULT_HISTORY_RETENTION = timedelta(days=7)
#: Environment variable read when no schema is given (then ``taskq``).
SCHEMA_ENV = "TASKQ_SCHEMA"


class App(HookMethods):
    """A taskq application: tasks, the database they live in, and workers.

    Args:
        dsn: Postgres connection string. ``None`` reads ``$TASKQ_DSN``; if that is
            unset too, taskq starts (or reuses) a local embedded Postgres with its
            data in your user data directory and logs where.
        schema: the Postgres schema holding taskq's tables, so several independent
            apps can share a database. ``None`` reads ``$TASKQ_SCHEMA``, else ``taskq``.
        auto_migrate: apply pending migrations on ``async with app`` (default). With
            ``False`` taskq refuses to start on an old schema, for deployments where
            a DBA runs ``python -m taskq migrate``.
        history_retention: how long finished jobs (results, dead letters) are kept.
        max_payload_bytes: largest encoded arguments or result accepted (1 MiB).
        pool_min_size / pool_max_size: asyncpg pool bounds.
        connect_kwargs: extra keyword arguments for ``asyncpg.connect``
            (ssl, timeouts, server_settings...).
        connect_retry: seconds to keep trying to get a connection (Postgres
            down or restarting, connection limit reached) before opening the
            App or an operation such as ``enqueue()`` raises
            :class:`taskq.DatabaseError` (default 5).
        listen_dsn: where the one LISTEN connection goes, when ``dsn`` points
            at a pooler in transaction mode (PgBouncer), which cannot carry
            notifications: point this at Postgres itself or at a session-mode
            pool. ``None`` reads ``$TASKQ_LISTEN_DSN``; if that is unset too,
            the listener uses ``dsn``.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str | None = None,
        auto_migrate: bool = True,
        history_retention: timedelta = DEFAULT_HISTORY_RETENTION,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        pool_min_size: int = 1,
        pool_max_size: int = DEFAULT_POOL_MAX_SIZE,
        connect_kwargs: Mapping[str, Any] | None = None,
        connect_retry: float = DEFAULT_CONNECT_RETRY_SECONDS,
        listen_dsn: str | None = None,
    ) -> None:
        if schema is None:
            schema = os.environ.get(SCHEMA_ENV) or DEFAULT_SCHEMA
        quote_schema(schema)
        if not isinstance(history_retention, timedelta) or history_retention.total_seconds() < 0:
            raise ConfigurationError("history_retention must be a non-negative timedelta")
        if max_payload_bytes < 1:
            raise ConfigurationError("max_payload_bytes must be positive")
        self.auto_migrate = auto_migrate
        self.history_retention = history_retention
        self.max_payload_bytes = max_payload_bytes
        #: Tasks, cron entries and hooks: what this App's code registered.
        self.registry = Registry()
        self._open_count = 0
        self._open_lock: anyio.Lock | None = None
        self._wire(
            Database(
                dsn,
                listen_dsn=listen_dsn,
                name=schema,
                listen_channels=Store(schema).channels,
                pool_min_size=pool_min_size,
                pool_max_size=pool_max_size,
                connect_kwargs=connect_kwargs,
                connect_retry=connect_retry,
            ),
            schema,
        )

    def _wire(self, database: Database, schema: str) -> None:
        self.schema = schema
        #: The database: DSN, pool and connections (for taskq's CLI and integrations).
        self.database = database
        #: Every SQL statement of this App's schema.
        self.store = Store(schema)
        #: Job handles, waiting for outcomes, status, cancel and re-run.
        self.results = Results(database, self.store, self.registry, schema)
        #: Writes jobs: ``task.enqueue()`` and ``app.enqueue()`` go through it.
        self.enqueuer = Enqueuer(
            database,
            self.store,
            self.registry,
            self.results,
            schema=schema,
            max_payload_bytes=self.max_payload_bytes,
        )
        #: Workflow handles: waiting, status, cancel and retry (``get_workflow()``).
        self.workflows = Workflows(database, self.store, self.results, self.registry, schema)

    def use_database(self, dsn: str | None, *, schema: str, listen_dsn: str | None = None) -> None:
        """Point this (closed) App at another database and schema; the registry stays.

        For tools that run an App's tasks elsewhere, such as :mod:`taskq.testing`.
        Pool sizes and connection settings carry over.
        """
        if self.is_open:
            raise ConfigurationError(f"{self!r} is open: close it before changing its database")
        quote_schema(schema)
        database = self.database.moved(
            dsn, listen_dsn=listen_dsn, name=schema, listen_channels=Store(schema).channels
        )
        self._wire(database, schema)
        self._open_lock = None  # made afresh in the event loop that opens it next

    def __repr__(self) -> str:
        return f"<taskq.App schema={self.schema!r} tasks={len(self.tasks)}>"

    # -- settings kept where they are used ----------------------------------------

    @property
    def tasks(self) -> dict[str, Task[Any, Any]]:
        """Registered tasks by name."""
        return self.registry.tasks

    @property
    def crons(self) -> dict[str, CronEntry]:
        """Cron entries by name (``@app.cron``, ``app.add_cron``)."""
        return self.registry.crons

    @property
    def dsn(self) -> str | None:
        """The DSN in use, once open (the given one, ``$TASKQ_DSN`` or the embedded server's)."""
        return self.database.dsn

    @property
    def listen_dsn(self) -> str | None:
        """Where the LISTEN connection goes, when not to ``dsn``."""
        return self.database.listen_dsn

    @property
    def embedded(self) -> Any:
        """The embedded Postgres server when taskq started or reused one, else None."""
        return self.database.embedded

    @property
    def pool_min_size(self) -> int:
        return self.database.pool_min_size

    @property
    def pool_max_size(self) -> int:
        return self.database.pool_max_size

    @property
    def connect_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``asyncpg.connect`` (changes apply to new connections)."""
        return self.database.connect_kwargs

    @property
    def connect_retry(self) -> float:
        return self.database.connect_retry

    # -- tasks -----------------------------------------------------------------

    @overload
    def task(self, fn: F, /) -> Task[Any, Any]: ...

    @overload
    def task(
        self,
        /,
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        retry: Retry | int | bool | None = None,
        timeout: float | timedelta | None = None,
        rate_limit: RateLimit | str | tuple[int, Any] | None = None,
        executor: str | None = None,
        concurrency_key: str | Callable[..., str | None] | None = None,
    ) -> Callable[[F], Task[Any, Any]]: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        retry: Retry | int | bool | None = None,
        timeout: float | timedelta | None = None,
        rate_limit: RateLimit | str | tuple[int, Any] | None = None,
        executor: str | None = None,
        concurrency_key: str | Callable[..., str | None] | None = None,
    ) -> Task[Any, Any] | Callable[[F], Task[Any, Any]]:
        """Register a function (``async def`` or plain ``def``) as a task.

        Args:
            name: the name jobs refer to (default ``module.qualname``). Keep it
                stable: queued jobs find their function by this name.
            queue: default queue of its jobs (default ``"default"``).
            priority: default priority; higher runs first (default 0).
            retry: a :class:`taskq.Retry`, an int (attempts), ``False`` (never
                retry) or ``None`` (the default policy).
            timeout: seconds (or timedelta) one attempt may run before it is
                cancelled and counted as a failure (``TimeoutError``); ``None``: no limit.
            rate_limit: most starts of this task in any window of the period,
                across all workers, e.g. ``"10/second"`` (see :class:`taskq.RateLimit`).
                Workers record it in Postgres when they start.
            executor: where a plain ``def`` runs: ``"thread"`` (default) or ``"process"``,
                the worker's pool of processes, for CPU-bound work (see the scaling guide).
            concurrency_key: the default concurrency key of its jobs (fair sharing
                under a queue's ``per_key_limit``): a text, or a function called with
                each job's arguments when it is enqueued here, returning the key or
                ``None``, e.g. ``lambda tenant_id, **_: f"tenant:{tenant_id}"``.
                ``options(concurrency_key=...)`` overrides it.
        """
        settings = (
            TaskSettings.make(
                queue=queue, priority=priority, retry=retry, timeout=timeout, rate_limit=rate_limit
            )
            .with_executor(executor)
            .with_concurrency_key(concurrency_key)
        )

        def register(func: Callable[..., Any]) -> Task[Any, Any]:
            return self.registry.add_task(make_task(self, func, name=name, settings=settings))

        return register if fn is None else register(fn)

    def cron(
        self,
        expression: str,
        *,
        timezone: str = "UTC",
        name: str | None = None,
        args: Mapping[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        missed: str = "latest",
    ) -> Callable[[Any], Task[Any, Any]]:
        """Run a task periodically: one job per slot of ``expression``, across the cluster.

        Decorates a task (``@app.task`` below it) or a plain function (registered
        as a task with the defaults). Every worker runs the scheduler (unless
        started with ``cron=False``); Postgres makes sure each slot gives one job.

        Args:
            expression: five cron fields (minute hour day-of-month month
                day-of-week), or six with seconds first.
            timezone: IANA zone the expression is read in (default ``UTC``);
                daylight-saving changes follow Debian cron (see the scheduling guide).
            name: the entry's name (default: the task's name). Slots are tracked
                by it, so keep it stable.
            args: keyword arguments of every job (JSON).
            queue / priority: override the task's defaults.
            missed: slots that fell due while no worker ran: ``"latest"`` (default)
                runs the newest once, ``"all"`` runs each, ``"skip"`` runs none.
        """

        def register(fn: Any) -> Task[Any, Any]:
            task = fn if isinstance(fn, Task) else self.task(fn)
            self.add_cron(
                expression,
                task,
                timezone=timezone,
                name=name,
                args=args,
                queue=queue,
                priority=priority,
                missed=missed,
            )
            return task

        return register

    def add_cron(
        self,
        expression: str,
        task: Task[Any, Any] | str,
        *,
        timezone: str = "UTC",
        name: str | None = None,
        args: Mapping[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        missed: str = "latest",
    ) -> CronEntry:
        """Add a cron entry at run time (same arguments as :meth:`cron`).

        Running workers of this App pick it up at once. ``task`` is a task of
        this App or its name. Adding an entry under a name in use replaces it.
        """
        return self.registry.add_cron(
            expression,
            task,
            timezone=timezone,
            name=name,
            args=args,
            queue=queue,
            priority=priority,
            missed=missed,
        )

    def queue(self, name: str) -> Queue:
        """A handle on a queue: pause, resume, cluster-wide limits, counts."""
        return Queue(self, name)

    async def queues(self) -> list[QueueInfo]:
        """Every queue that has live jobs or settings, with its settings and counts."""
        return await queue_infos(self.database, self.store)

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> App:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the pool and apply (or check) migrations. ``async with app`` calls it.

        While Postgres cannot be reached (down, restarting, refusing
        connections) this keeps trying for ``connect_retry`` seconds, logging
        one WARNING; errors that waiting cannot fix (credentials, a missing
        database, a schema error) are raised at once. Opening an App that is
        already open only counts one more user; each ``open()`` needs its
        ``close()``.
        """
        if self._open_lock is None:
            self._open_lock = anyio.Lock()
        async with self._open_lock:
            if self.database.is_open:
                self._open_count += 1
                return
            await self.database.open(self._prepare_schema)
            self._open_count = 1

    async def _prepare_schema(self, conn: Any) -> None:
        with translate_errors("preparing the taskq schema"):
            if self.auto_migrate:
                await _migrations.migrate(conn, self.schema)
            else:
                await _migrations.check_schema(conn, self.schema)

    async def close(self) -> None:
        """Stop the notifier and close the pool (when the last ``open()`` is closed)."""
        if self._open_lock is None:
            return
        async with self._open_lock:
            if not self.database.is_open:
                return
            self._open_count -= 1
            if self._open_count > 0:
                return
            await self.database.close()

    @property
    def pool(self) -> asyncpg.Pool:
        """The asyncpg pool (for your own transactions with ``connection=``)."""
        return self.database.pool

    @property
    def is_open(self) -> bool:
        """Whether the App is open (inside ``async with app``)."""
        return self.database.is_open

    async def migrate(self, *, dry_run: bool = False) -> str | list[int]:
        """Apply pending migrations and return their versions; ``dry_run`` returns the SQL."""
        async with self.database.acquire("migrating") as conn:
            if dry_run:
                return await _migrations.pending_sql(conn, self.schema)
            return await _migrations.migrate(conn, self.schema)

    # -- jobs --------------------------------------------------------------------

    async def enqueue(
        self,
        task: str,
        args: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        run_at: Any = None,
        connection: Any = None,
        unique_key: str | None = None,
        unique_for: float | timedelta | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Job:
        """Enqueue a job by task name, without importing the task's function.

        The name must be registered on this App or by a worker that has run
        against this database (workers record their task names), so a typo fails
        here instead of leaving a job that nobody will ever run.

        Raises:
            UnknownTaskError: no task of that name is known.
            SerializationError: ``args`` is not JSON; nothing was written.
        """
        return await self.enqueuer.enqueue_by_name(
            task,
            args,
            queue=queue,
            priority=priority,
            delay=delay,
            run_at=run_at,
            connection=connection,
            unique_key=unique_key,
            unique_for=unique_for,
            meta=meta,
        )

    def get_job(self, job_id: int) -> Job:
        """A handle on an existing job, e.g. from an id sent in an earlier request."""
        return self.results.job(job_id)

    def get_workflow(self, workflow_id: int) -> WorkflowRun:
        """A handle on an existing workflow, e.g. from an id sent in an earlier request."""
        return self.workflows.run(workflow_id)

    async def list_workflows(
        self,
        *,
        state: str | None = None,
        name: str | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[WorkflowStatus]:
        """Workflows, newest first, with step counts; ``before_id``: the page after it."""
        return await self.workflows.listing(
            state=state, name=name, before_id=before_id, limit=limit
        )

    async def queue_counts(self) -> list[tuple[str, str, int]]:
        """(queue, state, count) rows over live jobs and history."""
        return await self.results.counts()

    # -- workers -------------------------------------------------------------------

    async def run_worker(
        self,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        queues: list[str] | None = None,
        handle_signals: bool = True,
        **options: Any,
    ) -> WorkerStats:
        """Run a worker until cancelled, or until SIGTERM/SIGINT (graceful shutdown).

        Args:
            concurrency: jobs run at once by this process (default 10).
            queues: queues to take jobs from (default: all).
            handle_signals: stop gracefully on SIGTERM/SIGINT (a second one cancels the
                running jobs; a third ends the process at once, status 130).
            **options: other :class:`taskq.WorkerConfig` settings
                (``poll_interval``, ``shutdown_timeout``, ``lease_seconds``...).
        """
        worker = Worker(self, WorkerConfig.make(concurrency=concurrency, queues=queues, **options))
        async with self._opened():
            return await worker.run(handle_signals=handle_signals)

    @contextlib.asynccontextmanager
    async def worker(
        self,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        queues: list[str] | None = None,
        **options: Any,
    ) -> AsyncIterator[Worker]:
        """Run a worker beside your code, e.g. in a web app's lifespan.

        On exit the worker stops claiming, lets running jobs finish within its
        shutdown timeout and returns the rest to the queue.
        """
        worker = Worker(self, WorkerConfig.make(concurrency=concurrency, queues=queues, **options))
        async with self._opened(), anyio.create_task_group() as tg:
            await tg.start(worker.serve)
            try:
                yield worker
            finally:
                await worker.stop()

    async def drain(
        self,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        queues: list[str] | None = None,
        **options: Any,
    ) -> WorkerStats:
        """Run jobs until no runnable job is left, then return what happened.

        Jobs that are not due yet (delayed, or waiting for a retry) are left alone.
        Handy in tests and batch scripts.
        """
        worker = Worker(self, WorkerConfig.make(concurrency=concurrency, queues=queues, **options))
        async with self._opened():
            return await worker.run(until_empty=True, handle_signals=False)

    @contextlib.asynccontextmanager
    async def _opened(self) -> AsyncIterator[None]:
        await self.open()
        try:
            yield
        finally:
            await self.close()
