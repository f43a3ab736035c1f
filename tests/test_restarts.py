"""Restarts, of workers and of Postgres: rescue in a crash loop, a worker that
starts before its database, the pool and the logs across a Postgres restart.

Real processes and real servers throughout. Tests that stop or restart
Postgres do it to a throwaway server of their own, never the suite's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import taskq
from taskq import _embedded

from .conftest import PYTHON, new_schema_name, subprocess_env, until
from .reliableapp import LEDGER_SQL

pytestmark = pytest.mark.anyio

#: The lease of the crash-loop test; workers rescue every half lease.
LEASE = 4.0
RESCUE_INTERVAL = LEASE / 2
#: Each short-lived worker lives this long: less than the old first rescue
#: (two lease-keeper rounds of LEASE / 3 after start-up), more than start-up.
LIFETIME = 2.5
#: Between one worker's SIGTERM and the next one's first rescue no worker
#: runs: its exit, the next one's start-up.
START_UP = 3.0


@pytest.fixture(scope="module")
def blank_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory made by initdb (seconds) once for the module's servers, stopped."""
    data_dir = tmp_path_factory.mktemp("blank") / "pg"
    _embedded.ensure_server(data_dir).stop()
    return data_dir


@pytest.fixture
def own_server(tmp_path: Path, blank_data_dir: Path) -> Iterator[_embedded.EmbeddedServer]:
    """A Postgres of this test's own, so that stopping it disturbs no other test."""
    # cp -a: the copy keeps its owner (the postgres OS user when the tests run as root).
    subprocess.run(["cp", "-a", str(blank_data_dir), str(tmp_path / "pg")], check=True)
    server = _embedded.ensure_server(tmp_path / "pg")
    try:
        yield server
    finally:
        server.stop()


def spawn(
    dsn: str, schema: str, log: Path, *options: str, app: str = "reliableapp:app", sleep: str = "0"
) -> subprocess.Popen[bytes]:
    """`python -m taskq worker` in a real process, its output in ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [PYTHON, "-m", "taskq", "worker", app, *options],
            env=subprocess_env(dsn, TASKQ_SCHEMA=schema, RELIABLE_SLEEP=sleep),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then the exit status (killed after 60 s: a hung worker fails the test)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


async def val(app: taskq.App, sql: str, *args: Any) -> Any:
    async with app.pool.acquire() as c:
        return await c.fetchval(sql.replace("{s}", f'"{app.schema}"'), *args)


# -- rescue while workers keep restarting ------------------------------------------------


async def test_rescue_keeps_up_with_workers_that_restart_every_few_seconds(
    pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    """A killed worker's jobs run again within the bound although no worker lives long.

    A crash loop or a rolling deploy: each worker lives LIFETIME seconds, then
    the next one starts. Each must rescue when it starts, or none ever does.
    """
    options = ("--lease-seconds", str(LEASE), "--poll-interval", "0.5", "--shutdown-timeout", "1")
    jobs = 3
    app = taskq.App(pg_dsn, schema=schema)
    app.task(name="rel.work", retry=taskq.Retry(attempts=10, wait=0))(lambda n: n)
    async with app:
        async with app.pool.acquire() as c:
            await c.execute(LEDGER_SQL.format(schema=f'"{schema}"'))
        await app.tasks["rel.work"].enqueue_many([{"n": n} for n in range(jobs)])
        doomed = spawn(pg_dsn, schema, tmp_path / "doomed.log", *options, sleep="hang")
        try:
            await until(
                lambda: val(
                    app,
                    "SELECT count(*) = $1 FROM {s}.ledger WHERE event = 'start' AND pid = $2",
                    jobs,
                    doomed.pid,
                ),
                60,
                "the jobs to run in the first worker",
            )
        finally:
            doomed.kill()
            doomed.wait()
        # Its last renewal, on the database's clock: the lease it left behind, less a lease.
        renewed = await val(
            app,
            "SELECT max(lease_expires_at) - make_interval(secs => $1) FROM {s}.jobs",
            LEASE,
        )
        exits = []
        deadline = time.monotonic() + LEASE + RESCUE_INTERVAL + START_UP + 10
        done = False
        while not done and time.monotonic() < deadline:
            worker = spawn(pg_dsn, schema, tmp_path / f"short{len(exits)}.log", *options)
            await asyncio.sleep(LIFETIME)  # real time is the point: how long a worker lives
            exits.append(stop(worker))
            done = await val(
                app, "SELECT count(*) = $1 FROM {s}.history WHERE state = 'succeeded'", jobs
            )
        assert done, (
            f"the killed worker's jobs were not rescued by {len(exits)} short-lived workers"
        )
        assert set(exits) == {0}, exits
        # When the rescued jobs started again: at least as late as their re-queueing.
        restarted = await val(
            app,
            "SELECT max(at) FROM {s}.ledger WHERE event = 'start' AND pid <> $1",
            doomed.pid,
        )
        delay = (restarted - renewed).total_seconds()
        print(
            f"rescued and started {delay:.2f}s after the last renewal "
            f"(lease {LEASE:g}s + rescue interval {RESCUE_INTERVAL:g}s), "
            f"{len(exits)} short-lived worker(s)"
        )
        assert delay <= LEASE + RESCUE_INTERVAL + START_UP, delay
        rows = await val(
            app,
            "SELECT bool_and(attempts = 2 AND rescues = 1) AND count(*) = $1 FROM {s}.history",
            jobs,
        )
        assert rows is True
        assert await val(app, "SELECT count(*) FROM {s}.ledger WHERE event = 'done'") == jobs


# -- a worker started while Postgres is shutting down -------------------------------------


def postmaster_pid(server: _embedded.EmbeddedServer) -> int:
    return int((server.data_dir / "postmaster.pid").read_text().split()[0])


async def shutting_down(server: _embedded.EmbeddedServer) -> asyncpg.Connection:
    """Put the server into a smart shutdown that a session of ours holds open.

    Until that session closes, Postgres refuses new connections with 57P03
    ("the database system is shutting down"), as in the first moments of any
    restart, but for as long as the test needs.
    """
    holder = await asyncpg.connect(server.dsn)
    os.kill(postmaster_pid(server), signal.SIGTERM)  # smart shutdown

    async def refused() -> bool:
        try:
            conn = await asyncpg.connect(server.dsn)
        except asyncpg.CannotConnectNowError:
            return True
        await conn.close()
        return False

    await until(refused, 30, "Postgres to refuse new connections while shutting down")
    return holder


async def finish_shutdown(server: _embedded.EmbeddedServer, holder: asyncpg.Connection) -> None:
    pid = postmaster_pid(server)
    await holder.close()

    async def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await until(gone, 60, "Postgres to finish its shutdown")


async def test_worker_started_while_postgres_shuts_down_comes_up_with_it(
    own_server: _embedded.EmbeddedServer, tmp_path: Path
) -> None:
    """57P03 at start is not the end: the worker waits for Postgres, then runs jobs."""
    dsn, schema, log = own_server.dsn, new_schema_name(), tmp_path / "worker.log"
    holder = await shutting_down(own_server)
    worker = spawn(dsn, schema, log, "--shutdown-timeout", "1", app="workerapp:app")

    async def waiting() -> bool:
        text = await asyncio.to_thread(log.read_text)
        assert worker.poll() is None, f"the worker exited ({worker.returncode}):\n{text}"
        return "cannot open taskq's connection to Postgres yet" in text

    try:
        try:
            await until(waiting, 60, "the worker to say it waits for Postgres")
        finally:
            await finish_shutdown(own_server, holder)
        assert "the database system is shutting down" in log.read_text()
        assert worker.poll() is None, log.read_text()  # still waiting, now for a closed door
        await asyncio.to_thread(_embedded.ensure_server, own_server.data_dir)
        app = taskq.App(dsn, schema=schema)
        app.task(name="cli.add", queue="math")(lambda a, b: a + b)
        async with app:
            job = await app.enqueue("cli.add", {"a": 20, "b": 22})
            assert await job.result(timeout=60) == 42
        assert stop(worker) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    text = log.read_text()
    assert "connected to Postgres after" in text
    assert "Traceback" not in text
    assert text.count("cannot open taskq's connection to Postgres yet") == 1  # said once


async def test_open_waits_for_postgres_but_not_for_what_waiting_cannot_fix(
    own_server: _embedded.EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = own_server.dsn
    # Unknown role (28000), and a schema that is not installed: raised at once.
    started = time.monotonic()
    with pytest.raises(taskq.DatabaseError, match="28000"):
        await taskq.App(dsn.replace("postgres@", "nobody@", 1), connect_retry=60).open()
    with pytest.raises(taskq.SchemaError):
        await taskq.App(dsn, schema=new_schema_name(), auto_migrate=False, connect_retry=60).open()
    assert time.monotonic() - started < 30
    # Down: open() waits (and says so once), and opens when Postgres is back.
    own_server.stop()
    app = taskq.App(dsn, schema=new_schema_name(), connect_retry=60)
    caplog.set_level(logging.INFO, logger="taskq")
    opening = asyncio.ensure_future(app.open())
    try:
        await until(
            lambda: asyncio.sleep(0, "cannot open taskq's connection" in caplog.text),
            30,
            "open() to say it waits",
        )
        assert not opening.done()
        await asyncio.to_thread(_embedded.ensure_server, own_server.data_dir)
        await asyncio.wait_for(opening, 60)
        async with app.database.acquire("a test") as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        opening.cancel()
        await app.close()


# -- the pool across a Postgres restart ---------------------------------------------------


async def test_user_code_gets_working_connections_right_after_a_restart(
    own_server: _embedded.EmbeddedServer,
) -> None:
    """No connection that the restart ended is handed to user code.

    The restart happens while the event loop is blocked (as in a busy
    worker): when it runs again, the pool's idle connections have been ended
    by the server, and asyncpg does not know yet. Before taskq checked them,
    such a connection failed its first statement ("connection was closed in
    the middle of operation", or on uvloop "cannot switch to state 12").
    """
    app = taskq.App(own_server.dsn, schema=new_schema_name())
    async with app:
        idle = [await app.pool.acquire() for _ in range(5)]
        for conn in idle:
            await app.pool.release(conn)
        own_server.stop()  # blocking on purpose: the loop sees the restart only afterwards
        _embedded.ensure_server(own_server.data_dir)

        async def use() -> int:
            async with app.pool.acquire() as conn, conn.transaction():
                return int(await conn.fetchval("SELECT $1::int + 1", 41))

        assert await asyncio.gather(*(use() for _ in range(5))) == [42] * 5
        assert await app.pool.fetchval("SELECT 1") == 1
        # While it is down, getting a connection waits (connect_retry) for its return.
        await asyncio.to_thread(own_server.stop)
        waiting = asyncio.ensure_future(use())
        await asyncio.sleep(0.5)  # real time: the outage
        assert not waiting.done()
        await asyncio.to_thread(_embedded.ensure_server, own_server.data_dir)
        assert await asyncio.wait_for(waiting, 30) == 42


async def test_a_postgres_restart_is_one_warning_line_not_tracebacks(
    own_server: _embedded.EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker through two restarts: per restart one WARNING per connection kind, no traceback.

    asyncpg's pool logs a traceback each time it fails to reconnect its
    minimum of connections (1, 2, 4 ... s apart), and the LISTEN connection
    logged each reconnect attempt.
    """
    caplog.set_level(logging.DEBUG)
    app = taskq.App(own_server.dsn, schema=new_schema_name())

    @app.task
    async def use_pool(n: int) -> int:
        async with app.pool.acquire() as conn:
            return int(await conn.fetchval("SELECT $1::int", n))

    def said(text: str, level: int = logging.INFO) -> int:
        return sum(text in r.getMessage() for r in caplog.records if r.levelno >= level)

    async with app, app.worker(concurrency=5):
        for _restart in (1, 2):
            await asyncio.to_thread(own_server.stop)
            await asyncio.sleep(3.5)  # real time: the outage, long enough for several reconnects
            await asyncio.to_thread(_embedded.ensure_server, own_server.data_dir)
            jobs = [await use_pool.enqueue(n=n) for n in range(10)]
            assert [await job.result(timeout=30) for job in jobs] == list(range(10))
    noisy = [r for r in caplog.records if r.name.startswith("asyncpg") or r.exc_info]
    assert noisy == [], [(r.name, r.getMessage()) for r in noisy]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # Per restart: one line for the pool, one for the LISTEN connection...
    assert said("lost the pool's connections", logging.WARNING) == 2, warnings
    assert said("the pool reconnected to Postgres") == 2
    assert said("taskq notifier cannot connect", logging.WARNING) == 2, warnings
    # ... and one for each statement that the restart cut short, if any.
    kinds = (
        "lost the pool's connections",
        "taskq notifier cannot connect",
        "the connection to Postgres broke while the statement was under way",
    )
    assert all(any(kind in w for kind in kinds) for w in warnings), warnings
    assert len(warnings) <= 2 * 4, warnings
