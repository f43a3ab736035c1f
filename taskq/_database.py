"""The database: where it is, the connection pool, and errors in taskq's terms.

Everything in taskq that talks to Postgres receives a :class:`Database` and
takes its connections from :meth:`Database.acquire`; nothing reaches a
connection through the App. Driver errors leave this module as
:class:`taskq.DatabaseError`, so users never catch ``asyncpg.*``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import asyncpg
import tenacity

from ._errors import ConfigurationError, DatabaseError, TaskqError
from ._notifier import Notifier
from ._pool import (
    CheckedPool,
    PoolConnection,
    acquire_retrying,
    init_connection,
    quiet_pool_log,
    reset_connection,
)

log = logging.getLogger("taskq")

_T = TypeVar("_T")

#: Pool size: enough for a worker's claim, acknowledgement and heartbeat
#: connections plus a busy web app's enqueues; raise it for many producers.
DEFAULT_POOL_MAX_SIZE = 10
#: Seconds an operation keeps trying to get a connection before it fails:
#: long enough to ride out a Postgres restart or failover blip, short enough
#: that a web request does not hang on a dead database.
DEFAULT_CONNECT_RETRY_SECONDS = 5.0
#: Seconds to wait for a new connection before giving up.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Longest pause between two attempts to open the App (pool and schema check)
#: while Postgres cannot be reached; pauses grow from 0.1 s, with jitter.
OPEN_RETRY_MAX_WAIT = 2.0
#: Environment variable read when no DSN is given.
DSN_ENV = "TASKQ_DSN"
#: Environment variable read when ``App(listen_dsn=None)``.
LISTEN_DSN_ENV = "TASKQ_LISTEN_DSN"


# Errors while opening (connecting, then checking or migrating the schema in
# one transaction) after which opening again may work: Postgres is not
# reachable, starting up or shutting down, full, or ended the session. Not:
# bad credentials, a missing database, an invalid DSN, a schema error.
_OPEN_AGAIN = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,  # 57P03: starting up, shutting down
    asyncpg.AdminShutdownError,  # 57P01
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.TooManyConnectionsError,
    asyncpg.PostgresConnectionError,
    asyncpg.InternalClientError,
    asyncpg.InterfaceError,  # "connection is closed", but see _NOT_AGAIN
)
# ssl.SSLError is an OSError, but a refused certificate stays refused; a bad
# DSN is an InterfaceError; taskq's own errors (the schema) are for a human.
_NOT_AGAIN = (ssl.SSLError, asyncpg.ClientConfigurationError, TaskqError)


def _may_open_again(exc: BaseException) -> bool:
    """Whether an error of ``open()`` or ``run_retrying()`` (or the driver error it wraps) is
    worth another try."""
    while isinstance(exc, DatabaseError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return isinstance(exc, _OPEN_AGAIN) and not isinstance(exc, _NOT_AGAIN)


# Errors after which a connection cannot be trusted. InternalClientError is
# what asyncpg raises when the server ends a session in the middle of an
# operation (a Postgres restart); such a connection must not go back to the pool.
_BROKEN_CONNECTION = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
)


def commit_outcome_unknown(exc: BaseException) -> bool:
    """Whether an error raised by a COMMIT leaves unknown whether it committed.

    Only Postgres refusing the COMMIT (a deferred constraint, a serialization
    failure) says that it rolled back. A connection that broke under way may
    have lost the reply to a commit that happened; and a backend terminated
    during COMMIT (an operator, a shutdown, a cancelled wait for a
    synchronous standby) may report that after committing locally.
    """
    if not isinstance(exc, asyncpg.PostgresError):
        return True
    return isinstance(
        exc, asyncpg.PostgresConnectionError | asyncpg.exceptions.OperatorInterventionError
    )


def connection_lost(exc: BaseException) -> bool:
    """Whether a DatabaseError came from a lost connection or a server going down.

    Such a statement is worth sending again on another connection once the
    server is back, if it is idempotent; any other error is not.
    """
    return isinstance(
        exc.__cause__, (*_BROKEN_CONNECTION, asyncpg.exceptions.OperatorInterventionError)
    )


@contextlib.contextmanager
def _statement_guard(
    conn: Any, action: str, *, close_on_cancel: bool, broken: Callable[[], None]
) -> Iterator[None]:
    """Translate errors of statements under way; close a connection that broke."""
    with translate_errors(action, in_flight=True):
        try:
            yield
        except _BROKEN_CONNECTION:
            terminate_quietly(conn)
            broken()
            raise
        except BaseException as exc:
            if close_on_cancel and not isinstance(exc, Exception):
                terminate_quietly(conn)
            raise


def terminate_quietly(conn: Any) -> None:
    """Close a connection at once, without a word to the server; no error if it is gone."""
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


class Database:
    """One Postgres database: the DSN, the pool, and the LISTEN connection.

    Args:
        dsn: the connection string; ``None`` reads ``$TASKQ_DSN``, and if that
            is unset too an embedded Postgres is started (or reused).
        listen_dsn: where the LISTEN connection goes (``None``: ``$TASKQ_LISTEN_DSN``,
            else the pool's DSN).
        name: shown in ``application_name`` (the App passes its schema).
        listen_channels: the channels the LISTEN connection subscribes to.
    """

    def __init__(
        self,
        dsn: str | None,
        *,
        listen_dsn: str | None,
        name: str,
        listen_channels: Sequence[str],
        pool_min_size: int,
        pool_max_size: int,
        connect_kwargs: Mapping[str, Any] | None,
        connect_retry: float,
    ) -> None:
        for what, value in (("dsn", dsn), ("listen_dsn", listen_dsn)):
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(
                    f"{what} must be a string or None, got {type(value).__name__}"
                )
        if not 0 <= pool_min_size <= pool_max_size or pool_max_size < 1:
            raise ConfigurationError(
                f"pool sizes must satisfy 0 <= pool_min_size ({pool_min_size}) <= "
                f"pool_max_size ({pool_max_size}), pool_max_size >= 1"
            )
        if not isinstance(connect_retry, int | float) or connect_retry < 0:
            raise ConfigurationError("connect_retry must be a number of seconds >= 0")
        #: The DSN as given (``None``: from the environment or embedded).
        self.dsn_arg = dsn
        self.listen_dsn = listen_dsn or os.environ.get(LISTEN_DSN_ENV) or None
        #: The DSN in use, once open.
        self.dsn: str | None = None
        #: The embedded Postgres server, when taskq started or reused one.
        self.embedded: Any = None
        self.name = name
        self.listen_channels = list(listen_channels)
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.connect_kwargs = dict(connect_kwargs or {})
        self.connect_retry = float(connect_retry)
        self._pool: asyncpg.Pool | None = None
        self._checked: CheckedPool | None = None  # app.pool: the pool user code gets
        # One pool connection kept out for taskq's own short statements while
        # it is free (see acquire); the pool serves everything else.
        self._held: Any = None
        self._held_busy = False
        self._notifier: Notifier | None = None

    def moved(
        self, dsn: str | None, *, listen_dsn: str | None, name: str, listen_channels: Sequence[str]
    ) -> Database:
        """A closed Database elsewhere, with this one's pool and connection settings."""
        return Database(
            dsn,
            listen_dsn=listen_dsn,
            name=name,
            listen_channels=listen_channels,
            pool_min_size=self.pool_min_size,
            pool_max_size=self.pool_max_size,
            connect_kwargs=self.connect_kwargs,
            connect_retry=self.connect_retry,
        )

    # -- lifecycle -------------------------------------------------------------

    async def open(self, prepare: Callable[[Any], Awaitable[object]]) -> None:
        """Resolve the DSN, open the pool and run ``prepare(conn)`` (migrations) first.

        While Postgres cannot be reached (down, restarting, full) this is
        tried again with backoff for up to ``connect_retry`` seconds, so that
        processes started with their database come up by themselves. Other
        errors (credentials, a missing database, a schema error) are raised at
        once. If ``prepare`` fails the pool is closed again.
        """
        self.dsn = await self.resolve_dsn()
        quiet_pool_log()
        started = time.monotonic()
        tries = 0

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.log(
                logging.WARNING if state.attempt_number == 1 else logging.DEBUG,
                "cannot open taskq's connection to Postgres yet (%s); trying again for up to %gs",
                error,
                self.connect_retry,
            )

        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_delay(self.connect_retry),
            wait=tenacity.wait_exponential(multiplier=0.1, max=OPEN_RETRY_MAX_WAIT)
            + tenacity.wait_random(0, 0.1),
            retry=tenacity.retry_if_exception(_may_open_again),
            before_sleep=before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                tries += 1
                pool, held = await self._open_pool(prepare)
        if tries > 1:
            log.info("connected to Postgres after %.1fs", time.monotonic() - started)
        self._pool = pool
        self._checked = CheckedPool(pool, connect_retry=self.connect_retry)
        self._held = held

    async def _open_pool(self, prepare: Callable[[Any], Awaitable[object]]) -> tuple[Any, Any]:
        """One try: the pool, ``prepare`` on one of its connections, the held connection."""
        with translate_errors("connecting to Postgres"):
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.pool_min_size,
                max_size=self.pool_max_size,
                connection_class=PoolConnection,
                init=init_connection,
                reset=reset_connection,
                **self.connect_args(f"taskq ({self.name})"),
            )
        try:
            async with pool.acquire() as conn:
                await prepare(conn)
            with translate_errors("connecting to Postgres"):
                held = await pool.acquire()
        except BaseException:
            pool.terminate()  # nothing of ours is under way on it
            raise
        return pool, held

    async def close(self) -> None:
        """Stop the LISTEN connection and close the pool."""
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            await notifier.stop()
        pool, self._pool = self._pool, None
        self._checked = None
        if pool is None:
            return
        held, self._held = self._held, None
        if held is not None:
            with contextlib.suppress(Exception):
                await pool.release(held)
        try:
            with anyio.fail_after(10):
                await pool.close()
        except TimeoutError:
            pool.terminate()

    @property
    def pool(self) -> CheckedPool:
        """The pool for user code (see CheckedPool); raises ConfigurationError when not open."""
        if self._checked is None:
            raise ConfigurationError("the App is not open: use `async with app:` first")
        return self._checked

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    def connect_args(self, application_name: str) -> dict[str, Any]:
        """Keyword arguments for ``asyncpg.connect``/``create_pool`` of a connection."""
        args = dict(self.connect_kwargs)
        settings = dict(args.pop("server_settings", None) or {})
        settings.setdefault("application_name", application_name)
        args["server_settings"] = settings
        # asyncpg waits 60 s for a connection by default; a dead database
        # should surface as an error sooner than that.
        args.setdefault("timeout", DEFAULT_CONNECT_TIMEOUT)
        return args

    async def resolve_dsn(self) -> str:
        """The DSN given, else ``$TASKQ_DSN``, else an embedded Postgres (started if needed)."""
        if self.dsn_arg:
            return self.dsn_arg
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

    # -- connections -------------------------------------------------------------
    async def run_again_if_lost(self, action: str, statement: Callable[[Any], Awaitable[_T]]) -> _T:
        """Run an idempotent ``statement(conn)``; after a lost connection (a restart,
        a terminated backend) run it again, for up to ``connect_retry`` seconds."""
        deadline = time.monotonic() + self.connect_retry
        backoff = 0.1
        while True:
            try:
                async with self.acquire(action) as conn:
                    return await statement(conn)
            except DatabaseError as exc:
                if not connection_lost(exc) or time.monotonic() + backoff > deadline:
                    raise
                log.warning("%s; trying again in %.1fs", exc, backoff)
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    @contextlib.asynccontextmanager
    async def acquire(self, action: str) -> AsyncIterator[Any]:
        """A pool connection for taskq's own statements (skips the reset round trip).

        Getting the connection is retried for up to ``connect_retry`` seconds
        (Postgres restarting, too many connections): nothing has been sent yet,
        so a retry cannot do anything twice. Errors once a statement is under
        way are not retried here.
        """
        checked = self.pool
        pool = checked.raw
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
                with _statement_guard(
                    held, action, close_on_cancel=True, broken=checked.note_trouble
                ):
                    yield held
            finally:
                self._held_busy = False
            return
        with translate_errors(action):
            conn = await acquire_retrying(pool, self.connect_retry)
        clean = False
        try:
            # The pool waits out a cancelled statement itself on release.
            with _statement_guard(conn, action, close_on_cancel=False, broken=checked.note_trouble):
                yield conn
            clean = True
        finally:
            if clean and self._held is None and self._pool is pool and _usable(conn):
                self._held = conn  # replaces a held connection that was lost
            else:
                if clean:
                    conn.taskq_mark_clean()
                await pool.release(conn)

    async def run_retrying(self, action: str, statements: Callable[[Any], Awaitable[_T]]) -> _T:
        """``statements(conn)`` on a connection of :meth:`acquire`, tried again while
        Postgres is briefly away.

        Only for statements that may run twice (reads, idempotent writes): a
        try whose connection broke under way may have taken effect. After an
        error worth another try (Postgres unreachable, restarting, the
        connection lost) it is tried again on another connection, with
        backoff, for up to ``connect_retry`` seconds; other errors are raised
        at once.
        """
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_delay(self.connect_retry),
            wait=tenacity.wait_exponential(multiplier=0.05, max=1.0)
            + tenacity.wait_random(0, 0.05),
            retry=tenacity.retry_if_exception(_may_open_again),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                async with self.acquire(action) as conn:
                    return await statements(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    async def listener(self) -> Notifier:
        """The one LISTEN connection of this database, started on first use.

        Subscribe to its channels with ``subscribe``; after each reconnect
        (notifications sent meanwhile are lost) its ``on_reconnect`` callbacks run.
        """
        if self._notifier is None:
            dsn = self.listen_dsn or self.dsn or ""
            kwargs = self.connect_args(f"taskq-listener ({self.name})")

            async def connect() -> asyncpg.Connection:
                return await asyncpg.connect(dsn, **kwargs)

            self._notifier = Notifier(connect, self.listen_channels)
        await self._notifier.start()
        return self._notifier
