"""ctx.transaction(): the connection breaks during COMMIT, and the worker finds out what happened.

The worker's pool goes through the TCP relay of test_lost_reply.py. Armed
with ``COMMIT;`` from inside the task's block, it either lets the COMMIT
through and loses the reply (the transaction committed: the task goes on, its
result is written, the job ran once), or loses the COMMIT itself (it did not
commit: the task sees a DatabaseError and the retry policy runs it again),
also with the server's end of the connection left open, so that the session
still holds the job's row when the worker asks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest

import taskq

from .test_lost_reply import LossyRelay

pytestmark = pytest.mark.anyio

#: What asyncpg sends for ``Transaction.commit()``.
COMMIT = "COMMIT;"


@pytest.fixture
async def relay(pg_dsn: str) -> AsyncIterator[LossyRelay]:
    async with LossyRelay(pg_dsn) as r:
        yield r


def make_app(
    relay: LossyRelay, pg_dsn: str, schema: str, **arm: bool
) -> tuple[taskq.App, dict[str, Any]]:
    """A worker's App through the relay, whose task arms it inside its first attempt's block."""
    app = taskq.App(relay.dsn, schema=schema, listen_dsn=pg_dsn)
    seen: dict[str, Any] = {"attempts": [], "errors": [], "pids": [], "hook": []}

    @app.task(name="lost_commit.pay", retry=taskq.Retry(attempts=3, wait=0))
    async def pay(n: int, ctx: taskq.JobContext) -> int:
        seen["attempts"].append(ctx.attempt)
        try:
            async with ctx.transaction() as conn:
                await conn.execute(
                    f'INSERT INTO "{schema}".effects (job_id, attempt) VALUES ($1, $2)',
                    ctx.id,
                    ctx.attempt,
                )
                seen["pids"].append(conn.get_server_pid())
                if ctx.attempt == 1:
                    relay.arm(COMMIT, **arm)
        except Exception as exc:
            seen["errors"].append(exc)
            raise
        return n * 2

    @app.after_job
    async def record(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        seen["hook"].append(outcome.kind)

    return app, seen


async def run_one(app: taskq.App, schema: str) -> tuple[taskq.JobStatus, Any, taskq.WorkerStats]:
    async with app:
        async with app.pool.acquire() as conn:
            await conn.execute(
                f'CREATE TABLE "{schema}".effects (job_id bigint NOT NULL, attempt int NOT NULL)'
            )
        job = await app.enqueue("lost_commit.pay", {"n": 21})
        async with app.worker(concurrency=1) as worker:
            with anyio.fail_after(30):
                assert await job.result(timeout=30) == 42
                while worker.running_jobs:
                    await anyio.sleep(0.01)
        status = await job.status()
        async with app.pool.acquire() as conn:
            effects = await conn.fetch(f'SELECT job_id, attempt FROM "{schema}".effects')
    return status, [tuple(r) for r in effects], worker.stats


def worker_messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "taskq.worker" and r.levelno >= level
    ]


async def test_a_commit_whose_reply_was_lost_is_found_committed(
    relay: LossyRelay, pg_dsn: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="taskq.worker")
    app, seen = make_app(relay, pg_dsn, schema)
    status, effects, stats = await run_one(app, schema)
    assert relay.cut.is_set() and b"Z" in relay.swallowed  # COMMIT's reply, lost
    # Committed: the task went on as if nothing happened, and ran once.
    assert (seen["attempts"], seen["errors"], seen["hook"]) == ([1], [], ["succeeded"])
    assert (status.state, status.attempts, status.result) == (taskq.JobState.SUCCEEDED, 1, 42)
    assert effects == [(status.id, 1)]
    assert (stats.succeeded, stats.retried, stats.failed, stats.lost) == (1, 0, 0, 0)
    assert [m for m in worker_messages(caplog) if "and the transaction did commit" in m]
    assert not worker_messages(caplog, logging.WARNING)


@pytest.mark.parametrize("server_side", [True, False], ids=["cut", "server-side-open"])
async def test_a_commit_that_never_reached_the_server_fails_the_attempt(
    relay: LossyRelay,
    pg_dsn: str,
    schema: str,
    caplog: pytest.LogCaptureFixture,
    server_side: bool,
) -> None:
    """The COMMIT is lost on the way: not committed. With the server's end left open
    its session still holds the job's row, idle in the transaction; the worker ends
    that session rather than waiting for it."""
    caplog.set_level(logging.INFO, logger="taskq.worker")
    app, seen = make_app(relay, pg_dsn, schema, request=True, server_side=server_side)
    started = time.monotonic()
    status, effects, stats = await run_one(app, schema)
    assert relay.cut.is_set()
    assert time.monotonic() - started < 10  # not the bound of the check
    # Not committed: the first attempt saw an error, the retry policy ran it again.
    assert seen["attempts"] == [1, 2]
    assert [type(e) for e in seen["errors"]] == [taskq.DatabaseError]
    assert "the transaction did not commit" in str(seen["errors"][0])
    assert seen["hook"] == ["retried", "succeeded"]
    assert (status.state, status.attempts, status.result) == (taskq.JobState.SUCCEEDED, 2, 42)
    assert status.errors[0]["type"] == "taskq.DatabaseError"
    assert effects == [(status.id, 2)]
    assert (stats.succeeded, stats.retried, stats.lost) == (1, 1, 0)
    # The first attempt's session is gone (ended by the worker, when it was left open).
    conn = await asyncpg.connect(pg_dsn)
    try:
        alive = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", seen["pids"][0]
        )
    finally:
        await conn.close()
    assert alive == 0
    assert not [m for m in worker_messages(caplog) if "could not be found out" in m]
