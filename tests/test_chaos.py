"""Chaos, short form: SIGKILLs, a Postgres crash-restart and terminated backends, at once.

Three worker processes drain 3,000 jobs (a fifth of them write their effect
with ``ctx.transaction()``) on a Postgres of the test's own, while a worker is
SIGKILLed every few seconds (and replaced), Postgres is stopped with
``-m immediate`` and started again once, and random taskq backends are
terminated. The long form, with its figures, is ``python -m benchmarks.chaos``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

import taskq
from benchmarks import chaos
from taskq import _embedded


@pytest.fixture
def chaos_server(tmp_path: Path) -> Iterator[_embedded.EmbeddedServer]:
    server = chaos.own_server(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_chaos_loses_nothing_and_runs_twice_only_what_a_fault_cut(
    chaos_server: _embedded.EmbeddedServer, tmp_path: Path
) -> None:
    cfg = chaos.Config(
        jobs=3000,
        workers=3,
        concurrency=10,
        lease=2.0,
        kills=5,
        kill_every=2.5,
        restart="immediate",
        terminate_every=1.5,
        sleep="0.05:0.2",
        timeout=240,
    )
    report = asyncio.run(chaos.run(cfg, chaos_server, tmp_path))
    summary = "\n".join(report.lines())
    print(summary)
    assert len(report.kills) == cfg.kills, summary
    assert len(report.restarts) == 1 and report.terminated, summary
    assert report.worker_exits == 0, summary  # every worker rode out the restart
    assert report.lost == [] and report.stuck == [], summary
    # A job may only end failed as poison (rescued at three kills); none may just fail.
    assert set(report.failed) <= {"taskq.PoisonJob"}, summary
    assert report.succeeded + sum(report.failed.values()) == cfg.jobs, summary
    # Every job that ran twice had a run cut off (or its outcome lost) by a fault.
    assert report.unexplained == [] and report.completed_twice_unexplained == [], summary
    assert report.in_flight_at_kill > 0, summary  # the kills did hit running jobs
    # Exactly once for the jobs whose effect commits with their success.
    assert report.duplicate_effects == [] and report.missing_effects == [], summary
    # Every killed worker's jobs were taken back within the rescue bound (lease
    # plus one rescue interval, plus the polling of this test), except when
    # Postgres was down in between.
    (down, up) = report.restarts[0]
    bound = cfg.lease * 1.5 + 1.0
    for kill in report.kills:
        assert kill.rescued_after is not None, summary
        outage = up - down if kill.at <= up and kill.at + bound >= down else 0.0
        assert kill.rescued_after <= bound + outage + 5.0 * bool(outage), (kill, summary)


def test_the_chaos_accounting_tells_a_cut_run_from_an_unexplained_one() -> None:
    """The classification that the test above relies on, on made-up runs."""

    def run(n: int, pid: int, started: float, ended: float | None) -> dict[str, object]:
        return {"n": n, "kind": "work", "pid": pid, "started": started, "ended": ended}

    report = chaos.Report(
        kills=[chaos.Kill(pid=7, at=100.0, held=[1]), chaos.Kill(pid=9, at=310.0, held=[])],
        restarts=[(300.0, 301.5)],
        terminated=[200.0],
    )
    runs = [
        run(1, 7, 99.0, None),  # cut by the kill of pid 7
        run(1, 8, 104.0, 104.5),
        run(2, 7, 90.0, 99.5),  # ended, but its outcome was still in the buffer at the kill
        run(2, 8, 104.0, 104.2),
        run(3, 8, 199.0, None),  # its backend was terminated
        run(3, 9, 201.0, 201.1),
        run(4, 8, 150.0, 150.1),  # ran to its end, no fault anywhere near: a double run
        run(4, 9, 151.0, 151.1),
        run(5, 7, 50.0, 50.1),  # long before the kill of its worker
        run(5, 8, 104.0, 104.1),
        run(6, 9, 299.0, None),  # failed at the restart, long before its worker was killed
        run(6, 8, 320.0, 320.1),
    ]
    chaos.classify_runs(runs, report)
    assert report.ran_again == 6
    assert (report.in_flight_at_kill, report.in_flight_at_db_fault) == (2, 2)
    assert report.unexplained == [4, 5]
    assert report.completed_twice == 3 and report.completed_twice_unexplained == [4, 5]


class _TerminateAfterCommit(logging.Handler):
    """When the worker logs that a job's transaction committed, terminate that job's
    backend and wait until Postgres did (from a thread of its own: the worker's loop
    is blocked meanwhile, so the connection is released only after)."""

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.admin = self.call(asyncpg.connect(dsn))
        self.backends: dict[int, int] = {}
        self.fired = 0

    def call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    def emit(self, record: logging.LogRecord) -> None:
        if "transaction committed" in record.getMessage() and record.args:
            pid = self.backends.get(record.args[0])  # type: ignore[index,call-overload]
            if pid is not None:
                self.call(self.admin.execute("SELECT pg_terminate_backend($1)", pid))
                self.fired += 1

    def stop(self) -> None:
        self.call(self.admin.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.anyio
async def test_a_connection_lost_right_after_the_commit_keeps_the_tasks_result(
    app: taskq.App, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    killer = _TerminateAfterCommit(pg_dsn)
    worker_log = logging.getLogger("taskq.worker")
    worker_log.addHandler(killer)
    level = worker_log.level
    worker_log.setLevel(logging.INFO)

    @app.task
    async def settle(n: int, ctx: taskq.JobContext) -> int:
        async with ctx.transaction() as conn:
            killer.backends[ctx.id] = conn.get_server_pid()
            await conn.execute("SELECT 1")
        return n

    try:
        async with app, app.worker(concurrency=1):
            job = await settle.enqueue(n=42)
            await job.result(timeout=30)
            status = await job.status()
    finally:
        worker_log.removeHandler(killer)
        worker_log.setLevel(level)
        killer.stop()
    if not killer.fired:
        pytest.fail("the 'transaction committed' log line this test hooks into was not seen")
    assert (status.state, status.attempts) == (taskq.JobState.SUCCEEDED, 1)
    assert status.result == 42
    # The task never heard of the broken connection: no error after the
    # commit, at most one line about the connection discarded.
    worker_records = [r for r in caplog.records if r.name == "taskq.worker"]
    assert not [r.getMessage() for r in worker_records if r.levelno >= logging.WARNING]
    discarded = [r for r in worker_records if "discarded" in r.getMessage()]
    assert len(discarded) <= 1 and not any(r.exc_info for r in discarded)
