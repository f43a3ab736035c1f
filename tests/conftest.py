"""Test fixtures: one real Postgres for the session, a fresh schema for every test.

Set TASKQ_TEST_DSN to use an existing server; otherwise the suite starts its
own (the embedded Postgres, or the machine's server binaries) in a temporary
directory and stops it at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import taskq
from taskq import _embedded, _migrations

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dsn = os.environ.get("TASKQ_TEST_DSN")
    if dsn:
        yield dsn
        return
    server = _embedded.ensure_server(tmp_path_factory.mktemp("pg") / "data")
    try:
        asyncio.run(_no_fsync(server.dsn))
        yield server.dsn
    finally:
        server.stop()


async def _no_fsync(dsn: str) -> None:
    """The suite's own throwaway server: commits need not wait for the disk (~2 ms each).

    Only an operating-system crash can lose what fsync=off leaves unsynced; a
    killed or restarted Postgres (tests do both) loses nothing, since every
    commit still reaches the OS (synchronous_commit stays on).
    """
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ALTER SYSTEM SET fsync = off")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


def new_schema_name() -> str:
    return f"t_{secrets.token_hex(5)}"


class Schemas:
    """Schemas migrated ahead of tests, and dropped after them, on a thread of its own.

    Migrating a schema is hundreds of DDL statements (a tenth of a second on an
    idle machine, far more on a busy one), and most tests open an App on a new
    one. The thread migrates the next few with the same code as ``App.open``
    while tests run (and mostly wait), so the test's App finds its schema up to
    date. Every name is new and used by one test only.
    """

    AHEAD = 3
    THREAD = "taskq-test-schemas"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.ready: queue.Queue[str] = queue.Queue(maxsize=self.AHEAD)
        self.dropping: queue.Queue[str | None] = queue.Queue()
        self.errors: list[str] = []
        self.thread = threading.Thread(
            target=asyncio.run, args=(self._main(),), name=self.THREAD, daemon=True
        )
        # Its migrations' log lines belong to no test: left in, they land in
        # whichever test's log capture is current (or one already closed).
        logging.getLogger("taskq.migrations").addFilter(self._not_mine)
        self.thread.start()

    def _not_mine(self, record: logging.LogRecord) -> bool:
        return record.threadName != self.THREAD

    def migrated(self) -> str:
        """A migrated schema; a new name (the test's App migrates it) if the thread failed."""
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                return self.ready.get(timeout=0.5)
        return new_schema_name()

    def drop(self, name: str) -> None:
        self.dropping.put(name)

    def close(self) -> None:
        self.dropping.put(None)
        self.thread.join(300)
        assert not self.thread.is_alive(), "the schema thread did not finish"
        assert not self.errors, self.errors

    async def _main(self) -> None:
        # A lock a test left behind (a stray process) fails a drop instead of stalling the thread.
        conn = await asyncpg.connect(self.dsn, server_settings={"lock_timeout": "60s"})
        try:
            while True:
                try:
                    name = self.dropping.get(timeout=0.02 if self.ready.full() else 0)
                except queue.Empty:
                    if not self.ready.full():
                        name = new_schema_name()
                        await _migrations.migrate(conn, name)
                        self.ready.put(name)
                    continue
                if name is None:
                    break
                await self._drop(conn, name)
            while not self.ready.empty():
                await self._drop(conn, self.ready.get())
        except Exception as exc:
            self.errors.append(f"schema thread: {exc!r}")
        finally:
            await conn.close()

    async def _drop(self, conn: asyncpg.Connection, name: str) -> None:
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        except asyncpg.PostgresError as exc:
            self.errors.append(f"dropping schema {name}: {exc!r}")


@pytest.fixture(scope="session")
def schemas(pg_dsn: str) -> Iterator[Schemas]:
    made = Schemas(pg_dsn)
    try:
        yield made
    finally:
        made.close()


#: Modules whose tests of the ``app`` fixture need its schema not to exist:
#: taskq.testing runs that App on schemas of its own and must leave this one alone.
FRESH_SCHEMA_MODULES = {"tests.test_testing_helpers"}


@pytest.fixture
def schema(request: pytest.FixtureRequest, schemas: Schemas) -> Iterator[str]:
    """A new schema's name, dropped after the test.

    Migrated already for a test that takes the ``app`` fixture (or is marked
    ``migrated_schema``): its App opens it as it would a schema it had just
    migrated. Any other test gets it empty (tests of migration need that).
    """
    wanted = request.node.get_closest_marker("migrated_schema") or (
        "app" in request.fixturenames and request.module.__name__ not in FRESH_SCHEMA_MODULES
    )
    name = schemas.migrated() if wanted else new_schema_name()
    yield name
    schemas.drop(name)


@pytest.fixture
def app(pg_dsn: str, schema: str) -> taskq.App:
    """An App on a fresh schema; not open yet, so tests can register tasks first."""
    return taskq.App(pg_dsn, schema=schema)


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(pg_dsn)
    try:
        yield c
    finally:
        await c.close()


def subprocess_env(pg_dsn: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["TASKQ_DSN"] = pg_dsn
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


PYTHON = sys.executable


async def until(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Poll a condition until it holds (returns a true value), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
