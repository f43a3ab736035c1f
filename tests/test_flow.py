"""Flow control across workers: unique jobs, pause/resume, cluster-wide limits.

The limits are checked against what Postgres recorded: running counts sampled
from the jobs table while real worker processes run, and the start times of
every job.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import taskq
from taskq._store import ClaimResult
from taskq.worker.config import WorkerConfig
from taskq.worker.worker import Worker

from .conftest import PYTHON, subprocess_env

pytestmark = pytest.mark.anyio


# -- unique jobs -----------------------------------------------------------------


async def test_twenty_concurrent_producers_of_one_unique_key_make_one_job(
    pg_dsn: str, schema: str
) -> None:
    app = taskq.App(pg_dsn, schema=schema, pool_max_size=20)

    @app.task(name="flow.report")
    async def report(day: str) -> str:
        return day

    async with app:
        unique = report.options(unique_key="report:2026-11-21")
        jobs = await asyncio.gather(*(unique.enqueue(day="2026-11-21") for _ in range(20)))
        assert len({j.id for j in jobs}) == 1
        assert sum(not j.duplicate for j in jobs) == 1
        # The same key on another queue is another job.
        other = await unique.options(queue="other").enqueue(day="2026-11-21")
        assert other.id != jobs[0].id and not other.duplicate

        stats = await app.drain()
        assert stats.succeeded == 2
        assert (await jobs[0].status()).unique_key == "report:2026-11-21"
        # Finished, the key is free again.
        again = await unique.enqueue(day="2026-11-21")
        assert again.id != jobs[0].id and not again.duplicate


async def test_unique_key_race_between_open_transactions(pg_dsn: str, schema: str) -> None:
    """Producers in their own transactions: the first commit wins, the rest get its job."""
    app = taskq.App(pg_dsn, schema=schema)

    @app.task(name="flow.sync")
    async def sync(account: int) -> None:
        return None

    async with app:
        conns = [await asyncpg.connect(pg_dsn) for _ in range(20)]
        try:
            txs = [c.transaction() for c in conns]
            for tx in txs:
                await tx.start()
            first = await sync.options(connection=conns[0], unique_key="acct:1").enqueue(account=1)

            async def produce(conn: asyncpg.Connection) -> taskq.Job:
                return await sync.options(connection=conn, unique_key="acct:1").enqueue(account=1)

            # The others wait on the first one's uncommitted row.
            waiting = [asyncio.ensure_future(produce(c)) for c in conns[1:]]
            await asyncio.sleep(0.2)
            assert not any(w.done() for w in waiting)
            await txs[0].commit()
            others = await asyncio.gather(*waiting)
            for tx in txs[1:]:
                await tx.commit()
        finally:
            for c in conns:
                await c.close()
        assert {j.id for j in others} == {first.id}
        assert all(j.duplicate for j in others)
        counts = dict(((q, s), n) for q, s, n in await app.queue_counts())
        assert counts == {("default", "queued"): 1}


async def test_rolled_back_unique_job_frees_the_key(pg_dsn: str, schema: str) -> None:
    app = taskq.App(pg_dsn, schema=schema)

    @app.task(name="flow.mail")
    async def mail() -> None:
        return None

    async with app:
        conn = await asyncpg.connect(pg_dsn)
        try:
            tx = conn.transaction()
            await tx.start()
            await mail.options(connection=conn, unique_key="k").enqueue()
            waiting = asyncio.ensure_future(mail.options(unique_key="k").enqueue())
            await asyncio.sleep(0.1)
            await tx.rollback()
            job = await waiting
        finally:
            await conn.close()
        assert not job.duplicate
        assert (await job.status()).state is taskq.JobState.QUEUED


async def test_unique_window_counts_recently_finished_jobs(app: taskq.App) -> None:
    @app.task(name="flow.digest")
    async def digest() -> None:
        return None

    async with app:
        windowed = digest.options(unique_key="digest", unique_for=timedelta(hours=1))
        first = await windowed.enqueue()
        await app.drain()
        again = await windowed.enqueue()
        assert again.id == first.id and again.duplicate
        # Without the window the finished job does not hold the key.
        fresh = await digest.options(unique_key="digest").enqueue()
        assert fresh.id != first.id and not fresh.duplicate
        # A short window runs out.
        await app.drain()
        short = digest.options(unique_key="digest", unique_for=0.3)
        assert (await short.enqueue()).duplicate
        await anyio.sleep(0.4)
        assert not (await short.enqueue()).duplicate


async def test_unique_option_errors(app: taskq.App) -> None:
    @app.task(name="flow.u")
    async def u() -> None:
        return None

    with pytest.raises(taskq.ConfigurationError, match="unique_key"):
        u.options(unique_key="")
    with pytest.raises(taskq.ConfigurationError, match="unique_for needs a unique_key"):
        u.options(unique_for=10)
    with pytest.raises(taskq.ConfigurationError, match="unique_for"):
        u.options(unique_key="k", unique_for=-1)
    async with app:
        with pytest.raises(taskq.ConfigurationError, match="one by one"):
            await u.options(unique_key="k").enqueue_many([{}, {}])
        by_name = await app.enqueue("flow.u", unique_key="n")
        assert (await app.enqueue("flow.u", unique_key="n")).id == by_name.id


async def test_failed_unique_job_is_not_rerun_while_its_key_is_taken(app: taskq.App) -> None:
    @app.task(name="flow.fails", retry=False)
    async def fails() -> None:
        raise RuntimeError("no")

    async with app:
        dead = await fails.options(unique_key="x").enqueue()
        await app.drain()
        live = await fails.options(unique_key="x").enqueue()
        assert live.id != dead.id
        assert await dead.retry() is False
        await live.cancel()
        assert await dead.retry() is True
        assert (await dead.status()).state is taskq.JobState.QUEUED


# -- pause and resume --------------------------------------------------------------


async def started_at_rows(conn: asyncpg.Connection, schema: str, queue: str) -> list[Any]:
    return list(
        await conn.fetch(
            f'SELECT started_at FROM "{schema}".jobs WHERE queue = $1 AND started_at IS NOT NULL '
            f'UNION ALL SELECT started_at FROM "{schema}".history WHERE queue = $1',
            queue,
        )
    )


async def test_pause_stops_starts_on_every_worker_and_resume_restarts_them(
    pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    apps = [taskq.App(pg_dsn, schema=schema) for _ in range(2)]
    for a in apps:
        a.task(name="flow.step", queue="steps")(_step)
        a.task(name="flow.other", queue="others")(_step)
    producer = apps[0]
    async with producer, apps[1]:
        await producer.tasks["flow.step"].enqueue_many([{"seconds": 0.02}] * 400)
        async with apps[0].worker(concurrency=4), apps[1].worker(concurrency=4):
            while len(await started_at_rows(conn, schema, "steps")) < 20:
                await anyio.sleep(0.01)
            info = await producer.queue("steps").pause()
            assert info.paused
            paused_at = await conn.fetchval("SELECT clock_timestamp()")
            # Other queues go on while "steps" is paused.
            others = await producer.tasks["flow.other"].enqueue_many([{}] * 5)
            for job in others:
                await job.result(timeout=10)
            before = await started_at_rows(conn, schema, "steps")
            await anyio.sleep(1.5)
            after = await started_at_rows(conn, schema, "steps")
            assert len(after) == len(before)
            assert all(r[0] <= paused_at for r in after)
            assert (await producer.queue("steps").info()).queued > 0

            await producer.queue("steps").resume()
            resumed_at = time.monotonic()
            while len(await started_at_rows(conn, schema, "steps")) == len(after):
                assert time.monotonic() - resumed_at < 10, "no job started after resume"
                await anyio.sleep(0.01)
        infos = {i.name: i for i in await producer.queues()}
        assert not infos["steps"].paused


async def _step(seconds: float = 0.0) -> None:
    await anyio.sleep(seconds)


async def test_drain_leaves_a_paused_queue_alone(app: taskq.App) -> None:
    @app.task(name="flow.p", queue="p")
    async def p() -> None:
        return None

    async with app:
        await app.queue("p").pause()
        job = await p.enqueue()
        with anyio.fail_after(10):
            stats = await app.drain()
        assert stats.processed == 0
        assert (await job.status()).state is taskq.JobState.QUEUED
        await app.queue("p").resume()
        assert (await app.drain()).succeeded == 1


async def test_queue_settings_round_trip_and_bad_values(app: taskq.App) -> None:
    async with app:
        q = app.queue("emails")
        info = await q.configure(concurrency_limit=3, rate_limit="100/minute")
        assert info.concurrency_limit == 3
        assert info.rate_limit == taskq.RateLimit(100, 60.0)
        assert str(info.rate_limit) == "100/minute"
        info = await q.configure(rate_limit=None)  # concurrency limit untouched
        assert (info.concurrency_limit, info.rate_limit) == (3, None)
        info = await q.configure(concurrency_limit=None)
        assert info.concurrency_limit is None
        for bad in (0, -1, "3", 2.5, True):
            with pytest.raises(taskq.ConfigurationError, match="concurrency_limit"):
                await q.configure(concurrency_limit=bad)
        for rate in ("100", "x/minute", "100/fortnight", "0/s", (5, "s"), 5):
            with pytest.raises(taskq.ConfigurationError, match="rate limit"):
                await q.configure(rate_limit=rate)
    with pytest.raises(taskq.ConfigurationError):
        app.queue("bad queue name!")


def test_rate_limit_strings() -> None:
    parse = taskq.RateLimit.parse
    assert parse("50/s") == taskq.RateLimit(50, 1.0)
    assert parse("50/second") == taskq.RateLimit(50, 1.0)
    assert parse("5/10s") == taskq.RateLimit(5, 10.0)
    assert parse(" 1000 / hour ") == taskq.RateLimit(1000, 3600.0)
    assert parse((7, timedelta(minutes=2))) == taskq.RateLimit(7, 120.0)
    assert str(parse("3/d")) == "3/day"


# -- cluster-wide limits, with worker processes ---------------------------------------


@contextmanager
def worker_processes(
    pg_dsn: str, schema: str, n: int, *args: str, app: str = "flowapp:app", **env: str
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``n`` processes of ``python -m taskq worker APP ARGS``, stopped (SIGTERM) at the end."""
    procs = [
        subprocess.Popen(
            [PYTHON, "-m", "taskq", "worker", app, *args],
            env=subprocess_env(pg_dsn, TASKQ_SCHEMA=schema, **env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def flow_app(pg_dsn: str, schema: str) -> taskq.App:
    from . import flowapp

    app = taskq.App(pg_dsn, schema=schema)
    for task in flowapp.app.tasks.values():
        app.task(name=task.name, queue=task.queue, retry=task.retry)(task.fn)
    return app


async def test_global_limit_holds_across_four_worker_processes(
    pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    app = await flow_app(pg_dsn, schema)
    async with app:
        await app.queue("limited").configure(concurrency_limit=3)
        samples: list[int] = []
        count = (
            f"SELECT count(*) FROM \"{schema}\".jobs WHERE queue = 'limited' AND state = 'running'"
        )
        with worker_processes(pg_dsn, schema, 4, "--concurrency", "10"):
            # All four compete from the first job on. (Which of them runs the
            # jobs is not promised: a worker that finishes one writes it back
            # and claims the freed slot in the same statement.)
            await all_registered(conn, schema, 4)
            jobs = await app.tasks["flow.work"].enqueue_many([{"seconds": 0.05}] * 80)
            with anyio.fail_after(120):
                while await conn.fetchval(f'SELECT count(*) FROM "{schema}".jobs') > 0:
                    samples.append(await conn.fetchval(count))
        assert max(samples) <= 3, Counter(samples)
        assert 3 in samples  # the limit is used, not just respected
        rows = await conn.fetch(
            f'SELECT started_at, finished_at, worker_id FROM "{schema}".history '
            "WHERE queue = 'limited' AND state = 'succeeded'"
        )
        assert len(rows) == len(jobs)
        # From the recorded times too: at no instant more than 3 running.
        events = sorted(
            [(r["started_at"], 1) for r in rows] + [(r["finished_at"], -1) for r in rows],
            key=lambda e: (e[0], e[1]),
        )
        running = peak = 0
        for _, step in events:
            running += step
            peak = max(peak, running)
        assert peak <= 3


async def all_registered(conn: asyncpg.Connection, schema: str, n: int) -> None:
    """Wait until n worker processes have started (each records itself)."""
    with anyio.fail_after(60):
        while await conn.fetchval(f'SELECT count(*) FROM "{schema}".workers') < n:
            await anyio.sleep(0.05)


async def test_rate_limit_holds_across_three_worker_processes(
    pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    app = await flow_app(pg_dsn, schema)
    async with app:
        await app.queue("limited").configure(rate_limit="50/second")
        with worker_processes(pg_dsn, schema, 3, "--concurrency", "10"):
            await all_registered(conn, schema, 3)
            await app.tasks["flow.work"].enqueue_many([{}] * 500)
            with anyio.fail_after(120):
                while await conn.fetchval(f'SELECT count(*) FROM "{schema}".jobs') > 0:
                    await anyio.sleep(0.2)
        starts = sorted(r[0] for r in await started_at_rows(conn, schema, "limited"))
    assert len(starts) == 500
    per_second = Counter(s.replace(microsecond=0) for s in starts)
    assert max(per_second.values()) <= 50, per_second
    # The window slides: no span of one second holds more than 50 starts.
    for i in range(len(starts) - 50):
        assert starts[i + 50] - starts[i] >= timedelta(seconds=1), (i, starts[i], starts[i + 50])
    # 500 starts at 50 a second need at least 9 seconds after the first.
    assert starts[-1] - starts[0] >= timedelta(seconds=9)


async def test_task_rate_limit_and_a_limited_queue_in_one_worker(
    pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    app = taskq.App(pg_dsn, schema=schema)

    @app.task(name="flow.api", queue="mixed", rate_limit="20/s")
    async def api() -> None:
        return None

    @app.task(name="flow.free", queue="mixed")
    async def free() -> None:
        return None

    async with app:
        await api.enqueue_many([{}] * 60)
        await free.enqueue_many([{}] * 200)
        with anyio.fail_after(60):
            stats = await app.drain(concurrency=20)
        assert stats.succeeded == 260
        rows = await conn.fetch(
            f'SELECT task, started_at FROM "{schema}".history ORDER BY started_at'
        )
    api_starts = [r["started_at"] for r in rows if r["task"] == "flow.api"]
    for i in range(len(api_starts) - 20):
        assert api_starts[i + 20] - api_starts[i] >= timedelta(seconds=1)
    # The unlimited task was not held back by the limited one.
    free_starts = [r["started_at"] for r in rows if r["task"] == "flow.free"]
    assert free_starts[-1] < api_starts[-1]


async def test_a_slot_our_own_job_frees_is_claimed_without_a_notification(
    app: taskq.App,
) -> None:
    """A limit holds the claim back; our job ends: its write-back wakes the claim loop.

    finish() also announces the freed slot with a NOTIFY, but that comes back a
    round trip later through the listener, and a lost one would leave the queue
    idle until the next poll (a minute here). Every notification is dropped.
    """
    ran: list[int] = []

    @app.task(name="flow.single", queue="single")
    async def single(i: int) -> None:
        ran.append(i)

    async with app:
        await app.queue("single").configure(concurrency_limit=1)
        await single.enqueue_many([{"i": i} for i in range(3)])
        worker = Worker(app, WorkerConfig.make(concurrency=4, poll_interval=60))
        worker._on_enqueued = lambda payload: None  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            await tg.start(worker.serve)
            with anyio.fail_after(15):
                while len(ran) < 3:
                    await anyio.sleep(0.01)
            await worker.stop()
    assert sorted(ran) == [0, 1, 2]
    assert worker.stats.claims >= 3  # one job a claim: the limit held the rest back


async def test_claim_reports_a_rate_window_holding_jobs_back(app: taskq.App) -> None:
    @app.task(name="flow.r", queue="r")
    async def r() -> None:
        return None

    async with app:
        await app.queue("r").configure(rate_limit="2/minute")
        await r.enqueue_many([{}] * 5)
        async with app.pool.acquire() as c:
            result: ClaimResult = await app.store.claim(
                c, queues=None, tasks=["flow.r"], limit=10, worker_id="w", lease_seconds=30
            )
            assert len(result.jobs) == 2
            assert result.held_back and result.retry_in is not None
            assert 55 < result.retry_in <= 60


async def test_rate_window_stays_small_however_many_claims_a_period_sees(
    app: taskq.App, conn: asyncpg.Connection
) -> None:
    @app.task(name="flow.many", queue="many")
    async def many() -> None:
        return None

    async with app:
        await app.queue("many").configure(rate_limit="1000000/minute")
        await many.enqueue_many([{}] * 1500)
        stats = await app.drain(concurrency=1)  # one claim per job
        assert stats.succeeded == 1500 and stats.claims >= 1500
        entries, total = await conn.fetchrow(
            f"SELECT cardinality(rate_log_at), (SELECT sum(x) FROM unnest(rate_log_n) AS x) "
            f"FROM \"{app.schema}\".queues WHERE name = 'many'"
        )
    assert entries <= 65
    assert total == 1500  # every start is still counted
