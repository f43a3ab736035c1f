"""The notifier: one dedicated LISTEN connection per App, shared by its workers and waiters.

Postgres delivers NOTIFY only after the sending transaction commits, so a wake-up
always refers to a job that exists. Notifications can still be missed (the
connection drops, PgBouncer in transaction mode swallows them), which is why
every consumer also polls slowly and re-checks after each reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import tenacity

log = logging.getLogger("taskq.notifier")

#: How often the LISTEN connection is probed with a round trip. A connection
#: that a firewall dropped silently otherwise looks alive forever.
DEFAULT_HEALTH_CHECK_SECONDS = 10.0
#: Longest pause between reconnect attempts (backoff starts at 0.1 s, with jitter).
DEFAULT_MAX_RECONNECT_WAIT = 5.0

_CONNECT_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)

Connect = Callable[[], Awaitable[asyncpg.Connection]]
Handler = Callable[[str], None]


def _log_retry(state: tenacity.RetryCallState) -> None:
    """One WARNING per outage, then DEBUG: a Postgres restart is not a line a second."""
    error = state.outcome.exception() if state.outcome else "?"
    if state.attempt_number == 1:
        log.warning("taskq notifier cannot connect (%s); retrying until it can", error)
    else:
        wait = state.upcoming_sleep
        log.debug("taskq notifier cannot connect (%s); retrying in %.1fs", error, wait)


class Notifier:
    """Keeps a LISTEN connection open and hands each payload to the channel's handlers.

    Handlers run synchronously in the event loop and must be cheap (set an event,
    resolve a future). ``on_reconnect`` handlers run after every reconnect, when
    notifications may have been missed.
    """

    def __init__(self, connect: Connect, channels: list[str]) -> None:
        self._connect = connect
        self._handlers: dict[str, list[Handler]] = {c: [] for c in channels}
        self._reconnect_handlers: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self.connected = False
        self.reconnects = 0

    def subscribe(self, channel: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(payload)`` for each notification; returns an unsubscribe function."""
        handlers = self._handlers[channel]
        handlers.append(handler)
        return lambda: handlers.remove(handler) if handler in handlers else None

    def on_reconnect(self, handler: Callable[[], None]) -> Callable[[], None]:
        self._reconnect_handlers.append(handler)
        handlers = self._reconnect_handlers
        return lambda: handlers.remove(handler) if handler in handlers else None

    async def start(self, wait: float = 5.0) -> None:
        """Start listening (idempotent); wait up to ``wait`` seconds for the first connection."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="taskq-notifier")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), wait)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        self.connected = False
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2)
            except (Exception, asyncio.CancelledError):
                conn.terminate()

    def _dispatch(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        for handler in list(self._handlers.get(channel, ())):
            try:
                handler(payload)
            except Exception:
                log.exception("taskq notification handler failed on %s", channel)

    def _on_termination(self, _conn: Any) -> None:
        self._lost.set()

    async def _listen(self) -> asyncpg.Connection:
        conn = await self._connect()
        try:
            conn.add_termination_listener(self._on_termination)
            for channel in self._handlers:
                await conn.add_listener(channel, self._dispatch)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _connect_retrying(self) -> asyncpg.Connection:
        """Connect and LISTEN, retrying with jittered exponential backoff for ever."""
        retrying = tenacity.AsyncRetrying(
            wait=tenacity.wait_exponential(multiplier=0.1, max=DEFAULT_MAX_RECONNECT_WAIT)
            + tenacity.wait_random(0, 0.5),
            retry=tenacity.retry_if_exception_type(_CONNECT_ERRORS),
            before_sleep=_log_retry,
        )
        async for attempt in retrying:
            with attempt:
                return await self._listen()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _run(self) -> None:
        first = True
        lost_at = 0.0
        while True:
            conn = await self._connect_retrying()
            self._conn = conn
            self.connected = True
            self._lost.clear()
            self._ready.set()
            if not first:
                self.reconnects += 1
                log.info("taskq notifier reconnected after %.1fs", time.monotonic() - lost_at)
            first = False
            # Anything sent before this LISTEN took effect is lost (including,
            # on a slow first connect, what consumers subscribed to before
            # start() gave up waiting): let them re-check.
            for handler in list(self._reconnect_handlers):
                handler()
            await self._watch(conn)
            lost_at = time.monotonic()
            await self._close()

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """Return when the connection is lost or stops answering."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), DEFAULT_HEALTH_CHECK_SECONDS)
                return
            except TimeoutError:
                pass
            try:
                await asyncio.wait_for(conn.execute("SELECT 1"), DEFAULT_HEALTH_CHECK_SECONDS)
            except _CONNECT_ERRORS as exc:
                log.warning("taskq notifier connection failed its health check: %s", exc)
                return
