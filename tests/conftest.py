"""Test fixtures: one real Postgres for the session, a fresh schema for every test.

Set TASKQ_TEST_DSN to use an existing server; otherwise the suite starts its
own (the embedded Postgres, or the machine's server binaries) in a temporary
directory and stops it at the end.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import taskq
from taskq import _embedded

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
        yield server.dsn
    finally:
        server.stop()


def new_schema_name() -> str:
    return f"t_{secrets.token_hex(5)}"


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    name = new_schema_name()
    yield name

    async def drop() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


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
