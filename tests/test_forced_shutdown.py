"""Forced shutdown (a second SIGINT) with jobs that cannot be interrupted; a third SIGINT.

Issue 13, defect 3: a second SIGINT released a sync job whose thread was still
sleeping (back in the queue: another worker could start it while it still
ran), the process then lived on until the thread returned, and a third Ctrl-C
printed a KeyboardInterrupt traceback from ``threading``. Real worker
processes, real signals.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from .worker_process import WorkerProcess

pytestmark = pytest.mark.anyio

LEASE = 4.0  # seconds


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(dsn: str, schema: str, **env: str) -> WorkerProcess:
        w = WorkerProcess(
            dsn,
            schema,
            "ctxapp:app",
            tmp_path / f"worker{len(started)}.log",
            "--lease-seconds",
            str(LEASE),
            "--poll-interval",
            "0.5",
            "--shutdown-timeout",
            "30",
            **env,
        )
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


async def enqueue(conn: asyncpg.Connection, schema: str, task: str, args: str) -> int:
    # The worker process creates the schema; the job is written as a producer
    # without the task's code would write it.
    return int(
        await conn.fetchval(
            f'INSERT INTO "{schema}".jobs (queue, task, args, max_attempts) '
            "VALUES ('default', $1, $2::jsonb, 3) RETURNING id",
            task,
            args,
        )
    )


async def job_row(conn: asyncpg.Connection, schema: str, job_id: int) -> Any:
    return await conn.fetchrow(
        f'SELECT state, lease_token, lease_expires_at, attempts FROM "{schema}".jobs WHERE id = $1',
        job_id,
    )


def wait_exit(worker: WorkerProcess, timeout: float) -> int | None:
    try:
        return worker.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


async def test_a_second_sigint_leaves_a_running_sync_job_to_its_lease_and_exits_at_once(
    pg_dsn: str, schema: str, conn: asyncpg.Connection, workers: Callable[..., WorkerProcess]
) -> None:
    first = workers(pg_dsn, schema)
    first.wait_for_output("started: concurrency")
    job_id = await enqueue(conn, schema, "ctx.nap", '{"seconds": 60}')
    first.wait_for_output("nap started")
    before = await job_row(conn, schema, job_id)
    assert before["state"] == "running"

    first.signal(signal.SIGINT)
    first.wait_for_output("SIGINT received: stopping")
    first.signal(signal.SIGINT)
    forced = time.monotonic()
    status = wait_exit(first, 5)
    exited_in = time.monotonic() - forced
    first.signal(signal.SIGINT)  # a third one, if it is still there
    if status is None:
        status = wait_exit(first, 10)
    after = await job_row(conn, schema, job_id)
    text = first.text()
    # The function still ran in its thread: the job was not put back in the
    # queue (where another worker could have started it meanwhile), its lease
    # is left to expire; the process exited at once, without waiting for the
    # thread (which ended with it), and without a traceback.
    assert {
        "state": after["state"],
        "same lease": after["lease_token"] == before["lease_token"],
        "attempts": after["attempts"],
        "exited within 5 s": exited_in < 5,
        "exit status": status,
        "traceback": "Traceback" in text,
        "thread ran to its end": "nap done" in text,
    } == {
        "state": "running",
        "same lease": True,
        "attempts": 1,
        "exited within 5 s": True,
        "exit status": 0,
        "traceback": False,
        "thread ran to its end": False,
    }, text
    assert "not returned to the queue" in text

    # A second worker, there all along: it runs the job only once the lease
    # has expired (the first process, and its thread, long gone by then).
    second = workers(pg_dsn, schema, CTXAPP_NAP="0")
    done = await finished(conn, schema, job_id, timeout=60)
    assert (done["state"], done["attempts"]) == ("succeeded", 2), second.text()
    assert done["started_at"] >= after["lease_expires_at"]


async def finished(conn: asyncpg.Connection, schema: str, job_id: int, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        row = await conn.fetchrow(
            f'SELECT state, attempts, started_at FROM "{schema}".history WHERE id = $1', job_id
        )
        if row is not None:
            return row
        assert time.monotonic() < deadline, f"job {job_id} not finished within {timeout}s"
        await asyncio.sleep(0.05)


async def test_a_third_sigint_exits_at_once_without_a_traceback(
    pg_dsn: str, schema: str, conn: asyncpg.Connection, workers: Callable[..., WorkerProcess]
) -> None:
    worker = workers(pg_dsn, schema)
    worker.wait_for_output("started: concurrency")
    job_id = await enqueue(conn, schema, "ctx.stubborn", "{}")
    worker.wait_for_output("stubborn started")

    worker.signal(signal.SIGINT)
    worker.wait_for_output("SIGINT received: stopping")
    worker.signal(signal.SIGINT)
    # The job ignores its cancellation: the worker would give it 10 s more.
    worker.wait_for_output("stubborn ignores its cancellation")
    worker.signal(signal.SIGINT)
    third = time.monotonic()
    status = wait_exit(worker, 5)
    text = worker.text()
    assert status == 130, f"exit status {status}:\n{text}"
    assert time.monotonic() - third < 5
    assert "received a third time" in text
    assert "Traceback" not in text, text
    # Left to its lease: still running under the dead process's token.
    row = await job_row(conn, schema, job_id)
    assert row["state"] == "running"
