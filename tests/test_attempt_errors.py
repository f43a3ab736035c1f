"""Every attempt's error, the last progress, and the tokens kept with written outcomes.

Schema version 5: ``errors`` (the last 10 attempts' errors, tracebacks cut),
``progress`` carried to history, and ``requeued_by`` / ``history.lease_token``,
which let a worker tell its own committed outcome from a lost lease.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from datetime import datetime
from typing import Any

import anyio
import pytest

import taskq
from taskq._store import ClaimedJob, Outcome

from .conftest import PYTHON, subprocess_env

pytestmark = pytest.mark.anyio


async def execute(app: taskq.App, sql: str, *args: Any) -> Any:
    async with app.pool.acquire() as c:
        return await c.fetchval(sql.replace("{s}", f'"{app.schema}"'), *args)


async def claim_one(app: taskq.App, lease_seconds: float = 30.0) -> ClaimedJob:
    async with app.pool.acquire() as conn:
        result = await app.store.claim(
            conn,
            queues=None,
            tasks=list(app.tasks),
            limit=1,
            worker_id="test-worker",
            lease_seconds=lease_seconds,
        )
    [claimed] = result.jobs
    return claimed


async def write_back(app: taskq.App, *outcomes: Outcome) -> tuple[list[int], list[int]]:
    async with app.pool.acquire() as conn:
        return await app.store.write_back(conn, list(outcomes))


def error_text(kind: str, message: str, traceback: str = "") -> str:
    return json.dumps({"type": kind, "message": message, "traceback": traceback})


async def test_every_attempt_error_is_kept_in_order_with_its_attempt(app: taskq.App) -> None:
    runs = 0

    @app.task(retry=taskq.Retry(attempts=3, wait=0))
    async def flaky() -> str:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise ValueError(f"failure {runs}")
        return "ok"

    async with app:
        job = await flaky.enqueue()
        await app.drain()
        status = await job.status()

    assert status.state is taskq.JobState.SUCCEEDED
    assert [(e["attempt"], e["type"], e["message"]) for e in status.errors] == [
        (1, "ValueError", "failure 1"),
        (2, "ValueError", "failure 2"),
    ]
    for entry in status.errors:
        assert set(entry) == {"attempt", "type", "message", "traceback", "at"}
        assert "raise ValueError" in entry["traceback"]
        assert datetime.fromisoformat(entry["at"]) <= status.finished_at  # type: ignore[operator]
    assert status.error is None  # a succeeded job has no error; its attempts' errors stay
    assert status.to_dict()["errors"] == status.errors
    assert status.to_dict()["progress"] is None


async def test_errors_keep_the_last_ten_attempts_with_tracebacks_cut(app: taskq.App) -> None:
    @app.task(retry=taskq.Retry(attempts=12, wait=0))
    async def hopeless() -> None:
        raise RuntimeError("x" * 6000)  # its traceback is longer than 4,000 characters

    async with app:
        job = await hopeless.enqueue()
        await app.drain()
        status = await job.status()

    assert status.state is taskq.JobState.FAILED
    assert [e["attempt"] for e in status.errors] == list(range(3, 13))
    for entry in status.errors:
        assert entry["traceback"].startswith("...(truncated)...\n")
        assert len(entry["traceback"]) == len("...(truncated)...\n") + 4000
        assert entry["traceback"].rstrip().endswith("x" * 100)
        assert entry["message"] == "x" * 4000
    # The last error itself is kept as the worker wrote it.
    assert status.error is not None and status.error["message"] == "x" * 6000


async def test_rescue_adds_lease_expired_and_poison_to_the_errors(app: taskq.App) -> None:
    @app.task(retry=taskq.Retry(attempts=5))
    async def crashes() -> None:
        raise AssertionError("never run here")

    async with app:
        job = await crashes.enqueue()
        for rescue in (1, 2):
            claimed = await claim_one(app, lease_seconds=0.001)
            assert claimed.id == job.id
            await anyio.sleep(0.05)  # the lease runs out on the database clock
            async with app.pool.acquire() as conn:
                requeued, ended = await app.store.rescue_expired(conn, max_rescues=2)
            assert (requeued, ended) == (([job.id], []) if rescue == 1 else ([], [job.id]))
            # The rescued attempt's own (late) outcome is not taken for written.
            assert await write_back(app, Outcome(claimed.id, claimed.token, "succeeded")) == (
                [job.id],
                [],
            )
        status = await job.status()

    assert status.state is taskq.JobState.FAILED
    assert [(e["attempt"], e["type"]) for e in status.errors] == [
        (1, "taskq.LeaseExpired"),
        (2, "taskq.PoisonJob"),
    ]
    assert status.error is not None and status.error["type"] == "taskq.PoisonJob"


async def test_progress_goes_to_history_and_a_rerun_starts_without_it(
    app: taskq.App, pg_dsn: str
) -> None:
    @app.task(retry=taskq.Retry(attempts=2))
    async def slow() -> None:
        raise AssertionError("never run here")

    progress = {"fraction": 0.5, "message": "half way", "at": "2030-01-01T00:00:00+00:00"}
    async with app:
        job = await slow.enqueue()
        claimed = await claim_one(app)
        await execute(
            app,
            "UPDATE {s}.jobs SET progress = $2::text::jsonb WHERE id = $1",
            job.id,
            json.dumps(progress),
        )
        assert (await job.status()).progress == progress
        # A retry keeps it: the status shows the last progress reported.
        retry = Outcome(claimed.id, claimed.token, "retry", error=error_text("OSError", "one"))
        assert await write_back(app, retry) == ([], [])
        assert (await job.status()).progress == progress
        claimed = await claim_one(app)
        failed = Outcome(claimed.id, claimed.token, "failed", error=error_text("OSError", "two"))
        assert await write_back(app, failed) == ([], [])
        status = await job.status()
        assert (status.state, status.progress) == (taskq.JobState.FAILED, progress)
        assert [e["message"] for e in status.errors] == ["one", "two"]

        show = ["jobs", "show", str(job.id), "--dsn", pg_dsn, "--schema", app.schema]
        shown = subprocess.run(
            [PYTHON, "-m", "taskq", *show],
            env=subprocess_env(pg_dsn),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert "progress     50% half way (at 2030-01-01T00:00:00+00:00)" in shown.stdout
        assert "errors of the last 2 attempts:" in shown.stdout
        assert "attempt 2  " in shown.stdout and "OSError: two" in shown.stdout

        # A manual re-run keeps the errors and starts without progress.
        assert await job.retry()
        status = await job.status()
        assert (status.state, status.progress) == (taskq.JobState.QUEUED, None)
        assert [e["message"] for e in status.errors] == ["one", "two"]

        # Cancelling a queued job carries its progress and errors to history.
        await execute(
            app,
            "UPDATE {s}.jobs SET progress = $2::text::jsonb WHERE id = $1",
            job.id,
            json.dumps(progress),
        )
        assert await job.cancel()
        status = await job.status()
        assert (status.state, status.progress) == (taskq.JobState.CANCELLED, progress)
        assert len(status.errors) == 2


async def test_an_outcome_sent_again_is_recognised_as_already_written(app: taskq.App) -> None:
    """The fence still drops a stale token's outcome, but tells its own from a lost lease."""

    @app.task(retry=taskq.Retry(attempts=3))
    async def work() -> None:
        raise AssertionError("never run here")

    async with app:
        job = await work.enqueue()
        first = await claim_one(app)
        retry = Outcome(first.id, first.token, "retry", error=error_text("OSError", "again"))
        assert await write_back(app, retry) == ([], [])
        # Sent again (its reply was lost): nothing written, and it was ours.
        assert await write_back(app, retry) == ([], [job.id])
        assert await execute(app, "SELECT requeued_by FROM {s}.jobs WHERE id = $1", job.id) == (
            first.token
        )
        second = await claim_one(app)
        # The first attempt's retry is still recognised while the second runs...
        assert await write_back(app, retry) == ([], [job.id])
        done = Outcome(second.id, second.token, "succeeded", result="1")
        assert await write_back(app, done) == ([], [])
        assert await write_back(app, done) == ([], [job.id])
        # ... and after the job ended (requeued_by travels to history).
        assert await write_back(app, retry) == ([], [job.id])
        assert await execute(app, "SELECT lease_token FROM {s}.history WHERE id = $1", job.id) == (
            second.token
        )
        # A token that never wrote anything for this job is a lost lease.
        stranger = Outcome(job.id, uuid.UUID(int=1), "succeeded")
        assert await write_back(app, stranger) == ([job.id], [])
        assert len((await job.status()).errors) == 1
