"""The result of a job that ctx.transaction() ended reaches every waiter.

Such a job reads as succeeded from its transaction's commit, and its result
is written a moment later, when its task returns. A waiter that reads it in
between, however it got there (its announcement request blocked on the row
the commit locked, or it started after the commit), waits for the result
instead of taking None; a job that returned None, or one whose result never
comes, is not waited for longer than that.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

import taskq
from taskq import _results
from taskq._store import Store

pytestmark = pytest.mark.anyio


@pytest.fixture
def long_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pending result waited for far longer than the tests' timeouts (30 s): a
    waiter that returns within its timeout was told, or never had to wait, and
    one that would sit out the grace fails with a TimeoutError instead of a
    wall-clock bound the test would have to guess."""
    monkeypatch.setattr(_results, "RESULT_WRITE_GRACE_SECONDS", 120.0)


@pytest.fixture
async def client(pg_dsn: str, schema: str) -> AsyncIterator[taskq.App]:
    """A second App on the schema, as a web process that waits for results: its own
    pool and listener, none of the worker's tasks."""
    other = taskq.App(pg_dsn, schema=schema, auto_migrate=False)
    yield other
    await other.close()


async def sql(app: taskq.App, query: str, *args: Any) -> Any:
    async with app.pool.acquire() as c:
        return await c.fetchval(query.replace("{s}", f'"{app.schema}"'), *args)


async def test_concurrent_waiters_get_every_result_of_jobs_their_transaction_ended(
    app: taskq.App, client: taskq.App, long_grace: None
) -> None:
    @app.task
    async def pay(order: int, ctx: taskq.JobContext) -> str:
        async with ctx.transaction() as conn:
            await conn.execute("SELECT pg_sleep($1)", random.random() * 0.005)
        # A little work after the block, as tasks do: committed, the result
        # not written yet.
        await asyncio.sleep(random.random() * 0.01)
        return f"paid {order}"

    waiters, rounds = 20, 20
    got: dict[int, Any] = {}

    async def waiter(w: int) -> None:
        for r in range(rounds):
            order = w * rounds + r
            job = await pay.enqueue(order=order)
            # Now or a moment later: some ask while the job commits.
            await asyncio.sleep(random.random() * 0.03)
            # Within 30 s: each is told when its result is written (the
            # grace, 120 s here, would outlast the timeout).
            got[order] = await client.get_job(job.id).result(timeout=30)

    async with app:
        await client.open()
        async with app.worker(concurrency=20), asyncio.TaskGroup() as tg:
            for w in range(waiters):
                tg.create_task(waiter(w))
    wrong = {order: value for order, value in got.items() if value != f"paid {order}"}
    assert len(got) == waiters * rounds
    assert wrong == {}, f"{len(wrong)} of {len(got)} results wrong, e.g. {list(wrong.items())[:5]}"


async def test_a_waiter_blocked_by_the_commit_gets_the_result(
    app: taskq.App, client: taskq.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiter's announcement request waits for the row the commit locked; by
    the time it runs, the job is in history and its result not written yet."""
    locked = asyncio.Event()
    lock_for_commit = Store.lock_for_commit

    async def slow_lock(self: Store, conn: Any, job_id: int, token: Any) -> bool | None:
        awaited = await lock_for_commit(self, conn, job_id, token)
        locked.set()
        await asyncio.sleep(0.5)  # the waiter arrives and queues for the row's lock
        return awaited

    monkeypatch.setattr(Store, "lock_for_commit", slow_lock)

    @app.task
    async def pay(ctx: taskq.JobContext) -> str:
        async with ctx.transaction() as conn:
            await conn.execute("SELECT 1")
        await asyncio.sleep(0.3)  # committed, the result not written yet
        return "paid"

    async with app:
        await client.open()
        job = await pay.enqueue()
        async with app.worker(concurrency=1):
            await asyncio.wait_for(locked.wait(), 30)
            assert await client.get_job(job.id).result(timeout=30) == "paid"


async def test_a_waiter_that_starts_between_the_commit_and_the_return_gets_the_result(
    app: taskq.App, client: taskq.App, long_grace: None
) -> None:
    committed = asyncio.Event()
    go_on = asyncio.Event()

    @app.task
    async def pay(ctx: taskq.JobContext) -> dict[str, int]:
        async with ctx.transaction() as conn:
            await conn.execute("SELECT 1")
        committed.set()
        await go_on.wait()
        return {"receipt": 7}

    async with app:
        await client.open()
        job = await pay.enqueue()
        async with app.worker(concurrency=1):
            await asyncio.wait_for(committed.wait(), 30)
            # Succeeded already, its result not written yet.
            assert (await client.get_job(job.id).status()).state is taskq.JobState.SUCCEEDED
            waiter = asyncio.ensure_future(client.get_job(job.id).result(timeout=30))
            await asyncio.sleep(0.3)
            assert not waiter.done()
            go_on.set()
            assert await waiter == {"receipt": 7}
            # The one with the task decodes it by the return annotation too.
            assert await job.result(timeout=5) == {"receipt": 7}


async def test_a_plain_job_returning_none_gives_none_at_once(
    app: taskq.App, long_grace: None
) -> None:
    @app.task
    async def nothing() -> None:
        return None

    @app.task
    def nothing_sync() -> None:
        return None

    async with app:
        jobs = [await nothing.enqueue(), await nothing_sync.enqueue()]
        await app.drain()
        for job in jobs:
            assert await job.result(timeout=30) is None  # not pending: no grace waited
            assert (await job.status()).result is None
        # Stored as before: SQL NULL, not JSON null.
        assert await sql(app, "SELECT count(*) FROM {s}.history WHERE result IS NULL") == 2


async def test_a_transaction_job_returning_none_gives_none(
    app: taskq.App, client: taskq.App, long_grace: None
) -> None:
    @app.task
    async def quiet(ctx: taskq.JobContext) -> None:
        async with ctx.transaction() as conn:
            await conn.execute("SELECT 1")

    async with app:
        await client.open()
        # Waiting while it runs.
        job = await quiet.enqueue()
        async with app.worker(concurrency=1):
            assert await client.get_job(job.id).result(timeout=30) is None
        # And once it is over.
        assert await job.result(timeout=30) is None
        assert (await job.status()).result is None
        pending = await sql(app, "SELECT result_pending FROM {s}.history WHERE id = $1", job.id)
        assert pending is None


async def test_a_result_that_never_comes_is_waited_for_briefly(
    app: taskq.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed between the commit and the result's write leaves the job
    succeeded with its result pending for good: a waiter waits at most the
    grace after the commit, and not at all once that has passed."""
    monkeypatch.setattr(_results, "RESULT_WRITE_GRACE_SECONDS", 1.5)

    @app.task
    async def pay() -> str:
        return "paid"

    async with app:
        jobs = [await pay.enqueue(), await pay.enqueue()]
        await app.drain()
        # As the killed worker's commit leaves them: no result, pending since
        # the commit; one just now, one a minute ago.
        started = time.monotonic()
        await sql(app, "UPDATE {s}.history SET result = NULL, result_pending = clock_timestamp()")
        await sql(
            app,
            "UPDATE {s}.history SET result_pending = now() - interval '1 minute' WHERE id = $1",
            jobs[1].id,
        )
        assert await jobs[0].result(timeout=30) is None
        # It waited for the result until the grace after the "commit" ran out.
        assert time.monotonic() - started > 1.0
        # Past the grace, not waited for at all: with a grace longer than the
        # timeout, waiting would time out.
        monkeypatch.setattr(_results, "RESULT_WRITE_GRACE_SECONDS", 120.0)
        await sql(
            app,
            "UPDATE {s}.history SET result_pending = now() - interval '1 hour' WHERE id = $1",
            jobs[1].id,
        )
        assert await jobs[1].result(timeout=30) is None
        monkeypatch.setattr(_results, "RESULT_WRITE_GRACE_SECONDS", 1.5)
        # A waiter whose own timeout ends first is told what it waited for.
        await sql(app, "UPDATE {s}.history SET result_pending = clock_timestamp()")
        with pytest.raises(TimeoutError, match=r"succeeded .* not returned its result"):
            await jobs[0].result(timeout=0.3)


async def test_a_result_nobody_waits_for_is_not_announced(app: taskq.App, pg_dsn: str) -> None:
    """Jobs nobody waits for send no finished notification (a NOTIFY serialises
    commits), ctx.transaction() ones included; a waiter that came late is told."""
    heard: list[str] = []

    @app.task
    async def pay(n: int, ctx: taskq.JobContext) -> int:
        async with ctx.transaction() as conn:
            await conn.execute("SELECT 1")
        return n

    async with app:
        listener = await asyncpg.connect(pg_dsn)
        try:
            await listener.add_listener(
                app.store.finished_channel, lambda *args: heard.append(args[-1])
            )
            jobs = [await pay.enqueue(n=n) for n in range(3)]
            await app.drain()
            assert [await job.result(timeout=5) for job in jobs] == [0, 1, 2]
            await asyncio.sleep(0.3)
        finally:
            await listener.close()
    assert heard == []
