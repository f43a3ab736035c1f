"""Workers: claiming, running, results, retries, timeouts, cancellation, back pressure."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import pytest
import tenacity

import taskq

pytestmark = pytest.mark.anyio


async def fetchval(app: taskq.App, sql: str, *args: Any) -> Any:
    async with app.pool.acquire() as c:
        return await c.fetchval(sql.replace("{s}", f'"{app.schema}"'), *args)


async def wait_until(predicate: Any, timeout: float = 10.0, step: float = 0.02) -> None:
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(step)


async def test_drain_runs_jobs_and_keeps_results(app: taskq.App) -> None:
    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def nothing() -> None:
        return None

    async with app:
        j1 = await add.enqueue(a=2, b=3)
        j2 = await nothing.enqueue()
        stats = await app.drain()
        assert (stats.succeeded, stats.failed) == (2, 0)
        assert await j1.result(timeout=5) == 5
        assert await j2.result(timeout=5) is None
        s1 = await j1.status()
        assert s1.state is taskq.JobState.SUCCEEDED
        assert s1.attempts == 1
        assert s1.started_at is not None and s1.finished_at is not None
        assert s1.started_at <= s1.finished_at
        # Finished jobs leave the hot table; a result is stored only when there is one.
        assert await fetchval(app, "SELECT count(*) FROM {s}.jobs") == 0
        assert await fetchval(app, "SELECT count(*) FROM {s}.history WHERE result IS NULL") == 1


async def test_racing_workers_run_every_job_exactly_once(pg_dsn: str, schema: str) -> None:
    app = taskq.App(pg_dsn, schema=schema, pool_max_size=30)
    runs: dict[int, int] = {}

    @app.task
    async def record(n: int) -> None:
        runs[n] = runs.get(n, 0) + 1
        async with app.pool.acquire() as c:
            await c.execute(f'INSERT INTO "{schema}".ledger (n) VALUES ($1)', n)
        await anyio.lowlevel.checkpoint()

    async with app:
        await fetchval(app, "CREATE TABLE {s}.ledger (n int NOT NULL)")
        await record.enqueue_many([{"n": n} for n in range(2000)])
        stats: list[taskq.WorkerStats] = []

        async def one_worker() -> None:
            stats.append(await app.drain(concurrency=8))

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(one_worker)
        assert len(stats) == 5
        assert sum(s.succeeded for s in stats) == 2000
        # Work was really shared: more than one worker got jobs.
        assert sum(1 for s in stats if s.succeeded) > 1
        assert sorted(runs) == list(range(2000))
        assert set(runs.values()) == {1}
        assert await fetchval(app, "SELECT count(*) FROM {s}.ledger") == 2000
        assert await fetchval(app, "SELECT count(DISTINCT n) FROM {s}.ledger") == 2000
        assert (
            await fetchval(app, "SELECT count(*) FROM {s}.history WHERE state='succeeded'") == 2000
        )


async def test_claims_and_write_backs_are_batched(app: taskq.App) -> None:
    @app.task
    async def noop(i: int) -> None:
        await anyio.lowlevel.checkpoint()

    async with app:
        await noop.enqueue_many([{"i": i} for i in range(1000)])
        stats = await app.drain(concurrency=50)
    assert stats.succeeded == 1000
    # One statement per job would be 1000 of each.
    assert stats.claims < 200, stats
    assert stats.writebacks < 200, stats


async def test_higher_priority_runs_first_then_fifo(app: taskq.App) -> None:
    order: list[str] = []

    @app.task
    async def step(label: str) -> None:
        order.append(label)

    async with app:
        await step.enqueue(label="low-1")
        await step.options(priority=-1).enqueue(label="lowest")
        await step.options(priority=5).enqueue(label="high-1")
        await step.enqueue(label="low-2")
        await step.options(priority=5).enqueue(label="high-2")
        await app.drain(concurrency=1)
    assert order == ["high-1", "high-2", "low-1", "low-2", "lowest"]


async def test_delayed_job_waits_then_starts_without_polling(app: taskq.App) -> None:
    @app.task
    async def later() -> str:
        return "done"

    async with app:
        job = await later.options(delay=1.0).enqueue()
        stats = await app.drain()
        assert stats.processed == 0
        assert (await job.status()).state is taskq.JobState.QUEUED
        # poll_interval is far longer than the delay: the worker must sleep
        # until the job is due, not until its next poll.
        async with app.worker(poll_interval=60):
            assert await job.result(timeout=20) == "done"
        status = await job.status()
        assert status.started_at is not None
        assert (status.started_at - status.enqueued_at).total_seconds() >= 1.0


async def test_idle_worker_wakes_on_notify(app: taskq.App) -> None:
    @app.task
    async def ping() -> str:
        return "pong"

    async with app, app.worker(poll_interval=60) as worker:
        await anyio.sleep(0.2)  # let it go idle
        job = await ping.enqueue()
        # With a 60 s poll, only the NOTIFY can make this finish in time.
        assert await job.result(timeout=20) == "pong"
        assert worker.stats.succeeded == 1


async def test_timeout_cancels_the_attempt_and_counts_as_failure(app: taskq.App) -> None:
    cleaned_up: list[int] = []

    @app.task(timeout=0.2, retry=taskq.Retry(attempts=2, wait=0))
    async def slow() -> None:
        try:
            await anyio.sleep(30)
        finally:
            cleaned_up.append(1)

    async with app:
        job = await slow.enqueue()
        stats = await app.drain()
        assert (stats.retried, stats.failed) == (1, 1)
        with pytest.raises(taskq.JobFailed) as info:
            await job.result(timeout=5)
        assert info.value.error_type == "TimeoutError"
        assert info.value.attempts == 2
        assert cleaned_up == [1, 1]


async def test_retries_wait_per_policy_then_succeed(app: taskq.App) -> None:
    starts: list[float] = []

    @app.task(retry=taskq.Retry(attempts=3, wait=tenacity.wait_fixed(0.3)))
    async def flaky() -> str:
        starts.append(time.monotonic())
        if len(starts) < 3:
            raise ConnectionError(f"try {len(starts)}")
        return "ok"

    async with app:
        job = await flaky.enqueue()
        first = await app.drain()
        assert (first.retried, first.succeeded) == (1, 0)
        status = await job.status()
        assert status.state is taskq.JobState.QUEUED
        assert status.attempts == 1
        assert status.error is not None and status.error["message"] == "try 1"
        async with app.worker(poll_interval=60):
            assert await job.result(timeout=20) == "ok"
        assert (await job.status()).attempts == 3
    assert len(starts) == 3
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(g >= 0.29 for g in gaps), gaps


async def test_retry_on_selects_which_errors_retry(app: taskq.App) -> None:
    @app.task(retry=taskq.Retry(attempts=3, wait=0, on=ValueError))
    async def picky(kind: str) -> None:
        raise ValueError("v") if kind == "value" else KeyError("k")

    @app.task(
        retry=taskq.Retry(
            attempts=3, wait=0, on=tenacity.retry_if_exception_message(match="transient.*")
        )
    )
    async def by_message(msg: str) -> None:
        raise RuntimeError(msg)

    async with app:
        value = await picky.enqueue(kind="value")
        key = await picky.enqueue(kind="key")
        transient = await by_message.enqueue(msg="transient glitch")
        permanent = await by_message.enqueue(msg="bad input")
        await app.drain()
        assert (await value.status()).attempts == 3
        assert (await key.status()).attempts == 1
        assert (await transient.status()).attempts == 3
        assert (await permanent.status()).attempts == 1
        for job in (value, key, transient, permanent):
            assert (await job.status()).state is taskq.JobState.FAILED


async def test_retry_is_durable_across_restarts(pg_dsn: str, schema: str) -> None:
    app = taskq.App(pg_dsn, schema=schema)

    @app.task(name="durable", retry=taskq.Retry(attempts=3, wait=3600))
    async def durable() -> None:
        raise RuntimeError("later")

    async with app:
        job = await durable.enqueue()
        await app.drain()
    # A new process (new App) sees the job waiting for its retry, not lost.
    again = taskq.App(pg_dsn, schema=schema)
    again.task(name="durable")(lambda: None)
    async with again:
        status = await again.get_job(job.id).status()
        assert status.state is taskq.JobState.QUEUED
        assert status.attempts == 1
        assert status.run_at is not None
        assert (status.run_at - status.enqueued_at).total_seconds() > 3500
        assert (await again.drain()).processed == 0


async def test_dead_letter_keeps_the_error_and_can_be_rerun(app: taskq.App) -> None:
    broken = {"yes": True}

    @app.task(retry=taskq.Retry(attempts=2, wait=0))
    async def fragile(order: int) -> int:
        if broken["yes"]:
            raise LookupError(f"order {order} not found")
        return order

    async with app:
        job = await fragile.enqueue(order=9)
        await app.drain()
        status = await job.status()
        assert status.state is taskq.JobState.FAILED
        assert status.attempts == 2
        assert status.last_error == "LookupError: order 9 not found"
        with pytest.raises(taskq.JobFailed) as info:
            await job.result(timeout=5)
        err = info.value
        assert (err.error_type, err.error_message, err.job_id) == (
            "LookupError",
            "order 9 not found",
            job.id,
        )
        assert "in fragile" in err.traceback and "raise LookupError" in err.traceback
        assert isinstance(err, taskq.JobError) and isinstance(err, taskq.TaskqError)

        broken["yes"] = False
        assert await job.retry() is True
        rerun = await job.status()
        assert (rerun.state, rerun.attempts) == (taskq.JobState.QUEUED, 0)
        await app.drain()
        assert await job.result(timeout=5) == 9
        assert await job.retry() is False  # succeeded jobs are not re-run


async def test_errors_with_unstorable_text_are_kept_escaped(app: taskq.App) -> None:
    class Weird(Exception):
        pass

    @app.task(retry=False)
    async def nul() -> None:
        raise Weird("bad \x00 byte and \udcff surrogate")

    @app.task
    async def after() -> int:
        return 1

    async with app:
        job = await nul.enqueue()
        ok = await after.enqueue()
        stats = await app.drain()
        assert (stats.failed, stats.succeeded) == (1, 1)
        with pytest.raises(taskq.JobFailed) as info:
            await job.result(timeout=5)
        assert info.value.error_message == "bad \\x00 byte and \\udcff surrogate"
        assert await ok.result(timeout=5) == 1


async def test_result_that_is_not_json_fails_the_job_clearly(app: taskq.App) -> None:
    @app.task
    async def bad_result() -> object:
        return {"when": object()}

    async with app:
        job = await bad_result.enqueue()
        await app.drain()
        with pytest.raises(taskq.JobFailed) as info:
            await job.result(timeout=5)
        assert info.value.error_type == "taskq.SerializationError"
        assert "result of task" in info.value.error_message
        assert info.value.attempts == 1  # not retried: it would fail the same way


async def test_sync_tasks_run_in_threads_bounded_by_concurrency(app: taskq.App) -> None:
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}
    threads: set[str] = set()

    @app.task
    def blocking(i: int) -> int:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        threads.add(threading.current_thread().name)
        time.sleep(0.1)
        with lock:
            state["now"] -= 1
        return i

    async with app:
        jobs = await blocking.enqueue_many([{"i": i} for i in range(8)])
        await app.drain(concurrency=2)
        assert [await j.result(timeout=5) for j in jobs] == list(range(8))
    assert state["peak"] == 2
    assert threading.main_thread().name not in threads


async def test_back_pressure_never_claims_more_than_free_slots(app: taskq.App) -> None:
    gate = anyio.Event()

    @app.task
    async def blocked(i: int) -> None:
        await gate.wait()

    async with app:
        await blocked.enqueue_many([{"i": i} for i in range(12)])
        async with app.worker(concurrency=3) as worker:
            await wait_until(
                lambda: fetchval(app, "SELECT count(*) = 3 FROM {s}.jobs WHERE state='running'")
            )
            for _ in range(10):
                assert (
                    await fetchval(app, "SELECT count(*) FROM {s}.jobs WHERE state='running'") == 3
                )
                assert len(worker.running_jobs) == 3
                await anyio.sleep(0.02)
            gate.set()
            await wait_until(lambda: fetchval(app, "SELECT count(*) = 0 FROM {s}.jobs"))


async def test_result_times_out_without_a_worker(app: taskq.App) -> None:
    @app.task
    async def never_run() -> None:
        return None

    async with app:
        job = await never_run.enqueue()
        with pytest.raises(TimeoutError):
            await job.result(timeout=0.3)


async def test_result_wakes_on_notification(app: taskq.App) -> None:
    @app.task
    async def value() -> int:
        return 41

    async with app:
        job = await value.enqueue()
        got: list[Any] = []

        async def waiter() -> None:
            got.append(await job.result(timeout=30))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.1)
            await app.drain()
        assert got == [41]


async def test_cancel_a_queued_job(app: taskq.App) -> None:
    ran: list[int] = []

    @app.task
    async def job(n: int) -> None:
        ran.append(n)

    async with app:
        victim = await job.enqueue(n=1)
        await job.enqueue(n=2)
        assert await victim.cancel() is True
        await app.drain()
        assert ran == [2]
        assert (await victim.status()).state is taskq.JobState.CANCELLED
        with pytest.raises(taskq.JobCancelled):
            await victim.result(timeout=5)
        assert await victim.cancel() is False  # already finished: a no-op
        with pytest.raises(taskq.JobNotFound):
            await app.get_job(10**12).cancel()


async def test_cancel_a_running_job(app: taskq.App) -> None:
    started = anyio.Event()
    cleaned = anyio.Event()

    @app.task
    async def long_job() -> None:
        started.set()
        try:
            await anyio.sleep(60)
        finally:
            cleaned.set()

    @app.task
    async def after() -> str:
        return "still working"

    async with app, app.worker() as worker:
        job = await long_job.enqueue()
        with anyio.fail_after(10):
            await started.wait()
        assert await job.cancel() is True
        with pytest.raises(taskq.JobCancelled):
            await job.result(timeout=10)
        assert cleaned.is_set()
        assert await (await after.enqueue()).result(timeout=10) == "still working"
        assert worker.stats.cancelled == 1


async def test_jobs_of_unknown_tasks_wait_for_a_worker_that_knows_them(
    pg_dsn: str, schema: str
) -> None:
    new = taskq.App(pg_dsn, schema=schema)
    old = taskq.App(pg_dsn, schema=schema)

    @new.task(name="v2.only")
    async def v2_only() -> str:
        return "new code"

    @old.task(name="v1.task")
    async def v1_task() -> str:
        return "old code"

    async with new, old:
        job = await v2_only.enqueue()
        stats = await old.drain()  # the old worker does not know v2.only
        assert stats.processed == 0
        assert (await job.status()).state is taskq.JobState.QUEUED
        await new.drain()
        assert await job.result(timeout=5) == "new code"


async def test_history_is_pruned_after_retention(pg_dsn: str, schema: str) -> None:
    import datetime as dt

    app = taskq.App(pg_dsn, schema=schema, history_retention=dt.timedelta(seconds=0))

    @app.task
    async def job() -> None:
        return None

    async with app:
        await job.enqueue()
        await app.drain()
        assert await fetchval(app, "SELECT count(*) FROM {s}.history") == 1
        async with app.worker(lease_seconds=0.6, prune_interval=0.1):
            await wait_until(lambda: fetchval(app, "SELECT count(*) = 0 FROM {s}.history"))


async def test_worker_beside_the_app_finishes_running_jobs_on_exit(app: taskq.App) -> None:
    @app.task
    async def short() -> str:
        await anyio.sleep(0.3)
        return "finished"

    async with app:
        async with app.worker(shutdown_timeout=10):
            job = await short.enqueue()
            await wait_until(
                lambda: fetchval(app, "SELECT count(*) = 1 FROM {s}.jobs WHERE state='running'")
            )
        # Leaving the block waited for the running job instead of dropping it.
        assert (await job.status()).state is taskq.JobState.SUCCEEDED


async def test_shutdown_returns_unfinished_jobs_without_using_an_attempt(app: taskq.App) -> None:
    started = anyio.Event()
    cleaned = anyio.Event()

    @app.task(retry=taskq.Retry(attempts=1))
    async def endless() -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        finally:
            cleaned.set()

    async with app:
        job = await endless.enqueue()
        async with app.worker(shutdown_timeout=0.2) as worker:
            with anyio.fail_after(10):
                await started.wait()
        assert cleaned.is_set()
        assert worker.stats.released == 1
        status = await job.status()
        assert status.state is taskq.JobState.QUEUED
        assert status.attempts == 0  # the interrupted run is not counted
        assert status.worker_id is None
        assert await fetchval(app, "SELECT lease_token IS NULL FROM {s}.jobs") is True


async def test_cancelling_run_worker_releases_its_jobs(app: taskq.App) -> None:
    started = anyio.Event()

    @app.task
    async def endless() -> None:
        started.set()
        await anyio.sleep(3600)

    async with app:
        job = await endless.enqueue()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: app.run_worker(handle_signals=False))
            with anyio.fail_after(10):
                await started.wait()
            tg.cancel_scope.cancel()
        status = await job.status()
        assert (status.state, status.attempts) == (taskq.JobState.QUEUED, 0)


async def test_write_back_with_a_stale_lease_token_changes_nothing(app: taskq.App) -> None:
    import uuid

    from taskq._store import Outcome

    @app.task
    async def job() -> None:
        return None

    async with app:
        j = await job.enqueue()
        async with app.pool.acquire() as conn:
            claimed = (
                await app.store.claim(
                    conn,
                    queues=None,
                    tasks=list(app.tasks),
                    limit=10,
                    worker_id="w",
                    lease_seconds=30,
                )
            ).jobs
            assert [c.id for c in claimed] == [j.id]
            stale = Outcome(j.id, uuid.uuid4(), "succeeded")
            assert await app.store.finish(conn, [stale]) == [j.id]  # lost: nothing written
            assert (await j.status()).state is taskq.JobState.RUNNING
            good = Outcome(j.id, claimed[0].token, "succeeded")
            assert await app.store.finish(conn, [good]) == []
            # Writing the same outcome again (e.g. a retry after a lost reply) is a no-op.
            assert await app.store.finish(conn, [good]) == [j.id]
            assert (await j.status()).state is taskq.JobState.SUCCEEDED


async def test_many_open_close_cycles_leak_no_connections(app: taskq.App, pg_dsn: str) -> None:
    @app.task
    async def job() -> None:
        return None

    # This App's own connections only (its schema is in their application
    # name): other tests' pools may still be closing meanwhile.
    mine = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name LIKE 'taskq%' AND application_name LIKE '%(' || $1 || ')'"
    )
    probe = await asyncpg.connect(pg_dsn)
    try:
        for _ in range(20):
            async with app:
                await job.enqueue()
                await app.drain()
                assert await probe.fetchval(mine, app.schema) > 0  # the query sees them
        assert await probe.fetchval(mine, app.schema) == 0
    finally:
        await probe.close()


async def test_large_write_backs_with_long_ids_are_announced_in_chunks(app: taskq.App) -> None:
    """One NOTIFY payload holds at most 8000 bytes; 1500 ids of 16 digits do not fit in one."""

    @app.task
    async def noop(i: int) -> int:
        return i

    async with app:
        await fetchval(app, "ALTER TABLE {s}.jobs ALTER COLUMN id RESTART WITH 1000000000000000")
        jobs = await noop.enqueue_many([{"i": i} for i in range(3000)])
        with anyio.fail_after(120):
            stats = await app.drain(concurrency=1500, batch_size=1500)
        assert stats.succeeded == 3000
        assert stats.writebacks < 3000, stats
        assert await jobs[-1].result(timeout=10) == 2999


async def test_rescue_requeues_expired_leases_and_fails_jobs_without_attempts_left(
    app: taskq.App,
) -> None:
    @app.task(retry=taskq.Retry(attempts=1))
    async def once() -> None:
        return None

    @app.task(retry=taskq.Retry(attempts=3))
    async def thrice() -> None:
        return None

    async with app:
        j1 = await once.enqueue()
        j3 = await thrice.enqueue()
        async with app.pool.acquire() as conn:
            claimed = await app.store.claim(
                conn,
                queues=None,
                tasks=list(app.tasks),
                limit=10,
                worker_id="gone",
                lease_seconds=0.05,
            )
            assert len(claimed.jobs) == 2
            await anyio.sleep(0.1)
            requeued, failed = await app.store.rescue_expired(conn)
        assert (requeued, failed) == ([j3.id], [j1.id])
        s3 = await j3.status()
        assert (s3.state, s3.attempts) == (taskq.JobState.QUEUED, 1)
        assert s3.error is not None and s3.error["type"] == "taskq.LeaseExpired"
        with pytest.raises(taskq.JobFailed) as info:
            await j1.result(timeout=5)
        assert info.value.error_type == "taskq.LeaseExpired"


async def test_graceful_shutdown_reports_no_lost_leases(
    app: taskq.App, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task
    async def short(i: int) -> None:
        await anyio.sleep(0.2)

    async with app:
        for _ in range(3):
            jobs = await short.enqueue_many([{"i": i} for i in range(20)])
            async with app.worker(concurrency=20, shutdown_timeout=10):
                await wait_until(
                    lambda: fetchval(
                        app, "SELECT count(*) = 20 FROM {s}.jobs WHERE state='running'"
                    )
                )
            for job in jobs:
                assert (await job.status()).state is taskq.JobState.SUCCEEDED
    assert "lease lost" not in caplog.text


async def test_auto_migrate_on_an_up_to_date_schema_needs_no_create_rights(
    pg_dsn: str, schema: str
) -> None:
    owner = taskq.App(pg_dsn, schema=schema)
    async with owner:
        pass
    role = f"{schema}_user"
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'CREATE ROLE "{role}" LOGIN')
        await conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        await conn.execute(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"'
        )
        user_dsn = pg_dsn.replace("postgres@", f"{role}@", 1)
        app = taskq.App(user_dsn, schema=schema)

        @app.task
        async def job() -> int:
            return 5

        async with app:
            handle = await job.enqueue()
            await app.drain()
            assert await handle.result(timeout=5) == 5
        # Without the version check first, the bootstrap DDL would need CREATE.
        has_create = await conn.fetchval(
            "SELECT has_database_privilege($1, current_database(), 'CREATE')", role
        )
        assert has_create is False
    finally:
        await conn.execute(f'DROP OWNED BY "{role}"')
        await conn.execute(f'DROP ROLE "{role}"')
        await conn.close()


async def test_cancel_reaches_the_worker_even_without_the_notification(app: taskq.App) -> None:
    """The cancel flag is seen at the next lease renewal if the NOTIFY was lost."""
    started = anyio.Event()

    @app.task
    async def long_job() -> None:
        started.set()
        await anyio.sleep(60)

    async with app, app.worker(lease_seconds=0.6):
        job = await long_job.enqueue()
        with anyio.fail_after(10):
            await started.wait()
        # Set the flag the way cancel() does, but send no notification.
        await fetchval(app, "UPDATE {s}.jobs SET cancel_requested = true WHERE id = $1", job.id)
        with pytest.raises(taskq.JobCancelled):
            await job.result(timeout=10)


async def test_workers_serve_their_queues_only(app: taskq.App) -> None:
    ran: list[str] = []

    @app.task
    async def job(q: str) -> None:
        ran.append(q)

    async with app:
        for q in ("a", "b", "c", "d"):
            await job.options(queue=q).enqueue_many([{"q": q}] * 3)
        stats = await app.drain(queues=["a", "b"])
        assert stats.succeeded == 6
        assert sorted(ran) == ["a"] * 3 + ["b"] * 3
        ran.clear()
        stats = await app.drain()  # all queues: the rest
        assert sorted(ran) == ["c"] * 3 + ["d"] * 3


async def test_a_slot_freed_while_others_run_long_is_used_at_once(app: taskq.App) -> None:
    gate = anyio.Event()

    @app.task
    async def long_job() -> None:
        await gate.wait()

    @app.task
    async def short_job(n: int) -> int:
        await anyio.sleep(0.1)
        return n

    async with app:
        await long_job.enqueue_many([{}] * 3)
        first = await short_job.enqueue(n=1)
        queued = await short_job.enqueue(n=2)
        # Four slots, three held by long jobs for the whole test. With a 60 s
        # poll, only the wake-up on the finished short job can start the next.
        async with app.worker(concurrency=4, poll_interval=60):
            assert await first.result(timeout=10) == 1
            assert await queued.result(timeout=10) == 2
            gate.set()


async def test_a_retry_with_a_pending_cancel_ends_cancelled(app: taskq.App) -> None:
    from taskq._store import Outcome

    @app.task
    async def job() -> None:
        return None

    async with app:
        handle = await job.enqueue()
        async with app.pool.acquire() as conn:
            (claimed,) = (
                await app.store.claim(
                    conn,
                    queues=None,
                    tasks=list(app.tasks),
                    limit=1,
                    worker_id="w",
                    lease_seconds=30,
                )
            ).jobs
            assert await app.store.request_cancel(conn, handle.id) is True
            # The attempt failed and would be retried, but a cancel is pending.
            await app.store.finish(conn, [Outcome(claimed.id, claimed.token, "retry", delay=0)])
        status = await handle.status()
        assert status.state is taskq.JobState.CANCELLED
        with pytest.raises(taskq.JobCancelled):
            await handle.result(timeout=5)


async def test_awaiting_a_due_job_announces_it_again(
    app: taskq.App, conn: asyncpg.Connection
) -> None:
    # Waiting on a job flags its row, which locks it for a moment; a claim
    # that ran then passed over it. The flag therefore wakes the workers
    # again for a job that is due (and only for one that is due).
    @app.task(queue="wake")
    async def noop() -> None:
        return None

    heard: list[str] = []
    channel = f"taskq:{app.schema}:enqueued"
    await conn.add_listener(channel, lambda *args: heard.append(args[3]))
    async with app:
        due = await noop.enqueue()
        later = await noop.options(delay=3600).enqueue()
        with anyio.fail_after(5):
            while len(heard) < 2:  # the two enqueues
                await anyio.sleep(0.01)
        assert heard[0] == "wake" and heard[1].startswith("wake@")
        heard.clear()
        with pytest.raises(TimeoutError):
            await later.result(timeout=0.2)
        with pytest.raises(TimeoutError):
            await due.result(timeout=0.2)
        with anyio.fail_after(5):
            while not heard:
                await anyio.sleep(0.01)
        assert heard == ["wake"]


async def test_the_listener_can_use_its_own_dsn(pg_dsn: str, schema: str) -> None:
    import re
    import secrets

    role = f"taskq_listener_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute(f"CREATE ROLE {role} LOGIN")
    try:
        listen_dsn = re.sub(r"^(postgres(?:ql)?://)[^@/]*@", rf"\g<1>{role}@", pg_dsn)
        assert role in listen_dsn
        app = taskq.App(pg_dsn, schema=schema, listen_dsn=listen_dsn)

        @app.task
        async def ping() -> str:
            return "pong"

        async with app, app.worker(poll_interval=60):
            # The job can only start at once if the wake-up reached the
            # worker, through the listener connected as the other role.
            job = await ping.enqueue()
            assert await job.result(timeout=10) == "pong"
            users = await admin.fetch(
                "SELECT usename FROM pg_stat_activity WHERE application_name = $1",
                f"taskq-listener ({schema})",
            )
            assert [r["usename"] for r in users] == [role]
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()
