"""The connection pool as taskq uses it: connections, the pool user code gets, asyncpg's log.

- :class:`PoolConnection`, with the pool's ``init``/``reset`` hooks
  (:func:`init_connection`, :func:`reset_connection`): skips the reset round
  trip after taskq's own statements, and knows since when it is idle.
- :class:`CheckedPool`, what ``app.pool`` is: asyncpg's pool, whose
  ``acquire()`` keeps trying while Postgres restarts and hands out only
  connections that answer.
- :func:`quiet_pool_log`: asyncpg's traceback for each failed attempt to
  reconnect the pool's minimum as one taskq WARNING line per outage.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Generator
from typing import Any

import asyncpg
import tenacity

log = logging.getLogger("taskq")

#: A connection idle in the pool for longer than this is checked with a round
#: trip before user code gets it (one used more recently is checked only for
#: what the server sent meanwhile, see _quiet): a Postgres restart or a proxy
#: may have ended it, and asyncpg learns that only from the next statement,
#: which then fails (or, if the server's goodbye was read but the loop has
#: not yet seen the socket close, raises ``InternalClientError: cannot switch
#: to state ...``). pgxpool pings connections idle for 1 s, HikariCP 0.5 s.
CHECK_IDLE_SECONDS = 0.5
#: After a broken connection was seen, every connection is checked this long.
CHECK_AFTER_TROUBLE_SECONDS = 30.0
#: A check without an answer in this time counts as a broken connection.
CHECK_TIMEOUT_SECONDS = 5.0

#: Errors that mean "no connection could be had": nothing was sent, so trying
#: again cannot do anything twice.
CONNECT_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.PostgresConnectionError,
)


class PoolConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pool connection that can skip the reset round trip when taskq used it.

    asyncpg resets every connection on release (UNLISTEN, RESET ALL, ...), one
    extra round trip that costs about a third of an enqueue. taskq's own
    statements leave no session state behind, so it marks the connections it
    used as clean; connections handed to user code are reset as usual.
    """

    taskq_clean = False
    #: ``time.monotonic()`` when the connection was made or last went back to the pool.
    taskq_idle_since = 0.0

    def taskq_mark_clean(self) -> None:
        self.taskq_clean = True


async def init_connection(conn: PoolConnection) -> None:
    """The pool's ``init``: a new connection, so Postgres is reachable (again)."""
    conn.taskq_idle_since = time.monotonic()
    POOL_LOG.reconnected()


async def reset_connection(conn: PoolConnection) -> None:
    """The pool's ``reset``, run when a connection goes back to the pool."""
    conn.taskq_idle_since = time.monotonic()
    if conn.taskq_clean:
        conn.taskq_clean = False
        return
    query = conn.get_reset_query()
    if query:
        await conn.execute(query)


async def acquire_retrying(pool: asyncpg.Pool, retry: float, timeout: float | None = None) -> Any:
    """``pool.acquire()``, tried again for up to ``retry`` seconds on connection errors."""
    try:  # the common case, without building a retry loop
        return await pool.acquire(timeout=timeout)
    except CONNECT_ERRORS:
        if not retry:
            raise
    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_delay(retry),
        wait=tenacity.wait_exponential(multiplier=0.05, max=1.0) + tenacity.wait_random(0, 0.05),
        retry=tenacity.retry_if_exception_type(CONNECT_ERRORS),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await pool.acquire(timeout=timeout)
    raise AssertionError("unreachable")  # pragma: no cover


class CheckedPool:
    """``app.pool``: asyncpg's pool, handing user code only connections that answer.

    ``acquire()`` keeps trying for up to ``connect_retry`` seconds while no
    connection can be had (Postgres restarting, too many connections). A
    connection on whose socket the server left something (see _quiet), that
    sat idle for more than CHECK_IDLE_SECONDS, or any connection during
    CHECK_AFTER_TROUBLE_SECONDS after a broken one was seen, answers a
    ``SELECT 1`` first; one that does not is closed and another taken. The
    rest of asyncpg's ``Pool`` (``release``, ``close``, ``get_size``, ...) is
    passed through, and ``execute``/``fetch``/... run on checked connections.
    """

    def __init__(self, pool: asyncpg.Pool, *, connect_retry: float) -> None:
        self.raw = pool  # asyncpg's own
        self.connect_retry = connect_retry
        self._check_all_until = 0.0

    def __repr__(self) -> str:
        return f"<taskq.CheckedPool of {self.raw!r}>"

    def __getattr__(self, name: str) -> Any:
        if name == "raw":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.raw, name)

    def note_trouble(self) -> None:
        """A connection was found broken: check every connection handed out for a while."""
        self._check_all_until = time.monotonic() + CHECK_AFTER_TROUBLE_SECONDS

    def acquire(self, *, timeout: float | None = None) -> _Acquire:
        """A checked connection: ``async with pool.acquire() as conn`` or ``await``."""
        return _Acquire(self, timeout)

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        await self.raw.release(connection, timeout=timeout)

    async def _acquire_checked(self, timeout: float | None) -> Any:
        failed: BaseException | None = None
        # Every connection of the pool may be broken: try one more than it holds,
        # the last of them new.
        for _ in range(self.raw.get_max_size() + 1):
            conn = await acquire_retrying(self.raw, self.connect_retry, timeout)
            now = time.monotonic()
            if (
                now >= self._check_all_until
                and now - conn.taskq_idle_since <= CHECK_IDLE_SECONDS
                and _quiet(conn)
            ):
                return conn
            try:
                await conn.execute("SELECT 1", timeout=CHECK_TIMEOUT_SECONDS)
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    conn.terminate()
                    await self.raw.release(conn)
                if not isinstance(exc, Exception):
                    raise
                log.debug("a pool connection did not answer (%r); taking another", exc)
                self.note_trouble()
                failed = exc
                continue
            return conn
        assert failed is not None
        raise failed

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        async with self.acquire() as conn:
            return str(await conn.execute(query, *args, timeout=timeout))

    async def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> None:
        async with self.acquire() as conn:
            await conn.executemany(command, args, timeout=timeout)

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> list[Any]:
        async with self.acquire() as conn:
            return list(await conn.fetch(query, *args, **kwargs))

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args, **kwargs)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args, **kwargs)


def _quiet(conn: Any) -> bool:
    """Whether nothing waits on an idle connection's socket: no data from the server, no end.

    A healthy idle connection receives nothing. Data (the server's goodbye,
    "terminating connection due to administrator command") or the end of the
    stream mean that the server ended it, whether or not the event loop has
    read them yet (it has not, when it was busy during a restart). A
    non-blocking peek, no round trip; go-sql-driver/mysql checks idle
    connections the same way. ``False`` when it cannot tell.
    """
    try:
        fd = conn._transport.get_extra_info("socket").fileno()
        sock = socket.socket(fileno=fd)  # the same descriptor: detached below, never closed
    except Exception:
        return False
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True  # nothing to read: quiet
    except Exception:
        return False
    finally:
        sock.detach()
    return False  # data, or b"": the server closed it


class _Acquire:
    """What ``CheckedPool.acquire()`` returns: an async context manager, or awaitable."""

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: CheckedPool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: Any = None

    def __await__(self) -> Generator[Any, None, Any]:
        return self._pool._acquire_checked(self._timeout).__await__()

    async def __aenter__(self) -> Any:
        self._conn = await self._pool._acquire_checked(self._timeout)
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        conn, self._conn = self._conn, None
        await self._pool.release(conn)


#: The message asyncpg (0.32) logs, with a traceback, each time it fails to
#: reconnect the pool's minimum of connections: every 1, 2, 4 ... s while
#: Postgres is down, in every pool.
_FLOOR_MESSAGE = "Failed to restore the pool connection floor"


class _PoolLog(logging.Filter):
    """Turns asyncpg's floor-restore tracebacks into one taskq WARNING per outage.

    The outage ends when any pool makes a new connection (``init_connection``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.reported = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_FLOOR_MESSAGE):
            return True
        if not self.reported:
            self.reported = True
            error = record.exc_info[1] if record.exc_info else None
            log.warning(
                "lost the pool's connections to Postgres (%r); reconnecting in the background "
                "(said once until a connection succeeds)",
                error,
            )
        return False

    def reconnected(self) -> None:
        if self.reported:
            self.reported = False
            log.info("the pool reconnected to Postgres")


POOL_LOG = _PoolLog()


def quiet_pool_log() -> None:
    """Install the filter on asyncpg's pool logger (once per process)."""
    logger = logging.getLogger("asyncpg.pool")
    if POOL_LOG not in logger.filters:
        logger.addFilter(POOL_LOG)
