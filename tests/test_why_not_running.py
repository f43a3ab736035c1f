"""``why_not_running()`` and ``taskq jobs why``: each reason set up for real (real
workers in this process, real pauses, limits, rate windows and workflows) and
answered with its code, its numbers and a message that names them."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

import taskq
from taskq._admin import Explanation, why_not_running
from taskq._admin.why import AHEAD_CAP

from .conftest import PYTHON, subprocess_env, until

pytestmark = pytest.mark.anyio


async def why(app: taskq.App, job_id: int) -> Explanation:
    return await why_not_running(app.database, app.schema, job_id)


def codes(explanation: Explanation) -> list[str]:
    return [r.code for r in explanation.reasons]


async def state_of(job: taskq.Job) -> str:
    return str((await job.status()).state)


async def until_state(job: taskq.Job, state: str) -> None:
    async def reached() -> bool:
        return await state_of(job) == state

    await until(reached, 20, f"job {job.id} {state}")


def blocking_task(app: taskq.App, name: str = "why.block", **options: Any) -> Any:
    """A task that runs until the test's gate opens (``task.gate.set()``)."""
    gate = asyncio.Event()

    @app.task(name=name, **options)
    async def block() -> None:
        await gate.wait()

    block.gate = gate  # type: ignore[attr-defined]
    return block


@asynccontextmanager
async def opened_gate(task: Any) -> AsyncIterator[None]:
    """Let the blocked jobs end when the block ends, so that workers stop at once."""
    try:
        yield
    finally:
        task.gate.set()


def parse_iso(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


# -- not due -------------------------------------------------------------------------


async def test_scheduled_job_says_when_and_that_no_worker_runs(app: taskq.App) -> None:
    @app.task(name="why.later")
    async def later() -> None:
        return None

    async with app:
        job = await later.options(delay=3600).enqueue()
        explained = await why(app, job.id)
    assert explained.state == "queued" and explained.job_id == job.id
    assert codes(explained) == ["scheduled", "no_workers"]
    scheduled = explained.reasons[0]
    assert 3500 < scheduled.details["seconds_left"] <= 3600
    async with app:
        run_at = (await job.status()).run_at
    assert run_at is not None and parse_iso(scheduled.details["run_at"]) == run_at
    assert scheduled.details["attempts"] == 0
    assert "scheduled to run at" in scheduled.message and "database clock" in scheduled.message
    assert run_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") in scheduled.message
    none = explained.reasons[1]
    assert none.details["stale_workers"] == [] and none.details["live_after_seconds"] == 60.0
    assert app.schema in none.message


async def test_retry_backoff_names_the_error_and_the_next_attempt(app: taskq.App) -> None:
    @app.task(name="why.flaky", retry=taskq.Retry(attempts=3, wait=3600))
    async def flaky() -> None:
        raise ValueError("upstream said 503")

    async with app:
        job = await flaky.enqueue()
        stats = await app.drain()
        assert stats.retried == 1
        explained = await why(app, job.id)
    assert codes(explained) == ["retry_backoff", "no_workers"]
    r = explained.reasons[0]
    assert (r.details["attempts"], r.details["max_attempts"]) == (1, 3)
    assert r.details["error_type"] == "ValueError"
    assert r.details["error_message"] == "upstream said 503"
    assert 3500 < r.details["seconds_left"] <= 3600
    assert "attempt 1 of 3 failed with ValueError: upstream said 503" in r.message


# -- the queue -----------------------------------------------------------------------


async def test_paused_queue(app: taskq.App) -> None:
    @app.task(name="why.mail", queue="emails")
    async def mail() -> None:
        return None

    async with app:
        await app.queue("emails").pause()
        job = await mail.enqueue()
        async with app.worker(concurrency=2):
            explained = await why(app, job.id)
            assert await state_of(job) == "queued"
    assert codes(explained) == ["queue_paused"]
    assert explained.reasons[0].details == {"queue": "emails"}
    assert "queue 'emails' is paused" in explained.reasons[0].message


async def test_queue_concurrency_limit_full(app: taskq.App) -> None:
    block = blocking_task(app, queue="emails")
    async with app:
        await app.queue("emails").configure(concurrency_limit=2)
        first, second = await block.enqueue(), await block.enqueue()
        third = await block.enqueue()
        async with app.worker(concurrency=5), opened_gate(block):
            await until_state(first, "running")
            await until_state(second, "running")
            explained = await why(app, third.id)
    assert codes(explained) == ["queue_limit_full"]
    r = explained.reasons[0]
    assert r.details == {"queue": "emails", "limit": 2, "running": 2}
    assert "concurrency limit of 2 and 2 jobs of it are running" in r.message


async def test_queue_rate_limit_window(app: taskq.App) -> None:
    @app.task(name="why.ping", queue="api")
    async def ping() -> None:
        return None

    async with app:
        await app.queue("api").configure(rate_limit="1/hour")
        first = await ping.enqueue()
        async with app.worker(concurrency=2):
            await until_state(first, "succeeded")
            second = await ping.enqueue()
            explained = await why(app, second.id)
        first_started = (await first.status()).started_at
    assert first_started is not None
    assert codes(explained) == ["queue_rate_limited"]
    r = explained.reasons[0]
    assert (r.details["queue"], r.details["limit"], r.details["used"]) == ("api", 1, 1)
    assert r.details["period_seconds"] == 3600.0
    assert 3500 < r.details["seconds_left"] <= 3600
    # The window frees when the first job's start leaves it.
    assert (
        abs((parse_iso(r.details["next_start_at"]) - first_started).total_seconds() - 3600) < 0.01
    )
    assert "queue 'api' allows 1 start per 1h00m and 1 was used" in r.message


async def test_task_rate_limit_window(app: taskq.App) -> None:
    @app.task(name="why.sms", rate_limit="2/hour")
    async def sms() -> None:
        return None

    async with app:
        jobs = [await sms.enqueue() for _ in range(3)]
        async with app.worker(concurrency=4):
            await until_state(jobs[0], "succeeded")
            await until_state(jobs[1], "succeeded")
            explained = await why(app, jobs[2].id)
    assert codes(explained) == ["task_rate_limited"]
    r = explained.reasons[0]
    assert (r.details["task"], r.details["limit"], r.details["used"]) == ("why.sms", 2, 2)
    assert "task 'why.sms' allows 2 starts per 1h00m and 2 were used" in r.message


# -- workflows -----------------------------------------------------------------------


async def test_waiting_for_parents_names_them_with_their_states(app: taskq.App) -> None:
    @app.task(name="why.fast", queue="fast")
    async def fast() -> int:
        return 1

    @app.task(name="why.slow", queue="slow")
    async def slow() -> int:
        return 2

    @app.task(name="why.join")
    async def join(a: int, b: int) -> int:
        return a + b

    async with app:
        wf = taskq.Workflow(name="pair")
        wf.add(join, a=wf.add(fast), b=wf.add(slow), step_name="join")
        run = await wf.enqueue()
        await app.drain(queues=["fast"])  # the fast parent ends; the slow one stays queued
        status = await run.status()
        explained = await why(app, status.step("join").job_id)
    assert explained.state == "waiting"
    assert codes(explained) == ["waiting_for_parents", "no_workers"]
    r = explained.reasons[0]
    assert (r.details["pending"], r.details["total"]) == (1, 2)
    assert r.details["workflow_id"] == run.id and r.details["step"] == "join"
    assert r.details["parents"] == [
        {"name": "slow", "job_id": status.step("slow").job_id, "state": "queued", "ended": False},
        {"name": "fast", "job_id": status.step("fast").job_id, "state": "succeeded", "ended": True},
    ]
    assert "waits for 1 of its 2 parent steps to end: 'slow' (queued)" in r.message


async def test_expanded_map_waits_for_its_items(app: taskq.App) -> None:
    @app.task(name="why.list", queue="fast")
    async def listing() -> list[int]:
        return [1, 2, 3]

    @app.task(name="why.item", queue="slow")
    async def item(n: int) -> int:
        return n

    async with app:
        wf = taskq.Workflow(name="fan")
        wf.map(item, over=wf.add(listing), arg="n", step_name="items")
        run = await wf.enqueue()
        await app.drain(queues=["fast"])  # the list is known: the map made its 3 items
        explained = await why(app, (await run.status()).step("items").job_id)
    assert codes(explained) == ["waiting_for_map_items", "no_workers"]
    r = explained.reasons[0]
    assert r.details == {"workflow_id": run.id, "step": "items", "items": 3, "pending": 3}
    assert "waits for 3 of its 3 item steps to end" in r.message


# -- workers -------------------------------------------------------------------------


async def test_no_live_worker_has_the_task(app: taskq.App, pg_dsn: str, schema: str) -> None:
    @app.task(name="why.new")
    async def new() -> None:
        return None

    # An older deployment: a worker without the task.
    old = taskq.App(pg_dsn, schema=schema)

    @old.task(name="why.old")
    async def legacy() -> None:
        return None

    async with app:
        job = await new.enqueue()
        async with old.worker(concurrency=2) as worker:
            explained = await why(app, job.id)
    assert codes(explained) == ["no_worker_for_task"]
    r = explained.reasons[0]
    assert r.details == {"task": "why.new", "live_workers": [worker.id]}
    assert "no live worker has task 'why.new' (1 worker live)" in r.message


async def test_no_live_worker_serves_the_queue(app: taskq.App) -> None:
    @app.task(name="why.report", queue="reports")
    async def report() -> None:
        return None

    async with app:
        job = await report.enqueue()
        async with app.worker(concurrency=2, queues=["emails", "api"]) as worker:
            explained = await why(app, job.id)
    assert codes(explained) == ["no_worker_for_queue"]
    r = explained.reasons[0]
    assert r.details == {
        "queue": "reports",
        "live_workers": [worker.id],
        "served": ["api", "emails"],
    }
    assert (
        "no live worker serves queue 'reports' (1 worker live, serving 'api', 'emails')"
        in r.message
    )


async def test_task_and_queue_on_different_workers(
    app: taskq.App, pg_dsn: str, schema: str
) -> None:
    @app.task(name="why.new")
    async def new() -> None:
        return None

    old = taskq.App(pg_dsn, schema=schema)

    @old.task(name="why.old")
    async def legacy() -> None:
        return None

    async with app:
        job = await new.enqueue()
        async with (
            old.worker(concurrency=1) as everything,
            app.worker(concurrency=1, queues=["elsewhere"]) as other,
        ):
            explained = await why(app, job.id)
    assert codes(explained) == ["no_worker_for_task_in_queue"]
    assert explained.reasons[0].details == {
        "task": "why.new",
        "queue": "default",
        "with_task": [other.id],
        "serving_queue": [everything.id],
    }
    assert explained.reasons[0].message == (
        "1 live worker with task 'why.new' and 1 live worker serving queue 'default', "
        "but no worker does both"
    )


async def test_stale_workers_count_as_none(app: taskq.App, conn: asyncpg.Connection) -> None:
    @app.task(name="why.any")
    async def anything() -> None:
        return None

    async with app:
        await app.queue("default").pause()  # the job stays queued while the worker lives
        job = await anything.enqueue()
        # A long lease: the worker's next heartbeat is 100 s away.
        async with app.worker(concurrency=1, lease_seconds=300) as worker:
            await conn.execute(
                f'UPDATE "{app.schema}".workers SET heartbeat_at = now() - interval '
                "'2 minutes' WHERE id = $1",
                worker.id,
            )
            explained = await why(app, job.id)
    assert codes(explained) == ["queue_paused", "no_workers"]
    r = explained.reasons[1]
    assert r.details["stale_workers"] == [worker.id]
    assert r.details["last_heartbeat_at"] is not None
    assert "within 60 s" in r.message


async def test_all_able_workers_busy(app: taskq.App) -> None:
    block = blocking_task(app)
    async with app:
        first = await block.enqueue()
        async with app.worker(concurrency=1) as worker, opened_gate(block):
            await until_state(first, "running")
            second = await block.enqueue()
            explained = await why(app, second.id)
    assert codes(explained) == ["workers_busy"]
    r = explained.reasons[0]
    assert r.details == {
        "workers": [
            {"id": worker.id, "hostname": socket.gethostname(), "concurrency": 1, "running": 1}
        ],
        "slots": 1,
        "running": 1,
    }
    assert "the 1 live worker that can run it is full: 1 of 1 slot taken" in r.message


async def test_jobs_ahead_in_the_queue_counted_and_capped(app: taskq.App) -> None:
    block = blocking_task(app)
    async with app:
        first = await block.enqueue()
        async with app.worker(concurrency=1), opened_gate(block):
            await until_state(first, "running")
            mine = await block.enqueue()
            await block.options(priority=5).enqueue()  # higher priority: ahead
            await block.options(priority=5, delay=3600).enqueue()  # not due: not ahead
            await block.enqueue()  # same priority, later: behind
            explained = await why(app, mine.id)
            assert codes(explained) == ["workers_busy", "behind_other_jobs"]
            assert explained.reasons[1].details == {"queue": "default", "ahead": 1, "capped": False}
            assert "1 due job is ahead of it in queue 'default'" in explained.reasons[1].message
            # A deep backlog in front is counted up to the cap.
            await block.options(priority=9).enqueue_many([{}] * (AHEAD_CAP + 5))
            explained = await why(app, mine.id)
            await app.queue("default").pause()  # the backlog must not start on close
    ahead = explained.reasons[1]
    assert ahead.details == {"queue": "default", "ahead": AHEAD_CAP, "capped": True}
    assert "more than 10,000 due jobs are ahead" in ahead.message


# -- non-problems ----------------------------------------------------------------------


async def test_running_job_names_its_worker_and_lease(app: taskq.App) -> None:
    block = blocking_task(app)
    async with app:
        job = await block.enqueue()
        async with app.worker(concurrency=1) as worker, opened_gate(block):
            await until_state(job, "running")
            explained = await why(app, job.id)
    assert explained.state == "running" and codes(explained) == ["running"]
    d = explained.reasons[0].details
    assert (d["worker_id"], d["hostname"], d["worker_live"]) == (
        worker.id,
        socket.gethostname(),
        True,
    )
    assert 0 < d["lease_seconds_left"] <= 30
    assert (d["attempts"], d["max_attempts"], d["cancel_requested"]) == (1, 5, False)
    assert worker.id in explained.reasons[0].message


async def test_expired_lease_says_the_rescue_will_requeue_it(
    app: taskq.App, conn: asyncpg.Connection
) -> None:
    block = blocking_task(app)
    async with app:
        job = await block.enqueue()
        # Long lease and rescue interval: neither renewal nor rescue comes
        # before the test reads the lease it moved into the past.
        async with (
            app.worker(concurrency=1, lease_seconds=600) as worker,
            opened_gate(block),
        ):
            await until_state(job, "running")
            await conn.execute(
                f'UPDATE "{app.schema}".jobs SET lease_expires_at = now() - interval '
                "'42 seconds' WHERE id = $1",
                job.id,
            )
            explained = await why(app, job.id)
    assert codes(explained) == ["lease_expired", "running"]
    d = explained.reasons[0].details
    assert d["worker_id"] == worker.id and d["worker_live"] is True
    assert 42 <= d["seconds_ago"] < 100
    assert "the next rescue by a live worker puts it back" in explained.reasons[0].message


async def test_finished_jobs_give_their_final_state(app: taskq.App) -> None:
    @app.task(name="why.done")
    async def done() -> int:
        return 1

    @app.task(name="why.bad", retry=taskq.Retry(attempts=1))
    async def bad() -> None:
        raise KeyError("order 7")

    async with app:
        ok, failed = await done.enqueue(), await bad.enqueue()
        await app.drain()
        good, dead = await why(app, ok.id), await why(app, failed.id)
    assert (good.state, codes(good)) == ("succeeded", ["finished"])
    assert good.reasons[0].details["state"] == "succeeded"
    assert good.reasons[0].details["error_type"] is None
    assert (dead.state, codes(dead)) == ("failed", ["finished"])
    d = dead.reasons[0].details
    assert (d["attempts"], d["max_attempts"], d["error_type"]) == (1, 1, "KeyError")
    assert "it failed at" in dead.reasons[0].message and "KeyError" in dead.reasons[0].message


async def test_ready_when_nothing_holds_it_back(app: taskq.App, conn: asyncpg.Connection) -> None:
    @app.task(name="why.quick")
    async def quick() -> None:
        return None

    async with app:
        await app.queue("default").pause()
        job = await quick.enqueue()
        async with app.worker(concurrency=3):
            # The row lock makes the worker's claim pass over the job (SKIP
            # LOCKED) once the queue is resumed, while the snapshot reads it.
            async with conn.transaction():
                await conn.execute(
                    f'SELECT 1 FROM "{app.schema}".jobs WHERE id = $1 FOR UPDATE', job.id
                )
                await app.queue("default").resume()
                explained = await why(app, job.id)
            await until_state(job, "succeeded")
    assert codes(explained) == ["ready"]
    assert explained.reasons[0].details == {"queue": "default", "free_slots": 3}
    assert "nothing holds job" in explained.reasons[0].message


async def test_unknown_job(app: taskq.App) -> None:
    async with app:
        with pytest.raises(taskq.JobNotFound):
            await why(app, 987654321)
        with pytest.raises(taskq.JobNotFound):
            await why(app, 2**63)  # past a bigint: no such job either


# -- the command ---------------------------------------------------------------------


def jobs_why(pg_dsn: str, schema: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "taskq", "jobs", "why", *args, "--dsn", pg_dsn, "--schema", schema],
        env=subprocess_env(pg_dsn),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cli_jobs_why(app: taskq.App, pg_dsn: str, schema: str) -> None:
    @app.task(name="why.mail", queue="emails")
    async def mail() -> None:
        return None

    async with app:
        await app.queue("emails").pause()
        job = await mail.options(delay=600).enqueue()
    done = await asyncio.to_thread(jobs_why, pg_dsn, schema, str(job.id))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"job {job.id} is queued:"
    assert lines[1].startswith("  scheduled: ") and "scheduled to run at" in lines[1]
    assert lines[2] == (
        "  queue_paused: queue 'emails' is paused: none of its jobs starts until it is "
        "resumed (python -m taskq queues resume emails)"
    )
    assert lines[3].startswith("  no_workers: no worker is running")
    done = await asyncio.to_thread(jobs_why, pg_dsn, schema, str(job.id), "--json")
    assert done.returncode == 0, done.stderr
    value = json.loads(done.stdout)
    assert value["job_id"] == job.id and value["state"] == "queued"
    assert [r["code"] for r in value["reasons"]] == ["scheduled", "queue_paused", "no_workers"]
    assert value["reasons"][1]["details"] == {"queue": "emails"}
    missing = await asyncio.to_thread(jobs_why, pg_dsn, schema, "987654321")
    assert missing.returncode == 3
    assert "no job with id 987654321" in missing.stderr
