"""Restarts, of workers and of Postgres: rescue in a crash loop, a worker that
starts before its database, the pool and the logs across a Postgres restart.

Real processes and real servers throughout. Tests that stop or restart
Postgres do it to a throwaway server of their own, never the suite's.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import taskq
from taskq import _embedded

from .conftest import PYTHON, subprocess_env
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


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[_embedded.EmbeddedServer]:
    """A Postgres of this test's own, so that stopping it disturbs no other test."""
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


async def until(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Poll a condition until it holds, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


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
