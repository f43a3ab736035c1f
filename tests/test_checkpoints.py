"""Recorded steps inside one job (ctx.step): recorded once, replayed on later attempts.

In-process here, except one test that SIGKILLs a real worker process after
its job recorded two steps and lets another worker rescue and finish it.
``crash_app`` below is the App that worker runs (``tests.test_checkpoints:crash_app``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

import taskq
from taskq import testing
from taskq._admin import purge

from .worker_process import WorkerProcess

pytestmark = pytest.mark.anyio


async def sql(app: taskq.App, query: str, *args: Any) -> Any:
    async with app.pool.acquire() as c:
        return await c.fetchval(query.replace("{s}", f'"{app.schema}"'), *args)


async def rows(app: taskq.App, query: str, *args: Any) -> list[Any]:
    async with app.pool.acquire() as c:
        return list(await c.fetch(query.replace("{s}", f'"{app.schema}"'), *args))


async def checkpoints(app: taskq.App, job_id: int) -> dict[str, tuple[Any, int]]:
    """name -> (result as JSON text, attempt) of a job's recorded steps."""
    found = await rows(
        app, "SELECT name, result::text AS r, attempt FROM {s}.job_checkpoints WHERE job_id = $1",
        job_id,
    )  # fmt: skip
    return {r["name"]: (r["r"], r["attempt"]) for r in found}


@dataclass
class Parcel:
    id: uuid.UUID
    weight: float
    sent: dt.date


WHEN = dt.datetime(2027, 3, 2, 9, 30, tzinfo=dt.UTC)
PARCEL = Parcel(uuid.UUID(int=7), 1.5, dt.date(2027, 3, 1))


async def pick_time() -> dt.datetime:
    return WHEN


def pack(weight: float, *, sent: dt.date) -> Parcel:
    return Parcel(uuid.UUID(int=7), weight, sent)


async def test_steps_are_recorded_and_replayed_as_their_annotated_types(app: taskq.App) -> None:
    seen: list[tuple[int, Any, Any]] = []

    @app.task(retry=taskq.Retry(attempts=2, wait=0))
    async def ship(ctx: taskq.JobContext) -> str:
        when = await ctx.step("pick-time", pick_time)
        parcel = await ctx.step("pack", pack, 1.5, sent=dt.date(2027, 3, 1))
        seen.append((ctx.attempt, when, parcel))
        if ctx.attempt == 1:
            raise RuntimeError("the courier is late")
        return f"{parcel.id} at {when.isoformat()}"

    async with app:
        job = await ship.enqueue()
        await app.drain()
        assert await job.result(timeout=5) == f"{PARCEL.id} at {WHEN.isoformat()}"
        recorded = await checkpoints(app, job.id)
    assert recorded == {
        "pick-time": ('"2027-03-02T09:30:00+00:00"', 1),
        "pack": (
            '{"id": "00000000-0000-0000-0000-000000000007", "sent": "2027-03-01", "weight": 1.5}',
            1,
        ),
    }
    # The second attempt got the recorded values back, of the annotated types.
    assert [s[0] for s in seen] == [1, 2]
    for _, when, parcel in seen:
        assert type(when) is dt.datetime and when == WHEN
        assert type(parcel) is Parcel and parcel == PARCEL
        assert type(parcel.id) is uuid.UUID and type(parcel.sent) is dt.date


async def test_a_retried_job_does_not_run_a_recorded_step_again(app: taskq.App) -> None:
    runs: list[int] = []  # attempts in which the step's function ran
    returned: list[str] = []

    async def charge(order: int, *, attempt: int) -> str:
        runs.append(attempt)
        return f"receipt {order} of attempt {attempt}"

    @app.task(retry=taskq.Retry(attempts=3, wait=0))
    async def pay(order: int, ctx: taskq.JobContext) -> str:
        receipt = await ctx.step("charge", charge, order, attempt=ctx.attempt)
        returned.append(receipt)
        if ctx.attempt == 1:
            raise ConnectionError("the mail server is down")
        return receipt

    async with app:
        job = await pay.enqueue(order=9)
        # Inline, as tests run jobs (taskq.testing.run_job): the same worker code.
        first = await testing.run_job(job, app=app)
        assert first.state is taskq.JobState.QUEUED and first.error is not None
        second = await testing.run_job(job, app=app)
        assert (second.state, second.attempts) == (taskq.JobState.SUCCEEDED, 2)
        assert second.result == "receipt 9 of attempt 1"
        assert await checkpoints(app, job.id) == {"charge": ('"receipt 9 of attempt 1"', 1)}
    assert runs == [1]  # ran once
    assert returned == ["receipt 9 of attempt 1"] * 2  # attempt 2 got attempt 1's value


async def test_a_step_that_raises_records_nothing_and_runs_again(app: taskq.App) -> None:
    runs: list[int] = []

    def flaky(attempt: int) -> int:
        runs.append(attempt)
        if attempt == 1:
            raise TimeoutError("try later")
        return attempt * 10

    @app.task(retry=taskq.Retry(attempts=2, wait=0))
    async def job_task(ctx: taskq.JobContext) -> int:
        return await ctx.step("flaky", flaky, ctx.attempt)

    async with app:
        job = await job_task.enqueue()
        await app.drain()
        assert await job.result(timeout=5) == 20
        status = await job.status()
        assert status.errors[0]["type"] == "TimeoutError"  # unchanged, the retry policy applied
        assert await checkpoints(app, job.id) == {"flaky": ("20", 2)}
    assert runs == [1, 2]


async def test_inside_the_transaction_the_step_and_its_record_commit_together(
    app: taskq.App,
) -> None:
    runs: list[int] = []
    visible_before_commit: list[int] = []

    async def book(conn: Any, job_id: int, attempt: int) -> int:
        runs.append(attempt)
        await conn.execute(
            f'INSERT INTO "{app.schema}".effects (job_id, attempt) VALUES ($1, $2)', job_id, attempt
        )
        return attempt

    @app.task(retry=taskq.Retry(attempts=2, wait=0))
    async def reserve(ctx: taskq.JobContext) -> int:
        async with ctx.transaction() as conn:
            booked = await ctx.step("book", book, conn, ctx.id, ctx.attempt)
            # Not committed yet: another connection sees neither the effect nor the record.
            visible_before_commit.append(
                await sql(app, "SELECT count(*) FROM {s}.job_checkpoints")
                + await sql(app, "SELECT count(*) FROM {s}.effects")
            )
            if ctx.attempt == 1:
                raise RuntimeError("roll it all back")
        return booked

    async with app:
        await sql(app, "CREATE TABLE {s}.effects (job_id bigint NOT NULL, attempt int NOT NULL)")
        job = await reserve.enqueue()
        await app.drain()
        assert await job.result(timeout=5) == 2
        # Attempt 1 rolled back its effect and its record: the step ran again
        # in attempt 2, whose effect and record committed with the job.
        effects = await rows(app, "SELECT job_id, attempt FROM {s}.effects")
        assert [tuple(r) for r in effects] == [(job.id, 2)]
        assert await checkpoints(app, job.id) == {"book": ("2", 2)}
    assert runs == [1, 2]
    assert visible_before_commit == [0, 0]


async def test_bad_steps_are_refused_clearly_and_record_nothing(app: taskq.App) -> None:
    errors: dict[str, BaseException] = {}

    def thing() -> int:
        return 1

    def not_json() -> Any:
        return object()

    def wrong_type() -> dt.datetime:
        return "no time at all"  # type: ignore[return-value]

    async def attempt(label: str, call: Any) -> None:
        try:
            await call()
        except Exception as exc:
            errors[label] = exc

    @app.task(retry=False)
    async def misuse(ctx: taskq.JobContext) -> str:
        await attempt("empty", lambda: ctx.step("", thing))
        await attempt("long", lambda: ctx.step("x" * 201, thing))
        await attempt("nul", lambda: ctx.step("a\x00b", thing))
        await attempt("surrogate", lambda: ctx.step("a\ud800", thing))
        await attempt("not a str", lambda: ctx.step(5, thing))  # type: ignore[call-overload]
        await attempt("not callable", lambda: ctx.step("n", 42))  # type: ignore[call-overload]
        assert await ctx.step("x" * 200, thing) == 1  # the longest name allowed
        assert await ctx.step("dup", thing) == 1
        await attempt("duplicate", lambda: ctx.step("dup", thing))
        await attempt("not json", lambda: ctx.step("bad", not_json))
        await attempt("wrong type", lambda: ctx.step("typed", wrong_type))
        # A call that raised recorded nothing: its name may be used again.
        assert await ctx.step("bad", thing) == 1
        return "done"

    async with app:
        job = await misuse.enqueue()
        await app.drain()
        assert await job.result(timeout=5) == "done"
        assert set(await checkpoints(app, job.id)) == {"x" * 200, "dup", "bad"}

    assert sorted(errors) == sorted(
        ["empty", "long", "nul", "surrogate", "not a str", "not callable", "duplicate",
         "not json", "wrong type"]
    )  # fmt: skip
    assert isinstance(errors["empty"], ValueError) and "name is empty" in str(errors["empty"])
    assert isinstance(errors["long"], ValueError) and "at most 200" in str(errors["long"])
    assert isinstance(errors["nul"], ValueError) and "NUL" in str(errors["nul"])
    assert isinstance(errors["surrogate"], ValueError)
    assert isinstance(errors["not a str"], TypeError)
    assert isinstance(errors["not callable"], TypeError) and "int" in str(errors["not callable"])
    assert isinstance(errors["duplicate"], RuntimeError)
    assert "ctx.step('dup') was already called in this attempt" in str(errors["duplicate"])
    for label in ("not json", "wrong type"):
        assert isinstance(errors[label], taskq.SerializationError), errors[label]
        assert "the step was not recorded" in str(errors[label])
    assert "result of step 'bad'" in str(errors["not json"])
    assert "result of step 'typed'" in str(errors["wrong type"])
    assert "datetime" in str(errors["wrong type"])


async def test_a_step_result_over_the_apps_payload_limit_is_refused(
    pg_dsn: str, schema: str
) -> None:
    app = taskq.App(pg_dsn, schema=schema, max_payload_bytes=100)
    refused: list[BaseException] = []

    @app.task(retry=False)
    async def big(ctx: taskq.JobContext) -> int:
        try:
            await ctx.step("big", lambda: "x" * 200)
        except taskq.SerializationError as exc:
            refused.append(exc)
        return len(await ctx.step("small", lambda: "x" * 50))

    async with app:
        job = await big.enqueue()
        await app.drain()
        assert await job.result(timeout=5) == 50
        assert set(await checkpoints(app, job.id)) == {"small"}
    assert len(refused) == 1 and "over the 100-byte limit" in str(refused[0])
    assert "result of step 'big'" in str(refused[0])


async def test_a_sync_task_is_told_to_be_async(app: taskq.App) -> None:
    @app.task(retry=False)
    def sync_task(ctx: taskq.JobContext) -> None:
        ctx.step("one", lambda: 1)

    async with app:
        job = await sync_task.enqueue()
        await app.drain()
        with pytest.raises(taskq.JobFailed, match=r"ctx\.step\(\) is for async def tasks"):
            await job.result(timeout=5)


async def test_a_context_made_by_hand_runs_the_step_every_time() -> None:
    calls: list[int] = []

    async def count() -> int:
        calls.append(1)
        return len(calls)

    ctx = taskq.JobContext(
        id=1, task="t", queue="q", attempt=1, max_attempts=1, priority=0, args={}, meta={},
        worker_id="w",
    )  # fmt: skip
    assert await ctx.step("count", count) == 1
    assert await ctx.step("count", count) == 2
    with pytest.raises(ValueError, match="empty"):
        ctx.step("", count)


async def test_another_attempt_that_recorded_first_wins(app: taskq.App) -> None:
    async def racing(job_id: int) -> str:
        # Meanwhile an older attempt of this job (cut off, still running)
        # records the same step.
        await sql(
            app,
            "INSERT INTO {s}.job_checkpoints (job_id, name, result, attempt) "
            "VALUES ($1, 'pick', '\"2027-01-01T00:00:00\"', 1)",
            job_id,
        )
        return "2027-06-06T00:00:00"

    @app.task
    async def pick(ctx: taskq.JobContext) -> str:
        value = await ctx.step("pick", racing, ctx.id)
        return f"{type(value).__name__} {value}"

    async with app:
        job = await pick.enqueue()
        await app.drain()
        assert await job.result(timeout=5) == "str 2027-01-01T00:00:00"
        assert await checkpoints(app, job.id) == {"pick": ('"2027-01-01T00:00:00"', 1)}


async def test_a_lost_lease_records_nothing_and_cancels_the_task(
    app: taskq.App, caplog: pytest.LogCaptureFixture
) -> None:
    first_done = anyio.Event()
    taken = anyio.Event()
    ran: list[str] = []
    seen: list[str] = []

    async def work(name: str) -> str:
        ran.append(name)
        return name

    @app.task
    async def late(ctx: taskq.JobContext) -> None:
        try:
            await ctx.step("first", work, "first")
            first_done.set()
            await taken.wait()
            await ctx.step("second", work, "second")
            ran.append("after")
        except asyncio.CancelledError as exc:
            seen.append(str(exc))
            raise

    async with app:
        job = await late.enqueue()
        async with app.worker() as worker:
            await first_done.wait()
            # A rescue and another claim, as if this worker had been cut off.
            await sql(
                app, "UPDATE {s}.jobs SET lease_token = gen_random_uuid() WHERE id = $1", job.id
            )
            taken.set()
            with anyio.fail_after(10):
                while worker.running_jobs:
                    await anyio.sleep(0.02)
            assert worker.stats.lost == 1
        assert set(await checkpoints(app, job.id)) == {"first"}
        status = await job.status()
    assert status.state is taskq.JobState.RUNNING  # the other lease's now
    assert ran == ["first", "second"]  # the step ran; its record was refused
    assert seen == [f"job {job.id}: lease lost before step 'second' was recorded"]
    assert any("lease was lost before step 'second' was recorded" in r.getMessage()
               for r in caplog.records)  # fmt: skip


# -- pruning and purging ----------------------------------------------------------


async def history_row(app: taskq.App, job_id: int, age_days: float, workflow: int | None) -> None:
    await sql(
        app,
        "INSERT INTO {s}.history (id, queue, task, args, state, priority, attempts, "
        "max_attempts, enqueued_at, finished_at, workflow_id) VALUES ($1, 'q', 't', '{}', "
        "'succeeded', 0, 1, 1, now() - make_interval(days => 30), "
        "now() - make_interval(secs => $2 * 86400), $3)",
        job_id,
        age_days,
        workflow,
    )
    await sql(
        app,
        "INSERT INTO {s}.job_checkpoints (job_id, name, result, attempt) VALUES ($1, 'a', '1', 1)",
        job_id,
    )


async def test_prune_takes_checkpoints_keeps_running_workflows_and_ends_old_ones(
    app: taskq.App,
) -> None:
    async with app:
        # Workflows: 1 running, 2 finished 10 days ago, 3 finished just now.
        for wf, finished in ((1, None), (2, 10.0), (3, 0.0)):
            await sql(
                app,
                "INSERT INTO {s}.workflows (id, name, steps, finished_at, state) VALUES ($1, "
                "'wf', 1, now() - make_interval(secs => $2 * 86400), "
                "CASE WHEN $2 IS NULL THEN 'running' ELSE 'succeeded' END)",
                wf,
                finished,
            )
        await sql(
            app,
            "INSERT INTO {s}.workflow_steps (job_id, workflow_id, name, parents, pending) "
            "VALUES (21, 2, 's', 0, 0), (31, 3, 's', 0, 0)",
        )
        await history_row(app, 10, 9.0, None)  # old plain job: pruned
        await history_row(app, 11, 0.0, None)  # recent: kept
        await history_row(app, 12, 9.0, 1)  # old step of a running workflow: kept
        await history_row(app, 21, 9.0, 2)  # old step of a finished workflow: pruned
        await history_row(app, 31, 9.0, 3)  # old step of a workflow finished now: pruned
        # A running job's checkpoints are not history's to prune.
        await sql(
            app, "INSERT INTO {s}.job_checkpoints (job_id, name, attempt) VALUES (99, 'a', 1)"
        )

        deleted = await sql(app, "SELECT {s}.prune($1, 100)", 7 * 86400.0)
        assert deleted == 3
        remaining = await rows(app, "SELECT id FROM {s}.history ORDER BY id")
        assert [r["id"] for r in remaining] == [11, 12]
        kept = await rows(app, "SELECT DISTINCT job_id FROM {s}.job_checkpoints ORDER BY 1")
        assert [r["job_id"] for r in kept] == [11, 12, 99]
        workflows = await rows(app, "SELECT id FROM {s}.workflows ORDER BY id")
        assert [r["id"] for r in workflows] == [1, 3]
        steps = await rows(app, "SELECT job_id FROM {s}.workflow_steps")
        assert [r["job_id"] for r in steps] == [31]  # workflow 2's went with it

        # Bounded by p_limit, both kinds: one row per call.
        await history_row(app, 40, 9.0, None)
        await history_row(app, 41, 9.0, None)
        for wf in (4, 5):
            await sql(
                app,
                "INSERT INTO {s}.workflows (id, name, steps, finished_at, state) "
                "VALUES ($1, 'wf', 1, now() - interval '9 days', 'failed')",
                wf,
            )
        assert await sql(app, "SELECT {s}.prune($1, 1)", 7 * 86400.0) == 1
        assert await sql(app, "SELECT count(*) FROM {s}.history WHERE id >= 40") == 1
        assert await sql(app, "SELECT count(*) FROM {s}.workflows WHERE id >= 4") == 1


async def test_purge_takes_the_checkpoints_of_the_jobs_it_deletes(app: taskq.App) -> None:
    async with app:
        for job_id in (1, 3, 5):
            await history_row(app, job_id, 1.0, None)
        await sql(app, "UPDATE {s}.history SET state = 'failed' WHERE id = 3")
        # A live job inside the range walked, and checkpoints left by a job that is gone.
        await sql(app, "INSERT INTO {s}.jobs (id, queue, task) VALUES (2, 'q', 't')")
        await sql(
            app,
            "INSERT INTO {s}.job_checkpoints (job_id, name, attempt) VALUES (2, 'a', 1), "
            "(4, 'a', 1)",
        )
        deleted = await purge(
            app.database, app.schema, states=["succeeded"], finished_before=None, last_id=5,
            batch_size=1,
        )  # fmt: skip
        assert deleted == 2
        kept = await rows(app, "SELECT DISTINCT job_id FROM {s}.job_checkpoints ORDER BY 1")
        # Jobs 1 and 5 went with theirs (and the stray 4 in their range); the
        # failed job 3 was not purged, job 2 is live.
        assert [r["job_id"] for r in kept] == [2, 3]


# -- a real worker process, SIGKILLed after its job recorded two steps ----------------

crash_app = taskq.App()  # $TASKQ_DSN and $TASKQ_SCHEMA, in the worker process

LEDGER_SQL = """
CREATE TABLE {s}.ledger (
    job_id  bigint  NOT NULL,
    event   text    NOT NULL,
    attempt integer NOT NULL,
    pid     integer NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


async def ledger(ctx: taskq.JobContext, event: str) -> str:
    """One ledger row, committed on its own before this returns."""
    async with crash_app.pool.acquire() as conn:
        await conn.execute(
            f'INSERT INTO "{crash_app.schema}".ledger (job_id, event, attempt, pid) '
            "VALUES ($1, $2, $3, $4)",
            ctx.id,
            event,
            ctx.attempt,
            os.getpid(),
        )
    return f"{event} in {os.getpid()}"


@crash_app.task(name="ckpt.crash", retry=taskq.Retry(attempts=3, wait=0))
async def crash(ctx: taskq.JobContext) -> str:
    one = await ctx.step("one", ledger, ctx, "one")
    two = await ctx.step("two", ledger, ctx, "two")
    await ledger(ctx, "after the steps")
    if ctx.attempt == 1:
        print(f"steps recorded: job {ctx.id}", flush=True)
        await asyncio.sleep(3600)  # killed here
    return f"{one}, {two}"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        w.stop()


def start_worker(dsn: str, schema: str, log: Path) -> WorkerProcess:
    return WorkerProcess(
        dsn,
        schema,
        "tests.test_checkpoints:crash_app",
        log,
        "--lease-seconds",
        "2",  # a killed worker's job is rescued a few seconds later
        "--poll-interval",
        "0.5",
    )


async def test_a_job_rescued_after_sigkill_does_not_run_its_recorded_steps_again(
    pg_dsn: str, schema: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    app = taskq.App(pg_dsn, schema=schema)
    app.task(name="ckpt.crash")(lambda: None)  # to enqueue it by name; runs elsewhere
    async with app:
        await sql(app, LEDGER_SQL)
        job = await app.tasks["ckpt.crash"].enqueue()
        doomed = start_worker(pg_dsn, schema, tmp_path / "doomed.log")
        workers.append(doomed)
        await anyio.to_thread.run_sync(doomed.wait_for_output, f"steps recorded: job {job.id}")
        doomed.proc.send_signal(signal.SIGKILL)
        await anyio.to_thread.run_sync(doomed.proc.wait, 10)
        pid = doomed.proc.pid
        assert await checkpoints(app, job.id) == {
            "one": (f'"one in {pid}"', 1),
            "two": (f'"two in {pid}"', 1),
        }

        workers.append(start_worker(pg_dsn, schema, tmp_path / "rescuer.log"))
        # The rescue puts the job back once the dead worker's lease expired.
        assert await job.result(timeout=60) == f"one in {pid}, two in {pid}"
        status = await job.status()
        assert (status.state, status.attempts) == (taskq.JobState.SUCCEEDED, 2)
        assert status.errors[-1]["type"] == "taskq.LeaseExpired"

        ledger_rows = await rows(
            app, "SELECT event, attempt, pid FROM {s}.ledger WHERE job_id = $1 ORDER BY at", job.id
        )
        events = [(r["event"], r["attempt"], r["pid"] == pid) for r in ledger_rows]
        # Each recorded step ran exactly once, in the killed process; the
        # second attempt ran (in the other process) after them, without them.
        assert events == [
            ("one", 1, True),
            ("two", 1, True),
            ("after the steps", 1, True),
            ("after the steps", 2, False),
        ]
