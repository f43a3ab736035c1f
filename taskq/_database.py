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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import anyio
import asyncpg
import tenacity

from ._errors import ConfigurationError, DatabaseError, TaskqError
from ._notifier import Notifier

log = logging.getLogger("taskq")

#: Pool size: enough for a worker's claim, acknowledgement and heartbeat
#: connections plus a busy web app's enqueues; raise it for many producers.
DEFAULT_POOL_MAX_SIZE = 10
#: Seconds an operation keeps trying to get a connection before it fails:
#: long enough to ride out a Postgres restart or failover blip, short enough
#: that a web request does not hang on a dead database.
DEFAULT_CONNECT_RETRY_SECONDS = 5.0
#: Seconds to wait for a new connection before giving up.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Environment variable read when no DSN is given.
DSN_ENV = "TASKQ_DSN"
#: Environment variable read when ``App(listen_dsn=None)``.
LISTEN_DSN_ENV = "TASKQ_LISTEN_DSN"


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

        If ``prepare`` fails the pool is closed again and the error raised.
        """
        self.dsn = await self.resolve_dsn()
        with translate_errors("connecting to Postgres"):
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.pool_min_size,
                max_size=self.pool_max_size,
                connection_class=_Connection,
                reset=_reset,
                **self.connect_args(f"taskq ({self.name})"),
            )
        try:
            async with pool.acquire() as conn:
                await prepare(conn)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self._held = await pool.acquire()

    async def close(self) -> None:
        """Stop the LISTEN connection and close the pool."""
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            await notifier.stop()
        pool, self._pool = self._pool, None
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
    def pool(self) -> asyncpg.Pool:
        """The asyncpg pool; raises ConfigurationError when not open."""
        if self._pool is None:
            raise ConfigurationError("the App is not open: use `async with app:` first")
        return self._pool

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
    @contextlib.asynccontextmanager
    async def acquire(self, action: str) -> AsyncIterator[Any]:
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
