"""``executor="process"``: sync tasks in a pool of real processes (tests/cpuapp.py holds them)."""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import taskq

from . import cpuapp
from .conftest import until
from .worker_process import WorkerProcess

pytestmark = pytest.mark.anyio


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


async def test_results_typed_arguments_and_errors_cross_the_process_boundary(
    app: taskq.App,
) -> None:
    whoami = app.task(name="whoami", executor="process")(cpuapp.whoami)
    shift = app.task(name="shift", executor="process")(cpuapp.shift)
    fail = app.task(name="fail", executor="process", retry=False)(cpuapp.fail)
    not_json = app.task(name="not_json", executor="process", retry=3)(cpuapp.not_json)
    start = datetime(2026, 12, 1, 14, 0, tzinfo=UTC)
    async with app:
        ran = await whoami.enqueue(n=12)
        shifted = await shift.enqueue(span=cpuapp.Span(start, 3), by=timedelta(days=2))
        failed = await fail.enqueue(message="no good: ünïcode")
        bad = await not_json.enqueue()
        stats = await app.drain(concurrency=2)
        assert (stats.succeeded, stats.failed) == (2, 2)
        result = await ran.result()
        assert result["square"] == 144
        assert result["pid"] != os.getpid()
        # Decoded by the return annotation: a dataclass holding an aware datetime.
        assert await shifted.result() == cpuapp.Span(start + timedelta(days=2), 5)
        error = (await failed.status()).error
        assert error is not None
        assert error["type"] == "tests.cpuapp.Boom"
        assert error["message"] == "no good: ünïcode"
        # The process's own traceback, down to the frame that raised.
        assert "in _deeper" in error["traceback"]
        assert "cpuapp.py" in error["traceback"]
        # A result that is not JSON fails at once, whatever the retry policy.
        status = await bad.status()
        assert status.state == "failed"
        assert status.attempts == 1
        assert status.error is not None
        assert status.error["type"] == "taskq.SerializationError"
        assert "result of task 'not_json'" in status.error["message"]
    # The worker is gone, and its processes with it.
    assert gone(result["pid"])


async def test_hooks_and_retry_policies_see_the_value_and_the_exception(app: taskq.App) -> None:
    whoami = app.task(name="whoami", executor="process")(cpuapp.whoami)
    retry = taskq.Retry(attempts=3, wait=0, on=cpuapp.Boom)
    fail = app.task(name="fail", executor="process", retry=retry)(cpuapp.fail)
    seen: list[tuple[str, type[BaseException] | None]] = []

    @app.middleware
    async def wrap(ctx: taskq.JobContext, call_next: Any) -> Any:
        value = await call_next()  # middleware runs in the worker, around the process
        return {**value, "args": ctx.args} if ctx.task == "whoami" else value

    @app.on_failure
    def failed(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        seen.append((outcome.kind, type(outcome.exception)))

    async with app:
        job = await whoami.enqueue(n=4)
        await fail.enqueue(message="again")
        await app.drain(concurrency=2)
        assert (await job.result())["args"] == {"n": 4}
    # The exception itself came back (it pickles): the policy's on= and the hook see its class.
    assert seen == [("retried", cpuapp.Boom), ("retried", cpuapp.Boom), ("failed", cpuapp.Boom)]


async def test_a_job_context_in_a_process_reports_progress(app: taskq.App) -> None:
    report = app.task(name="report", executor="process")(cpuapp.report)
    async with app:
        job = await report.enqueue(steps=50)
        await app.drain(concurrency=1)
        ran = await job.result()
        assert (ran["id"], ran["attempt"], ran["cancelled"]) == (job.id, 1, False)
        # Only progress crosses back to the worker; the rest says so.
        assert (
            "ctx.transaction() is not available in a task with executor='process'"
            in (ran["refused"])
        )
        progress = (await job.status()).progress
        assert progress is not None
        # The last value is the one recorded, however many were reported.
        assert (progress["fraction"], progress["message"]) == (1.0, "step 50 of 50")


async def test_a_timeout_kills_the_process_and_follows_the_retry_policy(
    app: taskq.App, tmp_path: Path
) -> None:
    spin = app.task(
        name="spin", executor="process", timeout=0.5, retry=taskq.Retry(attempts=2, wait=0)
    )(cpuapp.spin)
    pidfile = tmp_path / "pids"
    async with app:
        job = await spin.enqueue(pidfile=str(pidfile))
        await app.drain(concurrency=1)
        status = await job.status()
        assert status.state == "failed"
        assert status.attempts == 2
        assert status.error is not None
        assert status.error["type"] == "TimeoutError"
        assert "timeout of 0.5s" in status.error["message"]
    started = pids(pidfile)
    assert len(set(started)) == 2  # each attempt in a fresh process
    assert all(gone(pid) for pid in started)


async def test_a_process_that_dies_fails_its_job_and_the_pool_recovers(
    app: taskq.App, tmp_path: Path
) -> None:
    spin = app.task(name="spin", executor="process", retry=False)(cpuapp.spin)
    leave = app.task(name="leave", executor="process", retry=False)(cpuapp.leave)
    whoami = app.task(name="whoami", executor="process")(cpuapp.whoami)
    pidfile = tmp_path / "pids"
    async with app, app.worker(concurrency=1, poll_interval=0.2):
        killed = await spin.enqueue(pidfile=str(pidfile))
        victim = await until(lambda: _first(pidfile), 30, "the job's process to start")
        os.kill(victim, signal.SIGKILL)
        status = await until(lambda: _ended(killed), 30, "the job to fail")
        assert status.state == "failed"
        assert status.error["type"] == "taskq.worker.processes.ProcessDied"
        assert f"its process {victim} was killed by SIGKILL" in status.error["message"]

        exited = await leave.enqueue(pidfile=str(tmp_path / "left"))
        status = await until(lambda: _ended(exited), 30, "the job to fail")
        assert status.error["type"] == "taskq.worker.processes.ProcessDied"
        assert "exited with status 3" in status.error["message"]

        after = await whoami.enqueue(n=3)
        assert (await after.result(timeout=30))["square"] == 9


async def test_a_cancel_kills_the_process_running_the_job(app: taskq.App, tmp_path: Path) -> None:
    spin = app.task(name="spin", executor="process")(cpuapp.spin)
    pidfile = tmp_path / "pids"
    async with app, app.worker(concurrency=2, poll_interval=0.2):
        job = await spin.enqueue(pidfile=str(pidfile))
        pid = await until(lambda: _first(pidfile), 30, "the job's process to start")
        assert await job.cancel() is True
        status = await until(lambda: _ended(job), 30, "the job to be cancelled")
        assert status.state == "cancelled"
        await until(lambda: _async(gone(pid)), 10, f"process {pid} to end")


async def test_a_process_is_replaced_after_max_jobs_per_process(app: taskq.App) -> None:
    whoami = app.task(name="whoami", executor="process")(cpuapp.whoami)
    async with app:
        jobs = [await whoami.enqueue(n=i) for i in range(7)]
        await app.drain(concurrency=1, max_jobs_per_process=3)
        ran = [(await j.result())["pid"] for j in jobs]
    # One process at a time (concurrency 1), a fresh one after every third job.
    assert ran[0] == ran[1] == ran[2] != ran[3] == ran[4] == ran[5] != ran[6]
    assert len(set(ran)) == 3


async def test_shutdown_leaves_no_process_behind(app: taskq.App, tmp_path: Path) -> None:
    spin = app.task(name="spin", executor="process")(cpuapp.spin)
    whoami = app.task(name="whoami", executor="process")(cpuapp.whoami)
    pidfile = tmp_path / "pids"
    async with app:
        async with app.worker(concurrency=3, shutdown_timeout=0.2, process_pool_size=3):
            idle = await whoami.enqueue(n=1)
            idle_pid = (await idle.result(timeout=30))["pid"]
            job = await spin.enqueue(pidfile=str(pidfile))
            busy_pid = await until(lambda: _first(pidfile), 30, "the job's process to start")
            children = {p.pid for p in psutil.Process().children()}
            assert {idle_pid, busy_pid} <= children
        # Past its shutdown timeout the job went back to the queue, its process killed.
        assert (await job.status()).state == "queued"
    assert gone(idle_pid)
    assert gone(busy_pid)


def test_a_killed_worker_takes_its_processes_with_it(
    pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pids"

    async def enqueue() -> None:
        async with taskq.App(pg_dsn, schema=schema) as producer:
            await producer.enqueue("cpu.spin", {"pidfile": str(pidfile)})

    worker = WorkerProcess(pg_dsn, schema, "tests.cpuapp:app", tmp_path / "worker.log")
    try:
        worker.wait_for_output("started")
        anyio.run(enqueue)
        deadline = time.monotonic() + 30
        while not pids(pidfile):
            assert time.monotonic() < deadline, worker.text()
            time.sleep(0.05)
        (pid,) = pids(pidfile)
        worker.proc.kill()  # SIGKILL: no shutdown code runs in the worker
        worker.proc.wait()
        deadline = time.monotonic() + 10
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(pid)
    finally:
        worker.stop()


def test_the_worker_command_sizes_and_recycles_the_pool(
    pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    """``--process-pool-size 1 --max-jobs-per-process 2``: six jobs one after the
    other in one process at a time, each process replaced after two jobs."""

    async def run_six() -> list[int]:
        async with taskq.App(pg_dsn, schema=schema) as producer:
            pids = []
            for n in range(6):
                job = await producer.enqueue("cpu.whoami", {"n": n})
                pids.append((await job.result(timeout=60))["pid"])
            return pids

    worker = WorkerProcess(
        pg_dsn,
        schema,
        "tests.cpuapp:app",
        tmp_path / "worker.log",
        "--process-pool-size",
        "1",
        "--max-jobs-per-process",
        "2",
    )
    try:
        worker.wait_for_output("started")
        pids = anyio.run(run_six)
    finally:
        worker.stop()
    assert worker.proc.pid not in pids
    # Pairs of jobs share a process; each pair has a new one.
    assert pids[0::2] == pids[1::2], pids
    assert len(set(pids)) == 3, pids


@pytest.mark.parametrize(
    ("fn", "options", "says"),
    [
        (cpuapp.not_json, {"executor": "fork"}, "executor must be one of ['process', 'thread']"),
        (None, {"executor": "process"}, "is for plain def functions"),
        (None, {"executor": "thread"}, "executor='thread' is for plain def functions"),
        (lambda: 1, {"executor": "process"}, "needs a function defined at module level"),
        ("nested", {"executor": "process"}, "needs a function defined at module level"),
    ],
)
def test_what_a_process_cannot_run_is_refused_at_decoration(
    fn: Any, options: dict[str, Any], says: str
) -> None:
    app = taskq.App("postgresql://unused")
    if fn is None:

        async def fn() -> None:
            pass

    elif fn == "nested":

        def fn() -> None:
            pass

    with pytest.raises(taskq.ConfigurationError, match=_literal(says)):
        app.task(**options)(fn)
    assert not app.tasks


def _literal(text: str) -> str:
    return re.escape(text)


async def _first(path: Path) -> int | None:
    found = pids(path)
    return found[0] if found else None


async def _ended(job: taskq.Job) -> Any:
    status = await job.status()
    return status if status.state in ("failed", "cancelled", "succeeded") else None


async def _async(value: Any) -> Any:
    return value
