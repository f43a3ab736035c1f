"""A write-back that committed but whose reply was lost is not a lost lease.

The worker's connection goes through a small TCP relay to the test Postgres.
Armed with the text of a statement, the relay lets the next execution of that
statement through, swallows everything the server answers up to and including
its ReadyForQuery (by then the implicit transaction has committed), and then
cuts the connection: exactly what a network failure between the commit and the
reply does. The worker sends the outcome again on a new connection, finds its
lease gone, and must recognise the outcome as its own committed one: counted
as succeeded, not as lost, and no "lease lost" warning.

Outcomes are written back both by the claim (which carries them into
finish()) and by the write-back loop (finish() alone); each path has a test.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import anyio
import pytest

import taskq

pytestmark = pytest.mark.anyio

#: The write-back loop's statement.
FINISH_ALONE = "finish($1, $2, $3, $4, $5, $6)"


@dataclass(eq=False)
class _Link:
    """One client connection through the relay: its prepared statements, and
    whether the server's replies are being swallowed."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    statements: dict[bytes, str] = field(default_factory=dict)
    swallowing: bool = False


class LossyRelay:
    """A TCP relay to Postgres that, on command, loses the reply to one statement.

    It reads the frontend/backend protocol message by message (clients must
    not ask for SSL: ``sslmode=disable``), so it knows which prepared
    statement a Bind executes.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._server: asyncio.Server | None = None
        self._armed: str | None = None
        self._drop_request = False
        self._cut_server_side = True
        #: Set once a reply was swallowed and its connection cut.
        self.cut = asyncio.Event()
        self.swallowed: list[bytes] = []  # message types of the reply that was lost
        self._links: set[_Link] = set()

    async def __aenter__(self) -> LossyRelay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for link in list(self._links):
            link.client.transport.abort()
            link.server.transport.abort()

    @property
    def dsn(self) -> str:
        """The test database's DSN, with the relay as host, without SSL."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self._dsn)
        user = f"{parts.username}@" if parts.username else ""
        if parts.password:
            user = f"{parts.username}:{quote(unquote(parts.password), safe='')}@"
        return f"postgresql://{user}127.0.0.1:{port}{parts.path}?sslmode=disable"

    def arm(self, statement_text: str, *, request: bool = False, server_side: bool = True) -> None:
        """Lose the reply to the next execution of a statement containing this text.

        ``request``: lose the statement itself instead: the server never gets
        it, and the client's connection is cut at once; ``server_side=False``
        leaves the server's end open, as when the server does not notice a
        client gone (its session waits for the statement for ever).
        """
        self.cut.clear()
        self._armed = statement_text
        self._drop_request = request
        self._cut_server_side = server_side

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        parts = urlsplit(self._dsn)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        host = query.get("host") or parts.hostname or "localhost"
        port = int(query.get("port") or parts.port or 5432)
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self._connect_upstream()
        link = _Link(writer, up_writer)
        self._links.add(link)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._client_to_server, reader, link)
                tg.start_soon(self._server_to_client, up_reader, link)
        except (OSError, asyncio.IncompleteReadError, ExceptionGroup):
            pass
        finally:
            self._links.discard(link)
            writer.transport.abort()
            up_writer.transport.abort()

    async def _client_to_server(self, reader: asyncio.StreamReader, link: _Link) -> None:
        # The startup message has no type byte: a length, then the rest.
        head = await reader.readexactly(4)
        link.server.write(head + await reader.readexactly(struct.unpack("!i", head)[0] - 4))
        while True:
            kind = await reader.readexactly(1)
            head = await reader.readexactly(4)
            body = await reader.readexactly(struct.unpack("!i", head)[0] - 4)
            text = None
            if kind == b"P":  # Parse: statement name, query text, ...
                name, rest = body.split(b"\0", 1)
                link.statements[name] = rest.split(b"\0", 1)[0].decode()
            elif kind == b"B":  # Bind: portal name, statement name, ...
                text = link.statements.get(body.split(b"\0", 2)[1], "")
            elif kind == b"Q":  # a simple query
                text = body.rstrip(b"\0").decode()
            if text is not None and self._armed is not None and self._armed in text:
                self._armed = None
                if self._drop_request:
                    link.client.transport.abort()
                    if self._cut_server_side:
                        link.server.transport.abort()
                    link.swallowing = True  # nothing more reaches the client
                    self.cut.set()
                    return
                link.swallowing = True  # from here on, the server's answer is lost
            link.server.write(kind + head + body)
            await link.server.drain()

    async def _server_to_client(self, reader: asyncio.StreamReader, link: _Link) -> None:
        while True:
            kind = await reader.readexactly(1)
            head = await reader.readexactly(4)
            body = await reader.readexactly(struct.unpack("!i", head)[0] - 4)
            if not link.swallowing:
                link.client.write(kind + head + body)
                await link.client.drain()
                continue
            self.swallowed.append(kind)
            if kind == b"Z":
                # ReadyForQuery: the statement's transaction has committed.
                # The client never hears of it; its connection just breaks.
                link.client.transport.abort()
                link.server.transport.abort()
                self.cut.set()
                return


@pytest.fixture
async def relay(pg_dsn: str) -> AsyncIterator[LossyRelay]:
    async with LossyRelay(pg_dsn) as r:
        yield r


def make_app(relay: LossyRelay, pg_dsn: str, schema: str) -> tuple[taskq.App, dict[str, Any]]:
    """A worker's App whose pool goes through the relay (LISTEN goes straight to Postgres)."""
    app = taskq.App(relay.dsn, schema=schema, listen_dsn=pg_dsn)
    seen: dict[str, Any] = {"runs": 0, "hook": [], "go": anyio.Event(), "started": anyio.Event()}

    @app.task(name="lost_reply.work")
    async def work(n: int) -> int:
        seen["runs"] += 1
        seen["started"].set()
        await seen["go"].wait()
        return n * 2

    @app.after_job
    async def record(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        seen["hook"].append(outcome.kind)

    return app, seen


def assert_reported_as_succeeded(
    stats: taskq.WorkerStats, seen: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    messages = [r.getMessage() for r in caplog.records if r.name == "taskq.worker"]
    assert not [m for m in messages if "lease lost" in m], messages
    assert [m for m in messages if "reply to a write-back was lost" in m], messages
    assert (stats.succeeded, stats.lost) == (1, 0)
    assert seen["hook"] == ["succeeded"]
    assert seen["runs"] == 1


async def assert_finished_once(app: taskq.App, job: taskq.Job) -> None:
    status = await job.status()
    assert (status.state, status.attempts, status.result) == (taskq.JobState.SUCCEEDED, 1, 42)
    async with app.pool.acquire() as conn:
        rows = await conn.fetchval(
            f'SELECT count(*) FROM "{app.schema}".history WHERE id = $1', job.id
        )
    assert rows == 1


async def test_lost_reply_to_the_write_back_loop_is_not_a_lost_lease(
    relay: LossyRelay, pg_dsn: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """finish() alone (the write-back loop; here while the worker stops) commits, the
    reply is lost, the outcome is sent again: the worker knows it was written."""
    caplog.set_level(logging.INFO, logger="taskq.worker")
    app, seen = make_app(relay, pg_dsn, schema)
    async with app:
        job = await app.enqueue("lost_reply.work", {"n": 21})
        async with app.worker(concurrency=1) as worker:
            with anyio.fail_after(10):
                await seen["started"].wait()
            relay.arm(FINISH_ALONE)
            async with anyio.create_task_group() as tg:
                # A stopping worker claims nothing more: the outcome can only
                # be written by the write-back loop (or the final flush).
                tg.start_soon(worker.stop)
                await anyio.sleep(0.05)
                seen["go"].set()
                with anyio.fail_after(10):
                    await relay.cut.wait()
        assert b"Z" in relay.swallowed and b"D" in relay.swallowed  # a row, then commit
        assert_reported_as_succeeded(worker.stats, seen, caplog)
        await assert_finished_once(app, job)


async def test_lost_reply_to_a_running_workers_write_back_is_not_a_lost_lease(
    relay: LossyRelay, pg_dsn: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While the worker goes on claiming, finish() commits, the reply is lost, the
    write-back loop sends the outcome again: the worker knows it was written."""
    caplog.set_level(logging.INFO, logger="taskq.worker")
    app, seen = make_app(relay, pg_dsn, schema)
    async with app:
        job = await app.enqueue("lost_reply.work", {"n": 21})
        async with app.worker(concurrency=1) as worker:
            with anyio.fail_after(10):
                await seen["started"].wait()
            relay.arm(FINISH_ALONE)
            seen["go"].set()  # the outcome goes to the write-back loop at once
            with anyio.fail_after(10):
                await relay.cut.wait()
                # Sent again on another connection, it changes nothing.
                while worker.stats.writebacks < 1:
                    await anyio.sleep(0.01)
        assert b"Z" in relay.swallowed and b"D" in relay.swallowed  # a row, then commit
        assert_reported_as_succeeded(worker.stats, seen, caplog)
        await assert_finished_once(app, job)
