"""The App: configuration, the connection pool, the task registry and every enqueue path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any, TypeVar, overload

import anyio
import asyncpg
import tenacity

from . import _migrations
from ._cron import CronEntry
from ._errors import (
    ConfigurationError,
    DatabaseError,
    JobNotFound,
    TaskqError,
    UnknownTaskError,
)
from ._hooks import (
    EnqueueContext,
    EnqueueMiddleware,
    Hooks,
    JobMiddleware,
)
from ._job import Job, JobState, JobStatus, status_from_row
from ._limits import RateLimit
from ._names import (
    DEFAULT_QUEUE,
    DEFAULT_SCHEMA,
    check_queue,
    check_task_name,
    default_task_name,
    quote_schema,
    suggest_task,
)
from ._notifier import Notifier
from ._queues import Queue, QueueInfo, info_from_row
from ._retry import Retry, coerce_retry
from ._serialization import DEFAULT_MAX_PAYLOAD_BYTES, decode, encode, encode_many
from ._store import Store
from ._task import EnqueueOptions, Task, check_priority, with_defaults
from ._worker import DEFAULT_CONCURRENCY, Worker, WorkerConfig, WorkerStats

log = logging.getLogger("taskq")

F = TypeVar("F", bound=Callable[..., Any])
H = TypeVar("H", bound=Callable[..., Any])

#: Finished jobs are kept this long in history (results, dead letters), then pruned.
DEFAULT_HISTORY_RETENTION = timedelta(days=7)
#: Pool size: enough for a worker's claim, acknowledgement and heartbeat
#: connections plus a busy web app's enqueues; raise it for many producers.
DEFAULT_POOL_MAX_SIZE = 10
#: While waiting for a result, re-read the job this often in case a
#: notification was lost (the wake-up itself comes from LISTEN).
RESULT_RECHECK_SECONDS = 5.0

#: A worker whose heartbeat is older than this counts as gone when a timed-out
#: ``job.result()`` explains the wait (workers beat every lease/3, 10 s by default).
LIVE_WORKER_SECONDS = 60.0
#: How long a timed-out ``job.result()`` spends finding out why, at most.
EXPLAIN_TIMEOUT_SECONDS = 2.0
#: Seconds an operation keeps trying to get a connection before it fails:
#: long enough to ride out a Postgres restart or failover blip, short enough
#: that a web request does not hang on a dead database.
DEFAULT_CONNECT_RETRY_SECONDS = 5.0
#: Seconds to wait for a new connection before giving up.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Environment variable read when no DSN is given.
DSN_ENV = "TASKQ_DSN"
#: Environment variable read when no schema is given (then ``taskq``).
SCHEMA_ENV = "TASKQ_SCHEMA"
#: Environment variable read when ``App(listen_dsn=None)``.
LISTEN_DSN_ENV = "TASKQ_LISTEN_DSN"
#: Job ids are Postgres bigints.
MIN_JOB_ID, MAX_JOB_ID = -(2**63), 2**63 - 1


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """A pool connection that can skip the reset round trip when taskq used it.

    asyncpg resets every connection on release (UNLISTEN, RESET ALL, ...), one
    extra round trip that costs about a third of an enqueue. taskq's own
    statements leave no session state behind, so it marks the connections it
    used as clean; connections handed to user code are reset as usual.
    """

    _taskq_clean = False

    def _taskq_mark_clean(self) -> None:
        self._taskq_clean = True


async def _reset(conn: _Connection) -> None:
    if conn._taskq_clean:
        conn._taskq_clean = False
        return
    query = conn.get_reset_query()
    if query:
        await conn.execute(query)


# Errors that mean "no connection could be had": nothing was sent, so trying
# again cannot do anything twice.
_CONNECT_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.PostgresConnectionError,
)


# Errors after which a connection cannot be trusted. InternalClientError is
# what asyncpg raises when the server ends a session in the middle of an
# operation (a Postgres restart); such a connection must not go back to the pool.
_BROKEN_CONNECTION = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
)


@contextlib.contextmanager
def _statement_guard(conn: Any, action: str, *, close_on_cancel: bool) -> Iterator[None]:
    """Translate errors of statements under way; close a connection that broke."""
    with translate_errors(action, in_flight=True):
        try:
            yield
        except _BROKEN_CONNECTION:
            _terminate(conn)
            raise
        except BaseException as exc:
            if close_on_cancel and not isinstance(exc, Exception):
                _terminate(conn)
            raise


def _is_bigint(job_id: int) -> bool:
    return MIN_JOB_ID <= job_id <= MAX_JOB_ID


def _terminate(conn: Any) -> None:
    # A proxy the pool has already taken back raises InterfaceError here,
    # which would hide the error being handled.
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


def _usable(conn: Any) -> bool:
    """Whether a pool connection proxy is still open and still ours."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:  # the pool took it back when it broke
        return False


@contextlib.contextmanager
def translate_errors(action: str, *, in_flight: bool = False) -> Iterator[None]:
    """Map driver errors to DatabaseError so users never catch asyncpg.* from taskq.

    ``in_flight``: a statement may have reached the server, so a lost
    connection leaves its effect unknown, and the message says so.
    """
    try:
        yield
    except TaskqError:
        raise
    except _BROKEN_CONNECTION as exc:
        if in_flight:
            raise DatabaseError(
                f"{action} failed: the connection to Postgres broke while the statement was "
                f"under way ({exc!r}); it may or may not have taken effect"
            ) from exc
        raise DatabaseError(f"{action} failed: cannot reach Postgres ({exc!r})") from exc
    except asyncpg.PostgresError as exc:
        state = getattr(exc, "sqlstate", "") or ""
        raise DatabaseError(f"{action} failed: Postgres error {state}: {exc}") from exc
    except TimeoutError as exc:
        raise DatabaseError(f"{action} failed: cannot reach Postgres ({exc!r})") from exc


class App:
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
            restarting, connection limit reached) before an operation such as
            ``enqueue()`` raises :class:`taskq.DatabaseError` (default 5).
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
        for name, value in (("dsn", dsn), ("listen_dsn", listen_dsn)):
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(
                    f"{name} must be a string or None, got {type(value).__name__}"
                )
        if schema is None:
            schema = os.environ.get(SCHEMA_ENV) or DEFAULT_SCHEMA
        quote_schema(schema)
        if not isinstance(history_retention, timedelta) or history_retention.total_seconds() < 0:
            raise ConfigurationError("history_retention must be a non-negative timedelta")
        if max_payload_bytes < 1:
            raise ConfigurationError("max_payload_bytes must be positive")
        if not 0 <= pool_min_size <= pool_max_size or pool_max_size < 1:
            raise ConfigurationError(
                f"pool sizes must satisfy 0 <= pool_min_size ({pool_min_size}) <= "
                f"pool_max_size ({pool_max_size}), pool_max_size >= 1"
            )
        self._dsn_arg = dsn
        self.listen_dsn = listen_dsn or os.environ.get(LISTEN_DSN_ENV) or None
        self.dsn: str | None = None
        self.schema = schema
        self.auto_migrate = auto_migrate
        self.history_retention = history_retention
        self.max_payload_bytes = max_payload_bytes
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.connect_kwargs = dict(connect_kwargs or {})
        if not isinstance(connect_retry, int | float) or connect_retry < 0:
            raise ConfigurationError("connect_retry must be a number of seconds >= 0")
        self.connect_retry = float(connect_retry)
        self._store = Store(schema)
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.embedded: Any = None
        self._pool: asyncpg.Pool | None = None
        # One pool connection kept out for taskq's own short statements while
        # it is free (see _acquire); the pool serves everything else.
        self._held: Any = None
        self._held_busy = False
        self._notifier: Notifier | None = None
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._known_tasks: dict[str, tuple[str, int]] = {}
        #: Cron entries by name (``@app.cron``, ``app.add_cron``).
        self.crons: dict[str, CronEntry] = {}
        self._cron_listeners: list[Callable[[], None]] = []
        self._open_count = 0
        self._open_lock: asyncio.Lock | None = None
        self._hooks = Hooks()

    def __repr__(self) -> str:
        return f"<taskq.App schema={self.schema!r} tasks={len(self.tasks)}>"

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
        """
        check_queue(queue)
        check_priority(priority)
        policy = coerce_retry(retry)
        rate = None if rate_limit is None else RateLimit.parse(rate_limit)
        seconds: float | None
        if timeout is None:
            seconds = None
        elif isinstance(timeout, timedelta):
            seconds = timeout.total_seconds()
        elif isinstance(timeout, int | float) and not isinstance(timeout, bool):
            seconds = float(timeout)
        else:
            raise ConfigurationError(f"timeout must be seconds or a timedelta, got {timeout!r}")
        if seconds is not None and not seconds > 0:
            raise ConfigurationError(f"timeout must be positive, got {timeout!r}")

        def register(func: Callable[..., Any]) -> Task[Any, Any]:
            if isinstance(func, Task):
                raise ConfigurationError(f"{func!r} is already a task")
            if not callable(func):
                raise ConfigurationError(f"@app.task needs a function, got {func!r}")
            task_name = check_task_name(name or default_task_name(func))
            if task_name in self.tasks and self.tasks[task_name].fn is not func:
                raise ConfigurationError(f"a different task is already registered as {task_name!r}")
            task: Task[Any, Any] = Task(
                self,
                func,
                name=task_name,
                queue=queue,
                priority=priority,
                retry=policy,
                timeout=seconds,
                rate_limit=rate,
            )
            self.tasks[task_name] = task
            return task

        if fn is not None:
            return register(fn)
        return register

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
        task_name = task.name if isinstance(task, Task) else task
        local = self.tasks.get(task_name) if isinstance(task_name, str) else None
        if local is None or (isinstance(task, Task) and local is not task):
            raise ConfigurationError(
                f"cron needs a task of this App, got {task!r}; register it with @app.task"
            )
        if args is not None and not isinstance(args, Mapping):
            raise TypeError(f"args must be a mapping of keyword arguments, got {args!r}")
        stored = local.bind_arguments((), args or {})
        encode(stored, what=f"args of the cron entry of {task_name!r}")
        if priority is not None:
            check_priority(priority)
        entry_name = name or task_name
        entry = CronEntry(
            name=entry_name,
            expression=expression,
            task=task_name,
            timezone=timezone,
            args=stored,
            queue=queue,
            priority=priority,
            missed=missed,
        )
        old = self.crons.get(entry_name)
        if old is not None and name is None and old.task == task_name and old != entry:
            raise ConfigurationError(
                f"task {task_name!r} already has a cron entry ({old.expression!r}); give "
                "each further entry its own name=..."
            )
        self.crons[entry_name] = entry
        for listener in list(self._cron_listeners):
            listener()
        return entry

    def _on_cron_change(self, listener: Callable[[], None]) -> Callable[[], None]:
        self._cron_listeners.append(listener)
        return lambda: self._cron_listeners.remove(listener)

    def queue(self, name: str) -> Queue:
        """A handle on a queue: pause, resume, cluster-wide limits, counts."""
        return Queue(self, name)

    async def queues(self) -> list[QueueInfo]:
        """Every queue that has live jobs or settings, with its settings and counts."""
        async with self._acquire("reading queues") as conn:
            rows = await self._store.queue_overview(conn)
        return [info_from_row(r) for r in rows]

    # -- hooks -----------------------------------------------------------------

    def before_job(self, fn: H) -> H:
        """Register ``fn(ctx: JobContext)``, called before each attempt runs its task.

        Plain or async. It runs in the job's own asyncio task, so context
        variables it sets are seen by the task function. Raising fails the
        attempt like the task raising would (the task's retry policy applies).
        """
        self._hooks.add_before(fn)
        return fn

    def after_job(self, fn: H) -> H:
        """Register ``fn(ctx: JobContext, outcome: JobOutcome)``, called after every attempt.

        Plain or async; called for every outcome (succeeded, retried, failed,
        cancelled, released, lost) once it is decided, before it is written
        back, and before the worker frees the job's slot. Its exceptions are
        logged and change nothing; an async one is abandoned after 10 s.
        """
        self._hooks.add_after(fn)
        return fn

    def on_failure(self, fn: H) -> H:
        """Register ``fn(ctx: JobContext, outcome: JobOutcome)``, called when an attempt raises.

        ``outcome.kind`` is ``retried`` (it will run again) or ``failed`` (a
        dead letter); ``outcome.exception`` is what it raised. Plain or async;
        its exceptions are logged and change nothing.
        """
        self._hooks.add_failure(fn)
        return fn

    def middleware(self, fn: JobMiddleware) -> JobMiddleware:
        """Register ``async fn(ctx: JobContext, call_next)`` around each task call.

        ``await call_next()`` runs the rest of the chain and the task, and
        returns the task's value, which the middleware returns (or replaces).
        The first registered is the outermost. Exceptions raised by the
        middleware fail the attempt like the task's own.
        """
        self._hooks.add_middleware(fn)
        return fn

    def enqueue_middleware(self, fn: EnqueueMiddleware) -> EnqueueMiddleware:
        """Register ``async fn(ctx: EnqueueContext, call_next)`` around each enqueue.

        It runs in the producer, after the arguments were checked and before
        the jobs are written; ``await call_next()`` writes them and fills in
        ``ctx.job_ids``. It may add JSON values to ``ctx.meta``, which every
        job of the call carries. Cron jobs do not pass through it.
        """
        self._hooks.add_enqueue(fn)
        return fn

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> App:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the pool and apply (or check) migrations. ``async with app`` calls it.

        Opening an App that is already open only counts one more user; each
        ``open()`` needs its ``close()``.
        """
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._pool is not None:
                self._open_count += 1
                return
            self.dsn = await self._resolve_dsn()
            with translate_errors("connecting to Postgres"):
                pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=self.pool_min_size,
                    max_size=self.pool_max_size,
                    connection_class=_Connection,
                    reset=_reset,
                    **self._connect_args(f"taskq ({self.schema})"),
                )
            try:
                async with pool.acquire() as conn:
                    with translate_errors("preparing the taskq schema"):
                        if self.auto_migrate:
                            await _migrations.migrate(conn, self.schema)
                        else:
                            await _migrations.check_schema(conn, self.schema)
            except BaseException:
                await pool.close()
                raise
            self._pool = pool
            self._held = await pool.acquire()
            self._open_count = 1

    async def close(self) -> None:
        """Stop the notifier and close the pool (when the last ``open()`` is closed)."""
        if self._open_lock is None:
            return
        async with self._open_lock:
            if self._pool is None:
                return
            self._open_count -= 1
            if self._open_count > 0:
                return
            notifier, self._notifier = self._notifier, None
            if notifier is not None:
                await notifier.stop()
            pool, self._pool = self._pool, None
            held, self._held = self._held, None
            if held is not None:
                with contextlib.suppress(Exception):
                    await pool.release(held)
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:
                pool.terminate()

    @property
    def pool(self) -> asyncpg.Pool:
        """The asyncpg pool (for your own transactions with ``connection=``)."""
        if self._pool is None:
            raise ConfigurationError("the App is not open: use `async with app:` first")
        return self._pool

    @property
    def is_open(self) -> bool:
        """Whether the App is open (inside ``async with app``)."""
        return self._pool is not None

    def _connect_args(self, application_name: str) -> dict[str, Any]:
        args = dict(self.connect_kwargs)
        settings = dict(args.pop("server_settings", None) or {})
        settings.setdefault("application_name", application_name)
        args["server_settings"] = settings
        # asyncpg waits 60 s for a connection by default; a dead database
        # should surface as an error sooner than that.
        args.setdefault("timeout", DEFAULT_CONNECT_TIMEOUT)
        return args

    async def _resolve_dsn(self) -> str:
        if self._dsn_arg:
            return self._dsn_arg
        env = os.environ.get(DSN_ENV)
        if env:
            return env
        from . import _embedded

        server = await anyio.to_thread.run_sync(_embedded.ensure_server)
        self.embedded = server
        log.info(
            "no DSN given and $%s unset: using the embedded Postgres %s (data: %s, log: %s)",
            DSN_ENV,
            "that taskq started" if server.started else "already running",
            server.data_dir,
            server.log_file,
        )
        return str(server.dsn)

    @contextlib.asynccontextmanager
    async def _acquire(self, action: str) -> AsyncIterator[Any]:
        """A pool connection for taskq's own statements (skips the reset round trip).

        Getting the connection is retried for up to ``connect_retry`` seconds
        (Postgres restarting, too many connections): nothing has been sent yet,
        so a retry cannot do anything twice. Errors once a statement is under
        way are not retried here.
        """
        pool = self.pool
        held = self._held
        if held is not None and not _usable(held):
            # Lost (e.g. a Postgres restart): hand it back to the pool, which
            # discards it; a healthy connection is adopted below instead.
            self._held = None
            with contextlib.suppress(Exception):
                await pool.release(held)
            held = None

        if held is not None and not self._held_busy:
            # Fast path: the connection this App keeps checked out. A pool
            # acquire and release costs about as much Python time as the
            # statement itself (measured: 250 µs of client CPU per enqueue
            # through the pool, 165 µs on a held connection).
            self._held_busy = True
            try:
                # Cancelled mid-statement, its protocol may still be busy: close
                # it; the next call hands it back to the pool and adopts another.
                with _statement_guard(held, action, close_on_cancel=True):
                    yield held
            finally:
                self._held_busy = False
            return
        with translate_errors(action):
            conn = await self._connect_retrying(pool)
        clean = False
        try:
            # The pool waits out a cancelled statement itself on release.
            with _statement_guard(conn, action, close_on_cancel=False):
                yield conn
            clean = True
        finally:
            if clean and self._held is None and self._pool is pool and _usable(conn):
                self._held = conn  # replaces a held connection that was lost
            else:
                if clean:
                    conn._taskq_mark_clean()
                await pool.release(conn)

    async def _connect_retrying(self, pool: asyncpg.Pool) -> Any:
        try:  # the common case, without building a retry loop
            return await pool.acquire()
        except _CONNECT_ERRORS:
            if not self.connect_retry:
                raise
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_delay(self.connect_retry),
            wait=tenacity.wait_exponential(multiplier=0.05, max=1.0)
            + tenacity.wait_random(0, 0.05),
            retry=tenacity.retry_if_exception_type(_CONNECT_ERRORS),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await pool.acquire()
        raise AssertionError("unreachable")  # pragma: no cover

    async def migrate(self, *, dry_run: bool = False) -> str | list[int]:
        """Apply pending migrations and return their versions; ``dry_run`` returns the SQL."""
        async with self._acquire("migrating") as conn:
            if dry_run:
                return await _migrations.pending_sql(conn, self.schema)
            return await _migrations.migrate(conn, self.schema)

    # -- notifications -----------------------------------------------------------

    async def _listener(self) -> Notifier:
        """The App's LISTEN connection, started on first use."""
        if self._notifier is None:
            dsn = self.listen_dsn or self.dsn or ""
            kwargs = self._connect_args(f"taskq-listener ({self.schema})")

            async def connect() -> asyncpg.Connection:
                return await asyncpg.connect(dsn, **kwargs)

            store = self._store
            self._notifier = Notifier(
                connect,
                [store.enqueued_channel, store.finished_channel, store.cancel_channel],
            )
            self._notifier.subscribe(store.finished_channel, self._on_finished)
            self._notifier.on_reconnect(self._wake_all_waiters)
        await self._notifier.start()
        return self._notifier

    def _on_finished(self, payload: str) -> None:
        if not self._waiters:
            return
        for part in payload.split(","):
            try:
                job_id = int(part)
            except ValueError:
                continue
            for fut in self._waiters.get(job_id, ()):
                if not fut.done():
                    fut.set_result(None)

    def _wake_all_waiters(self) -> None:
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_result(None)

    # -- enqueue -----------------------------------------------------------------

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
        check_task_name(task)
        if args is not None and not isinstance(args, Mapping):
            raise TypeError(
                f"args must be a mapping of keyword arguments, got {type(args).__name__}"
            )
        opts = EnqueueOptions.make(
            queue=queue,
            priority=priority,
            delay=delay,
            run_at=run_at,
            connection=connection,
            unique_key=unique_key,
            unique_for=unique_for,
            meta=meta,
        )
        local = self.tasks.get(task)
        stored = local.bind_arguments((), args or {}) if local else dict(args or {})
        return await self._enqueue_one(task, stored, opts, local)

    async def _task_defaults(self, name: str, task: Task[Any, Any] | None) -> tuple[str, int]:
        """(default queue, attempt budget) of a task, local or reported by a worker."""
        if task is not None:
            return task.queue, task.retry.attempts
        if name in self._known_tasks:
            return self._known_tasks[name]
        async with self._acquire("looking up a task") as conn:
            found = await self._store.lookup_task(conn, name)
        if found is None:
            async with self._acquire("looking up a task") as conn:
                reported = await self._store.task_names(conn)
            guess = suggest_task(name, [*self.tasks, *reported])
            hint = f" Did you mean {guess!r}?" if guess else ""
            raise UnknownTaskError(
                f"no task named {name!r} is registered on this App, and no worker using "
                f"schema {self.schema!r} has reported it.{hint} Task names are "
                "'module.function'; register it with @app.task, or start a worker that has "
                "it once, then enqueue again."
            )
        self._known_tasks[name] = found
        return found

    async def _enqueue_one(
        self,
        name: str,
        stored: dict[str, Any],
        opts: EnqueueOptions,
        task: Task[Any, Any] | None,
    ) -> Job:
        payload = encode(
            stored, what=f"arguments of task {name!r}", max_bytes=self.max_payload_bytes
        )
        if opts.unique_key is not None:
            job_id, created = await self._insert(name, payload, opts, task, many=False)
            return Job(self, job_id, duplicate=not created)
        job_id = await self._insert(name, payload, opts, task, many=False)
        return Job(self, job_id)

    async def _enqueue_many(
        self,
        name: str,
        stored: list[dict[str, Any]],
        opts: EnqueueOptions,
        task: Task[Any, Any] | None,
    ) -> list[Job]:
        if opts.unique_key is not None:
            raise ConfigurationError(
                "unique_key applies to one job; enqueue unique jobs one by one with enqueue()"
            )
        if not stored:
            return []
        payloads = encode_many(
            stored, what=f"arguments of task {name!r}", max_bytes=self.max_payload_bytes
        )
        ids = await self._insert(name, payloads, opts, task, many=True, count=len(stored))
        return [Job(self, i) for i in ids]

    async def _insert(
        self,
        name: str,
        args: str,
        opts: EnqueueOptions,
        task: Task[Any, Any] | None,
        *,
        many: bool,
        count: int = 1,
    ) -> Any:
        """Write encoded jobs, in the caller's transaction if it gave a connection.

        With ``many``, ``args`` is a JSON array of ``count`` jobs' arguments.
        """
        queue, attempts = await self._task_defaults(name, task)
        opts = with_defaults(opts, task, queue)
        insert: Callable[..., Any] = self._store.insert_jobs if many else self._store.insert_job
        action = "enqueueing jobs" if many else "enqueueing a job"
        kwargs: dict[str, Any] = dict(
            queue=opts.queue,
            task=name,
            args=args,
            priority=opts.priority,
            run_at=opts.run_at,
            delay=opts.delay,
            max_attempts=attempts,
        )
        if opts.unique_key is not None:
            insert = self._store.insert_unique_job
            kwargs.update(unique_key=opts.unique_key, unique_for=opts.unique_for)

        async def write(meta: Mapping[str, Any] | None) -> Any:
            if meta:
                kwargs["meta"] = encode(
                    meta, what=f"meta of task {name!r}", max_bytes=self.max_payload_bytes
                )
            if opts.connection is not None:
                with translate_errors(action):
                    return await insert(opts.connection, **kwargs)
            async with self._acquire(action) as conn:
                return await insert(conn, **kwargs)

        if not self._hooks.enqueue:
            return await write(opts.meta)
        ctx = EnqueueContext(
            task=name,
            queue=str(opts.queue),
            count=count,
            meta=dict(opts.meta or {}),
            in_transaction=opts.connection is not None,
        )

        result: Any = None

        async def call_next() -> Any:
            nonlocal result
            result = await write(ctx.meta)
            if isinstance(result, tuple):  # a unique job: (id, created)
                ctx.job_ids = [result[0]]
                ctx.duplicate = not result[1]
            else:
                ctx.job_ids = list(result) if many else [result]
            return result

        await self._hooks.run_enqueue(ctx, call_next)
        if not ctx.job_ids:
            raise TaskqError(
                f"an enqueue middleware did not call call_next(): no {name!r} job was written"
            )
        return result

    # -- jobs --------------------------------------------------------------------

    def get_job(self, job_id: int) -> Job:
        """A handle on an existing job, e.g. from an id sent in an earlier request."""
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise TypeError(f"job id must be an int, got {type(job_id).__name__}")
        return Job(self, job_id)

    def _check_id(self, job_id: int) -> None:
        # Ids are Postgres bigints: a larger one (e.g. from a URL) names no
        # job, and sending it would fail as a driver error instead.
        if not _is_bigint(job_id):
            raise JobNotFound(f"no job with id {job_id} in schema {self.schema!r}")

    async def _job_status(self, job_id: int) -> JobStatus:
        self._check_id(job_id)
        async with self._acquire("reading a job") as conn:
            row = await self._store.get_job(conn, job_id)
        if row is None:
            raise JobNotFound(f"no job with id {job_id} in schema {self.schema!r}")
        return status_from_row(row)

    async def _wait_finished(self, job_id: int, timeout: float | None) -> JobStatus:
        self._check_id(job_id)
        await self._listener()
        loop = asyncio.get_running_loop()
        futures = self._waiters.setdefault(job_id, [])
        fut: asyncio.Future[None] = loop.create_future()
        futures.append(fut)
        try:
            with anyio.fail_after(timeout):
                # Ask for the announcement, then read: a finish landing between
                # the two is seen by the read, one landing after is announced.
                async with self._acquire("waiting for a job") as conn:
                    await self._store.mark_awaited(conn, job_id)
                while True:
                    status = await self._job_status(job_id)
                    if status.state.finished:
                        return status
                    with anyio.move_on_after(RESULT_RECHECK_SECONDS):
                        await asyncio.shield(fut)
                    if fut.done():
                        futures.remove(fut)
                        fut = loop.create_future()
                        futures.append(fut)
        except TimeoutError:
            # A bare timeout leaves the user guessing; say what the job is
            # waiting for (a paused queue, no worker with its task...).
            raise TimeoutError(await self._why_not_finished(job_id, timeout)) from None
        finally:
            if fut in futures:
                futures.remove(fut)
            if not futures:
                self._waiters.pop(job_id, None)

    async def _why_not_finished(self, job_id: int, timeout: float | None) -> str:
        head = f"job {job_id} did not finish within {timeout:g} s"
        try:
            with anyio.fail_after(EXPLAIN_TIMEOUT_SECONDS):
                async with self._acquire("reading a job") as conn:
                    row = await self._store.explain_wait(conn, job_id, LIVE_WORKER_SECONDS)
        except Exception as exc:  # the explanation is a courtesy; the timeout stands
            return f"{head} (and its state could not be read: {exc})"
        if row is None:
            return f"{head}; it has finished since"
        task, queue = row["task"], row["queue"]
        head = f"{head} (task {task!r}, queue {queue!r})"
        if row["state"] == "running":
            return (
                f"{head}: it is running, attempt {row['attempts']} of {row['max_attempts']}, "
                f"on worker {row['worker_id']}"
            )
        reasons: list[str] = []
        if row["due_in"] > 0:
            waiting = f"it is queued, due in {row['due_in']:.1f} s"
            if row["error"]:
                error = decode(row["error"]) or {}
                waiting += (
                    f" (a retry: attempt {row['attempts']} failed with "
                    f"{error.get('type')}: {str(error.get('message'))[:200]})"
                )
            reasons.append(waiting)
        else:
            reasons.append("it is still queued")
        if row["paused"]:
            reasons.append(f"queue {queue!r} is paused (app.queue({queue!r}).resume())")
        known: list[str] = list(row["known"] or [])
        if row["serving"]:
            reasons.append(
                f"{row['serving']} live worker(s) can run it, so they are busy, limited "
                "or it is not due yet"
            )
        elif not row["live"]:
            reasons.append(
                f"no worker is running on schema {self.schema!r} "
                "(start one: python -m taskq worker module:app)"
            )
        elif task in known:
            reasons.append(f"the live workers that have task {task!r} do not serve queue {queue!r}")
        else:
            guess = suggest_task(task, known)
            hint = (
                f"; they have {guess!r}: was the job enqueued under another name?" if guess else ""
            )
            reasons.append(f"none of the {row['live']} live worker(s) has task {task!r}{hint}")
        return f"{head}: " + "; ".join(reasons)

    async def _cancel(self, job_id: int) -> bool:
        self._check_id(job_id)
        async with self._acquire("cancelling a job") as conn:
            for _ in range(3):  # the job may move between queued and running meanwhile
                if await self._store.cancel_queued(conn, job_id):
                    return True
                if await self._store.request_cancel(conn, job_id):
                    return True
                row = await self._store.get_job(conn, job_id)
                if row is None:
                    raise JobNotFound(f"no job with id {job_id} in schema {self.schema!r}")
                if JobState(row["state"]).finished:
                    log.info("job %s is already %s; nothing to cancel", job_id, row["state"])
                    return False
            return False

    async def _rerun(self, job_id: int) -> bool:
        if not _is_bigint(job_id):
            return False  # no such job to run again
        async with self._acquire("re-running a job") as conn:
            return await self._store.rerun(conn, job_id)

    async def queue_counts(self) -> list[tuple[str, str, int]]:
        """(queue, state, count) rows over live jobs and history."""
        async with self._acquire("counting jobs") as conn:
            return await self._store.counts(conn)

    # -- workers -------------------------------------------------------------------

    def _worker(self, **options: Any) -> Worker:
        return Worker(self, WorkerConfig.make(**options))

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
            handle_signals: stop gracefully on SIGTERM/SIGINT (a second one forces).
            **options: other :class:`taskq.WorkerConfig` settings
                (``poll_interval``, ``shutdown_timeout``, ``lease_seconds``...).
        """
        worker = self._worker(concurrency=concurrency, queues=queues, **options)
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
        worker = self._worker(concurrency=concurrency, queues=queues, **options)
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
        worker = self._worker(concurrency=concurrency, queues=queues, **options)
        async with self._opened():
            return await worker.run(until_empty=True, handle_signals=False)

    @contextlib.asynccontextmanager
    async def _opened(self) -> AsyncIterator[None]:
        await self.open()
        try:
            yield
        finally:
            await self.close()
