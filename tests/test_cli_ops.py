"""Operator commands (status, jobs, retry, cancel, purge), run as real subprocesses
against a real Postgres, error paths included."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import subprocess
import time
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest

import taskq

from .conftest import PYTHON, subprocess_env

pytestmark = pytest.mark.anyio

# The keys of `jobs show --json` and of each `jobs list --json` item.
JOB_KEYS = {
    "id",
    "task",
    "queue",
    "state",
    "args",
    "priority",
    "attempts",
    "max_attempts",
    "enqueued_at",
    "run_at",
    "started_at",
    "finished_at",
    "error",
    "result",
    "worker_id",
    "unique_key",
    "meta",
    "errors",
    "progress",
    "rescues",
    "cancel_requested",
    "workflow_id",
    "step",
    "waiting_for",
}


def command(pg_dsn: str, schema: str, *args: str) -> list[str]:
    dsn = [] if "--dsn" in args else ["--dsn", pg_dsn]
    return [PYTHON, "-m", "taskq", *args, *dsn, "--schema", schema]


def cli(
    pg_dsn: str, schema: str, *args: str, stdin: Any = subprocess.DEVNULL
) -> subprocess.CompletedProcess[str]:
    """``python -m taskq ARGS --dsn DSN --schema SCHEMA`` (the options go to the subcommand)."""
    return subprocess.run(
        command(pg_dsn, schema, *args),
        env=subprocess_env(pg_dsn),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=stdin,
    )


def popen(pg_dsn: str, schema: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(pg_dsn, schema, *args),
        env=subprocess_env(pg_dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def table(stdout: str) -> dict[str, list[str]]:
    """The first table of the output: {first cell: other cells}."""
    rows: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


async def add_history(
    conn: asyncpg.Connection,
    schema: str,
    count: int,
    *,
    queue: str,
    task: str,
    state: str,
    age: timedelta = timedelta(0),
    unique_key: str | None = None,
) -> None:
    """Finished jobs written straight into history (ids from the jobs sequence)."""
    await conn.execute(
        f'INSERT INTO "{schema}".history (id, queue, task, args, state, priority, attempts, '
        "max_attempts, enqueued_at, finished_at, error, unique_key, meta) "
        f"SELECT nextval(pg_get_serial_sequence('\"{schema}\".jobs', 'id')), $1, $2, "
        "jsonb_build_object('n', g), $3, 0, 3, 3, now() - $4::interval, "
        "now() - $4::interval, CASE WHEN $3 = 'failed' THEN "
        """'{"type": "ValueError", "message": "boom", "traceback": ""}'::jsonb END, $6, """
        "jsonb_build_object('n', g) FROM generate_series(1, $5) AS g",
        queue,
        task,
        state,
        age,
        count,
        unique_key,
    )


async def wait_until_running(job: taskq.Job) -> None:
    deadline = time.monotonic() + 30
    while (await job.status()).state is not taskq.JobState.RUNNING:
        assert time.monotonic() < deadline, "the job never started"
        await asyncio.sleep(0.05)


async def test_status_counts_queues_and_lists_workers(pg_dsn: str, schema: str) -> None:
    app = taskq.App(pg_dsn, schema=schema)

    @app.task(name="ops.ok", queue="alpha")
    async def ok() -> None:
        return None

    @app.task(name="ops.bad", queue="beta", retry=False)
    async def bad() -> None:
        raise ValueError("no")

    async with app:
        await ok.enqueue_many([{}] * 3)
        await ok.options(delay=3600).enqueue()
        await bad.enqueue_many([{}] * 2)
        await app.drain(queues=["beta"])
        await app.queue("alpha").pause()
        async with app.pool.acquire() as conn:
            await conn.execute(
                f'INSERT INTO "{schema}".workers (id, hostname, pid, queues, tasks, concurrency) '
                "VALUES ('w-1', 'host-a', 4242, '{alpha}', '{ops.ok}', 8)"
            )

    done = cli(pg_dsn, schema, "status")
    assert done.returncode == 0, done.stderr
    rows = table(done.stdout)
    assert rows["queue"] == [
        "state",
        "queued",
        "scheduled",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    ]
    assert rows["alpha"] == ["paused", "3", "1", "0", "0", "0", "0"]
    assert rows["beta"] == ["active", "0", "0", "0", "0", "2", "0"]
    assert "1 worker:" in done.stdout
    worker_line = next(line for line in done.stdout.splitlines() if line.startswith("w-1"))
    assert worker_line.split()[:6] == ["w-1", "host-a", "4242", "8", "0", "alpha"]

    as_json = cli(pg_dsn, schema, "status", "--json", "--window", "1h")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["schema"] == schema
    assert report["window_seconds"] == 3600
    datetime.fromisoformat(report["time"])
    assert {q["name"]: q for q in report["queues"]}["beta"] == {
        "name": "beta",
        "paused": False,
        "waiting": 0,
        "queued": 0,
        "scheduled": 0,
        "running": 0,
        "succeeded": 0,
        "failed": 2,
        "cancelled": 0,
    }
    [worker] = report["workers"]
    assert (worker["id"], worker["pid"], worker["queues"], worker["running"]) == (
        "w-1",
        4242,
        ["alpha"],
        0,
    )
    assert worker["heartbeat_age_seconds"] >= 0
    datetime.fromisoformat(worker["heartbeat_at"])


async def test_status_watch_prints_frames_until_a_signal_then_exits_0(
    pg_dsn: str, schema: str
) -> None:
    async with taskq.App(pg_dsn, schema=schema):
        pass
    text = popen(pg_dsn, schema, "status", "--watch", "0.2")
    lines = popen(pg_dsn, schema, "status", "--watch", "0.2", "--json")
    try:

        def read(proc: subprocess.Popen[str], wanted: int, marker: str) -> list[str]:
            assert proc.stdout is not None
            seen = []
            for line in proc.stdout:
                seen.append(line)
                if sum(marker in x for x in seen) >= wanted:
                    break
            return seen

        frames, json_frames = await asyncio.wait_for(
            asyncio.gather(
                asyncio.to_thread(read, text, 2, "taskq status"),
                asyncio.to_thread(read, lines, 2, '"queues"'),
            ),
            30,
        )
        text.send_signal(signal.SIGINT)
        lines.send_signal(signal.SIGTERM)
        text_rest, text_err = text.communicate(timeout=30)
        _, json_err = lines.communicate(timeout=30)
    finally:
        for proc in (text, lines):
            if proc.poll() is None:
                proc.kill()
    # Stopping a watch is its normal end: exit 0, no traceback.
    assert (text.returncode, lines.returncode) == (0, 0), text_err + json_err
    assert "Traceback" not in text_err + json_err
    headers = [x for x in frames + text_rest.splitlines() if x.startswith("taskq status")]
    assert len(headers) >= 2
    assert f"schema {schema!r}" in headers[0] and "finished: last 1m" in headers[0]
    for line in json_frames:
        frame = json.loads(line)
        assert frame["window_seconds"] == 60 and frame["queues"] == []


async def test_jobs_list_and_show(pg_dsn: str, schema: str) -> None:
    app = taskq.App(pg_dsn, schema=schema)

    @app.task(name="ops.ok")
    async def ok(n: int) -> dict[str, int]:
        return {"n": n}

    @app.task(name="ops.bad", queue="risky", retry=False)
    async def bad(n: int) -> None:
        raise ValueError(f"bad input {n}")

    async with app:
        good = await ok.options(meta={"tenant": "acme"}, unique_key="ok:1").enqueue(n=1)
        failed = await bad.enqueue(n=7)
        await app.drain()
        queued = await ok.enqueue(n=2)

    shown = cli(pg_dsn, schema, "jobs", "show", str(failed.id), "--json")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert set(detail) == JOB_KEYS
    assert (detail["state"], detail["queue"], detail["attempts"]) == ("failed", "risky", 1)
    assert detail["error"]["type"] == "ValueError"
    assert detail["error"]["message"] == "bad input 7"
    assert 'raise ValueError(f"bad input {n}")' in detail["error"]["traceback"]
    datetime.fromisoformat(detail["finished_at"])
    [attempt] = detail["errors"]
    assert (attempt["attempt"], attempt["type"], attempt["message"]) == (
        1,
        "ValueError",
        "bad input 7",
    )
    assert detail["progress"] is None

    detail = json.loads(cli(pg_dsn, schema, "jobs", "show", str(good.id), "--json").stdout)
    assert (detail["result"], detail["meta"], detail["unique_key"]) == (
        {"n": 1},
        {"tenant": "acme"},
        "ok:1",
    )
    assert detail["worker_id"]

    text = cli(pg_dsn, schema, "jobs", "show", str(failed.id))
    assert text.returncode == 0, text.stderr
    assert f"job {failed.id}" in text.stdout
    assert "error        ValueError: bad input 7" in text.stdout
    assert "traceback:" in text.stdout and "Traceback (most recent call last)" in text.stdout
    assert "errors of the last 1 attempt:" in text.stdout
    assert "attempt 1  " in text.stdout and text.stdout.rstrip().endswith("ValueError: bad input 7")

    def ids(*args: str) -> list[int]:
        done = cli(pg_dsn, schema, "jobs", "list", "--json", *args)
        assert done.returncode == 0, done.stderr
        items = json.loads(done.stdout)
        assert all(set(item) == JOB_KEYS for item in items)
        return [item["id"] for item in items]

    assert ids() == [queued.id, failed.id, good.id]  # newest first
    assert ids("--state", "failed") == [failed.id]
    assert ids("--state", "queued", "--state", "succeeded") == [queued.id, good.id]
    assert ids("--task", "ops.ok") == [queued.id, good.id]
    assert ids("--queue", "risky") == [failed.id]
    assert ids("--limit", "1") == [queued.id]

    listed = cli(pg_dsn, schema, "jobs", "list")
    rows = table(listed.stdout)
    assert rows["id"] == [
        "state",
        "queue",
        "task",
        "attempts",
        "enqueued",
        "finished",
        "error",
    ]
    assert rows[str(failed.id)][:4] == ["failed", "risky", "ops.bad", "1/1"]
    assert "ValueError: bad input 7" in listed.stdout

    missing = cli(pg_dsn, schema, "jobs", "show", "99999999")
    assert missing.returncode == 3
    assert missing.stderr == f"taskq: error: no job with id 99999999 in schema {schema!r}\n"


async def test_jobs_list_task_by_its_short_name_or_a_suggestion(pg_dsn: str, schema: str) -> None:
    app = taskq.App(pg_dsn, schema=schema)

    @app.task(name="gjobs.store")
    async def store(n: int) -> None:
        return None

    @app.task(name="gjobs.fetch")
    async def fetch(n: int) -> None:
        return None

    @app.task(name="mirror.fetch")
    async def mirror_fetch(n: int) -> None:
        return None

    async with app:
        await app.drain()  # registers the three tasks; there is no job yet
        stored = [await store.enqueue(n=i) for i in range(2)]
        await fetch.enqueue(n=1)
        async with app.pool.acquire() as conn:
            # Finished jobs of a task that no worker registered and no live job names.
            await add_history(conn, schema, 2, queue="q", task="legacy.export", state="cancelled")

    def listed(task: str) -> list[int]:
        done = cli(pg_dsn, schema, "jobs", "list", "--json", "--task", task)
        assert done.returncode == 0, done.stderr
        return [item["id"] for item in json.loads(done.stdout)]

    def refused(task: str) -> str:
        done = cli(pg_dsn, schema, "jobs", "list", "--task", task)
        assert (done.returncode, done.stdout) == (2, ""), done
        return done.stderr

    newest_first = [j.id for j in reversed(stored)]
    assert listed("gjobs.store") == newest_first
    assert listed("store") == newest_first  # the one known task whose name ends with it
    assert len(listed("legacy.export")) == 2  # known to history only, by its full name
    where = f"in schema {schema!r}"
    assert refused("fetch") == (
        f"taskq: error: 2 tasks are named 'fetch' {where}: 'gjobs.fetch', 'mirror.fetch'; "
        "give the full name\n"
    )
    assert refused("stor") == (
        f"taskq: error: no task named 'stor' {where}; did you mean 'gjobs.store'?\n"
    )
    assert refused("gjobs.stroe") == (
        f"taskq: error: no task named 'gjobs.stroe' {where}; did you mean 'gjobs.store'?\n"
    )
    assert refused("fetc") == (
        f"taskq: error: no task named 'fetc' {where}; "
        "did you mean 'gjobs.fetch' or 'mirror.fetch'?\n"
    )
    assert refused("zzz") == (
        f"taskq: error: no task named 'zzz' {where} "
        "(known tasks: 'gjobs.fetch', 'gjobs.store', 'mirror.fetch')\n"
    )


async def test_retry_named_jobs_and_a_unique_job_whose_key_is_held(
    pg_dsn: str, schema: str
) -> None:
    app = taskq.App(pg_dsn, schema=schema)

    @app.task(name="ops.report", retry=taskq.Retry(attempts=2, wait=0))
    async def report(n: int) -> None:
        raise ValueError(f"report {n} failed")

    @app.task(name="ops.ok")
    async def ok() -> None:
        return None

    async with app:
        job = await report.options(unique_key="report:1", meta={"trace_id": "t-1"}).enqueue(n=1)
        done_job = await ok.enqueue()
        await app.drain()
        assert (await job.status()).attempts == 2
        # A new job holds the key now: the failed one must not go back beside it.
        holder = await report.options(unique_key="report:1").enqueue(n=2)
        assert not holder.duplicate

        held = cli(pg_dsn, schema, "retry", str(job.id), str(done_job.id), "99999999")
        assert held.returncode == 3  # an unknown id
        assert "retried 0 jobs" in held.stdout
        assert f"whose unique key a live job holds (they stay in history): {job.id}" in (
            held.stdout
        )
        assert f"job {done_job.id}: not retried: its state is succeeded" in held.stdout
        assert "taskq: error: no job with id 99999999" in held.stderr
        assert (await job.status()).state is taskq.JobState.FAILED

        await holder.cancel()
        retried = cli(pg_dsn, schema, "retry", str(job.id), "--json")
        assert retried.returncode == 0, retried.stderr
        assert json.loads(retried.stdout) == {
            "matched": 1,
            "retried": 1,
            "retried_ids": [job.id],
            "key_held": [],
            "skipped": [],
            "not_found": [],
            "workflow_steps": {"skipped": 0, "ids": [], "workflows": []},
        }
        status = await job.status()
        # Like Job.retry(): a fresh attempt budget, due now, with its key, meta
        # and last error kept.
        assert (status.state, status.attempts, status.max_attempts) == (
            taskq.JobState.QUEUED,
            0,
            2,
        )
        assert (status.unique_key, status.meta) == ("report:1", {"trace_id": "t-1"})
        assert status.error is not None and status.error["message"] == "report 1 failed"
        assert (await app.drain()).failed == 1  # it ran again, twice
        assert (await job.status()).attempts == 2


async def test_bulk_retry_of_thousands_in_batches_with_progress(pg_dsn: str, schema: str) -> None:
    app = taskq.App(pg_dsn, schema=schema)
    ran: list[int] = []

    @app.task(name="ops.flaky", queue="bulk")
    async def flaky(n: int) -> None:
        ran.append(n)

    async with app, app.pool.acquire() as conn:
        await add_history(conn, schema, 2998, queue="bulk", task="ops.flaky", state="failed")
        # Two dead letters with one unique key: only one of them can go back.
        await add_history(
            conn, schema, 2, queue="bulk", task="ops.flaky", state="failed", unique_key="dup"
        )
        await add_history(conn, schema, 5, queue="bulk", task="ops.other", state="failed")
        await add_history(conn, schema, 7, queue="bulk", task="ops.flaky", state="cancelled")

        dry = cli(pg_dsn, schema, "retry", "--queue", "bulk", "--task", "ops.flaky", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would retry 3,000 jobs (failed jobs of queue 'bulk' and task 'ops.flaky')" in (
            dry.stdout
        )
        assert "1 job of them would stay in history" in dry.stdout
        assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".jobs') == 0

        done = cli(pg_dsn, schema, "retry", "--queue", "bulk", "--task", "ops.flaky")
        assert done.returncode == 0, done.stderr
        assert "retried 2,999 jobs" in done.stdout
        assert "not retried: 1 job whose unique key a live job holds" in done.stdout
        progress = done.stderr.splitlines()
        assert progress[0] == "retrying 1,000/3,000"
        assert progress[-1] == "retrying 3,000/3,000"

        live = await conn.fetchrow(
            "SELECT count(*) AS n, max(attempts) AS attempts, count(meta) AS with_meta, "
            f"count(unique_key) AS keyed FROM \"{schema}\".jobs WHERE state = 'queued'"
        )
        assert dict(live) == {"n": 2999, "attempts": 0, "with_meta": 2999, "keyed": 1}
        left = await conn.fetch(
            f'SELECT task, state, count(*) AS n FROM "{schema}".history GROUP BY 1, 2 ORDER BY 1, 2'
        )
        assert [tuple(r) for r in left] == [
            ("ops.flaky", "cancelled", 7),
            ("ops.flaky", "failed", 1),
            ("ops.other", "failed", 5),
        ]
        assert (await app.drain(queues=["bulk"])).succeeded == 2999
        assert len(ran) == 2999

        # --all with --state cancelled takes the cancelled ones only.
        everything = cli(pg_dsn, schema, "retry", "--all", "--state", "cancelled", "--json")
        assert everything.returncode == 0, everything.stderr
        assert json.loads(everything.stdout)["retried"] == 7


async def test_cancel_queued_jobs_and_a_running_job_in_a_worker_process(
    pg_dsn: str, schema: str
) -> None:
    app = taskq.App(pg_dsn, schema=schema)
    app.task(name="cli.sleep", retry=taskq.Retry(attempts=1))(lambda seconds: None)
    app.task(name="cli.add", queue="math")(lambda a, b: a + b)
    app.task(name="cli.pid")(lambda: 0)
    async with app:
        worker = subprocess.Popen(
            [PYTHON, "-m", "taskq", "worker", "workerapp:app", "--shutdown-timeout", "1"],
            env=subprocess_env(pg_dsn, TASKQ_SCHEMA=schema),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            finished = await app.enqueue("cli.pid")
            assert await finished.result(timeout=60) == worker.pid
            await app.queue("math").pause()  # keeps the adds queued
            adds = [await app.enqueue("cli.add", {"a": i, "b": 1}) for i in range(3)]
            sleeper = await app.enqueue("cli.sleep", {"seconds": 3600})
            await wait_until_running(sleeper)

            done = cli(
                pg_dsn,
                schema,
                "cancel",
                str(sleeper.id),
                str(adds[0].id),
                str(finished.id),
                "99999999",
            )
            assert done.returncode == 3, done.stderr  # an unknown id
            assert (
                "cancelled 1 queued job; asked the workers of 1 running job to stop them"
                in done.stdout
            )
            assert f"job {finished.id}: not cancelled: it has already finished (succeeded)" in (
                done.stdout
            )
            assert "taskq: error: no job with id 99999999" in done.stderr
            # The worker got the request and cancelled the coroutine.
            with pytest.raises(taskq.JobCancelled):
                await sleeper.result(timeout=30)
            with pytest.raises(taskq.JobCancelled):
                await adds[0].result(timeout=5)

            dry = cli(pg_dsn, schema, "cancel", "--queue", "math", "--dry-run", "--json")
            assert json.loads(dry.stdout) == {
                "dry_run": True,
                "queued": 2,
                "running": 0,
                "waiting": 0,
                "workflow_steps": 0,
            }
            bulk = cli(pg_dsn, schema, "cancel", "--queue", "math", "--state", "queued", "--json")
            assert bulk.returncode == 0, bulk.stderr
            result = json.loads(bulk.stdout)
            assert (result["cancelled"], result["cancel_requested"]) == (2, 0)
            assert sorted(result["cancelled_ids"]) == sorted(j.id for j in adds[1:])
            for job in adds[1:]:
                assert (await job.status()).state is taskq.JobState.CANCELLED
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            finally:
                if worker.poll() is None:
                    worker.kill()


async def test_purge_needs_yes_for_everything_and_for_dead_letters(
    pg_dsn: str, schema: str
) -> None:
    app = taskq.App(pg_dsn, schema=schema)
    async with app, app.pool.acquire() as conn:
        old = timedelta(days=10)
        await add_history(conn, schema, 1500, queue="q", task="t", state="succeeded", age=old)
        await add_history(conn, schema, 20, queue="q", task="t", state="cancelled", age=old)
        await add_history(conn, schema, 40, queue="q", task="t", state="failed", age=old)
        await add_history(conn, schema, 30, queue="q", task="t", state="succeeded")

        async def counts() -> dict[str, int]:
            rows = await conn.fetch(
                f'SELECT state, count(*) FROM "{schema}".history GROUP BY 1 ORDER BY 1'
            )
            return {r[0]: r[1] for r in rows}

        before = await counts()
        # No terminal on stdin (CI): refused at once, nothing deleted.
        everything = cli(pg_dsn, schema, "purge")
        assert everything.returncode == 2
        assert "add --yes" in everything.stderr and "of any age" in everything.stderr
        dead = cli(pg_dsn, schema, "purge", "--older-than", "7d", "--state", "failed")
        assert dead.returncode == 2 and "dead letters" in dead.stderr
        assert await counts() == before

        dry = cli(pg_dsn, schema, "purge", "--older-than", "7d", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would delete 1,520 jobs" in dry.stdout

        done = cli(pg_dsn, schema, "purge", "--older-than", "7d")
        assert done.returncode == 0, done.stderr
        assert "deleted 1,520 jobs" in done.stdout
        assert done.stderr.splitlines() == ["deleting 1,000/1,520", "deleting 1,520/1,520"]
        assert await counts() == {"failed": 40, "succeeded": 30}

        dead = cli(pg_dsn, schema, "purge", "--older-than", "7d", "--state", "failed", "--yes")
        assert dead.returncode == 0, dead.stderr
        assert await counts() == {"succeeded": 30}

        # On a terminal it asks; "y" confirms.
        master, slave = pty.openpty()
        try:
            os.write(master, b"y\n")
            asked = cli(pg_dsn, schema, "purge", "--json", stdin=slave)
        finally:
            os.close(slave)
            os.close(master)
        assert asked.returncode == 0, asked.stderr
        assert "Delete 30 jobs" in asked.stderr and "[y/N]" in asked.stderr
        assert json.loads(asked.stdout) == {"deleted": 30}
        assert await counts() == {}


async def test_error_paths_exit_codes_and_one_line_messages(pg_dsn: str, schema: str) -> None:
    unreachable = cli(
        pg_dsn, schema, "status", "--dsn", "postgresql://nobody:hunter2@127.0.0.1:1/nothing"
    )
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("taskq: error: connecting to Postgres failed")
    assert "cannot reach Postgres" in unreachable.stderr
    assert "postgresql://nobody:***@127.0.0.1:1/nothing" in unreachable.stderr
    assert "hunter2" not in unreachable.stderr
    assert unreachable.stderr.count("\n") == 1

    invalid = cli(pg_dsn, schema, "jobs", "list", "--dsn", "not a dsn")
    assert invalid.returncode == 1
    assert invalid.stderr.startswith("taskq: error: invalid DSN 'not a dsn'")

    missing = cli(pg_dsn, schema, "retry", "--all")
    assert missing.returncode == 1
    assert "is not installed" in missing.stderr and "python -m taskq migrate" in missing.stderr

    usage = [
        ("retry",),
        ("retry", "1", "--all"),
        ("retry", "--all", "--queue", "q"),
        ("cancel",),
        ("cancel", "1", "--state", "queued"),
        ("jobs", "list", "--limit", "0"),
        ("jobs", "list", "--state", "lost"),
        ("jobs", "show", "abc"),
        ("purge", "--older-than", "3x"),
        ("status", "--watch", "0"),
        ("status", "--window", "soon"),
    ]
    procs = [popen(pg_dsn, schema, *args) for args in usage]
    for args, proc in zip(usage, procs, strict=True):
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (args, err)
        assert err.startswith("taskq: error: ") and err.count("\n") == 1, (args, err)


def test_log_format_json(pg_dsn: str, schema: str) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "taskq", "--log-format", "json", "migrate", "--schema", schema],
        env=subprocess_env(pg_dsn),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records and all(r["logger"] == "taskq.migrations" for r in records)
    assert records[0]["level"] == "INFO"
    assert records[0]["message"].startswith("applying taskq migration 0001_initial")
