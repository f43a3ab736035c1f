"""The command line, run as real subprocesses against a real Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

import taskq
from taskq import _migrations

from .conftest import PYTHON, subprocess_env

pytestmark = pytest.mark.anyio


def run_cli(
    pg_dsn: str, *args: str, schema: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = subprocess_env(pg_dsn, **({"TASKQ_SCHEMA": schema} if schema else {}))
    return subprocess.run(
        [PYTHON, "-m", "taskq", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


async def test_migrate_dry_run_prints_sql_and_applies_nothing(pg_dsn: str, schema: str) -> None:
    done = run_cli(pg_dsn, "migrate", "--schema", schema, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f'CREATE TABLE "{schema}".jobs' in done.stdout
    assert "BEGIN;" in done.stdout and "COMMIT;" in done.stdout
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT to_regnamespace($1)", schema) is None
        done = run_cli(pg_dsn, "migrate", "--schema", schema)
        assert done.returncode == 0, done.stderr
        latest = _migrations.latest_version()
        assert f"applied migration(s) {', '.join(map(str, range(1, latest + 1)))}" in done.stdout
        assert await conn.fetchval(f'SELECT max(version) FROM "{schema}".migrations') == latest
        assert "created or replaced" in done.stdout and "finish" in done.stdout
        again = run_cli(pg_dsn, "migrate", "--schema", schema)
        assert "up to date" in again.stdout
        dry = run_cli(pg_dsn, "migrate", "--schema", schema, "--dry-run")
        assert "up to date" in dry.stdout
        # A function whose file changed is created again, and migrate says so.
        await conn.execute(f"UPDATE \"{schema}\".objects SET checksum = 'x' WHERE name = 'finish'")
        stale = run_cli(pg_dsn, "migrate", "--schema", schema)
        assert stale.stdout == f"created or replaced finish in schema {schema!r}\n", stale.stdout
    finally:
        await conn.close()


async def test_status_counts_jobs_by_queue_and_state(pg_dsn: str, schema: str) -> None:
    app = taskq.App(pg_dsn, schema=schema)

    @app.task(queue="alpha")
    async def a() -> None:
        return None

    @app.task(queue="beta", retry=False)
    async def b() -> None:
        raise RuntimeError("no")

    async with app:
        await a.enqueue_many([{}] * 3)
        await b.enqueue_many([{}] * 2)
        await app.drain(queues=["beta"])
    done = run_cli(pg_dsn, "status", "--schema", schema)
    assert done.returncode == 0, done.stderr
    table = done.stdout.split("\n\n")[0]
    lines = {line.split()[0]: line.split()[1:] for line in table.splitlines()}
    assert lines["queue"] == [
        "state",
        "queued",
        "scheduled",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    ]
    assert lines["alpha"] == ["active", "3", "0", "0", "0", "0", "0"]
    assert lines["beta"] == ["active", "0", "0", "0", "0", "2", "0"]
    assert "no live workers" in done.stdout


def test_bad_dsn_is_a_clear_error_with_exit_code_1(pg_dsn: str) -> None:
    done = run_cli(pg_dsn, "status", "--dsn", "postgresql://nobody@127.0.0.1:1/nothing")
    assert done.returncode == 1
    assert "taskq: error:" in done.stderr
    assert "cannot reach Postgres" in done.stderr
    assert "Traceback" not in done.stderr


def test_version_names_the_distribution() -> None:
    done = subprocess.run(
        [PYTHON, "-m", "taskq", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"taskq-pg {taskq.__version__}\n"


def test_log_level_is_documented_and_takes_any_case(pg_dsn: str, schema: str) -> None:
    helped = subprocess.run(
        [PYTHON, "-m", "taskq", "--help"], capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0, helped.stderr
    assert "least severe log lines written to stderr (default INFO" in " ".join(
        helped.stdout.split()
    )
    done = run_cli(pg_dsn, "--log-level", "warning", "migrate", "--schema", schema)
    assert done.returncode == 0, done.stderr
    assert "applied migration(s)" in done.stdout
    assert done.stderr == ""  # the INFO lines of the migrations are below WARNING
    bad = run_cli(pg_dsn, "--log-level", "loud", "status")
    assert bad.returncode == 2
    assert "invalid choice: 'LOUD'" in bad.stderr


def test_worker_connection_errors_name_the_dsn_and_its_source(pg_dsn: str, tmp_path: Path) -> None:
    # Nothing listens on port 1 of the loopback: refused at once.
    closed = "postgresql://nobody:hunter2@127.0.0.1:1/nothing"
    masked = "postgresql://nobody:***@127.0.0.1:1/nothing"
    (tmp_path / "ownapp.py").write_text(f"import taskq\n\napp = taskq.App({closed!r})\n")
    cases = [
        ((), {"TASKQ_DSN": closed}, "$TASKQ_DSN"),
        (("--dsn", closed), {}, "--dsn"),
        ((), {}, "the App ownapp:app"),
    ]
    for extra, env_extra, source in cases:
        env = subprocess_env(pg_dsn, **env_extra)
        app = "ownapp:app" if source.startswith("the App") else "workerapp:app"
        done = subprocess.run(
            # --connect-retry 0: the worker otherwise keeps trying for 60 s.
            [PYTHON, "-m", "taskq", "worker", app, "--connect-retry", "0", *extra],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 1, (source, done.stderr)
        assert done.stderr.startswith("taskq: error: connecting to Postgres failed"), done.stderr
        assert "cannot reach Postgres" in done.stderr
        assert done.stderr.endswith(f"[DSN {masked!r} from {source}]\n"), done.stderr
        assert "hunter2" not in done.stderr and "Traceback" not in done.stderr


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_connect_timeout_says_no_answer_within(pg_dsn: str, schema: str) -> None:
    with silent_server() as port:
        dsn = f"postgresql://nobody:hunter2@127.0.0.1:{port}/nothing"
        expected = (
            "taskq: error: connecting to Postgres failed: no answer within 0.5 s "
            f"[DSN 'postgresql://nobody:***@127.0.0.1:{port}/nothing' from {{}}]\n"
        )
        for args, env_extra, source in [
            (("status", "--dsn", dsn, "--connect-timeout", "0.5"), {}, "--dsn"),
            (("migrate", "--dsn", dsn, "--connect-timeout", "0.5"), {}, "--dsn"),
            (
                ("worker", "workerapp:app", "--connect-timeout", "0.5", "--connect-retry", "0"),
                {"TASKQ_DSN": dsn},
                None,
            ),
        ]:
            started = time.monotonic()
            done = subprocess.run(
                [PYTHON, "-m", "taskq", *args],
                env=subprocess_env(pg_dsn, TASKQ_SCHEMA=schema, **env_extra),
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            elapsed = time.monotonic() - started
            assert done.returncode == 1, (args, done.stderr)
            assert done.stderr == expected.format(source or "$TASKQ_DSN"), args
            assert elapsed < 30, (args, elapsed)  # the default timeout (10 s) was not used


def test_worker_with_a_bad_app_path_fails_clearly(pg_dsn: str) -> None:
    done = run_cli(pg_dsn, "worker", "no_such_module:app")
    assert done.returncode == 1
    assert "cannot import 'no_such_module'" in done.stderr
    done = run_cli(pg_dsn, "worker", "workerapp:nothing")
    assert done.returncode == 1
    assert "has no attribute 'nothing'" in done.stderr


def test_old_schema_is_refused_without_auto_migrate(pg_dsn: str, schema: str) -> None:
    async def check() -> None:
        app = taskq.App(pg_dsn, schema=schema, auto_migrate=False)
        with pytest.raises(taskq.SchemaError, match="python -m taskq migrate"):
            await app.open()
        assert not app.is_open

    asyncio.run(check())


async def test_two_processes_migrating_at_once_apply_each_migration_once(
    pg_dsn: str, schema: str
) -> None:
    env = subprocess_env(pg_dsn)
    procs = [
        subprocess.Popen(
            [PYTHON, "-m", "taskq", "migrate", "--schema", schema],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    applied = [out for out, _ in outputs if "applied migration(s)" in out]
    assert len(applied) == 1, outputs
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch(f'SELECT version FROM "{schema}".migrations ORDER BY 1')
        assert [r[0] for r in rows] == list(range(1, _migrations.latest_version() + 1))
    finally:
        await conn.close()


async def test_worker_process_runs_jobs_and_stops_gracefully_on_sigterm(
    pg_dsn: str, schema: str
) -> None:
    app = taskq.App(pg_dsn, schema=schema)
    app.task(name="cli.add", queue="math")(lambda a, b: a + b)
    app.task(name="cli.pid")(lambda: 0)
    app.task(name="cli.sleep", retry=taskq.Retry(attempts=1))(lambda seconds: None)
    async with app:
        env = subprocess_env(pg_dsn, TASKQ_SCHEMA=schema)
        proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "taskq",
                "worker",
                "workerapp:app",
                "--concurrency",
                "4",
                "--shutdown-timeout",
                "0.5",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            add_job = await app.enqueue("cli.add", {"a": 20, "b": 22})
            pid_job = await app.enqueue("cli.pid")
            assert await add_job.result(timeout=60) == 42
            assert await pid_job.result(timeout=60) == proc.pid
            long_job = await app.enqueue("cli.sleep", {"seconds": 3600})
            deadline = time.monotonic() + 30
            while (await long_job.status()).state is not taskq.JobState.RUNNING:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out
        assert "SIGTERM received" in out
        status = await long_job.status()
        # Interrupted by shutdown: back in the queue, attempt given back.
        assert (status.state, status.attempts) == (taskq.JobState.QUEUED, 0)


def test_demo_runs_to_a_summary(pg_dsn: str) -> None:
    done = run_cli(pg_dsn, "demo", "--dsn", pg_dsn, "--jobs", "120", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "summary" in done.stdout
    assert "120 jobs" in done.stdout
    assert "dead letters" in done.stdout


def test_demo_on_the_embedded_default_with_no_dsn(tmp_path: object) -> None:
    """The README's first command, minus the install: no DSN anywhere, embedded Postgres."""
    from pathlib import Path

    from taskq import _embedded

    home = Path(str(tmp_path)) / "taskq-home"
    env = subprocess_env("unused", TASKQ_HOME=str(home))
    del env["TASKQ_DSN"]
    env.pop("TASKQ_SCHEMA", None)
    try:
        done = subprocess.run(
            [PYTHON, "-m", "taskq", "demo", "--jobs", "60"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"embedded Postgres: data in {home / 'postgres'}" in done.stdout
        # Said once, in the demo's own words: the App's log line stays quiet.
        assert "using the embedded Postgres" not in done.stderr
        assert "summary" in done.stdout
        assert "60 jobs" in done.stdout
        assert "python -m taskq embedded stop" in done.stdout

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [PYTHON, "-m", "taskq", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                stdin=subprocess.DEVNULL,
            )

        # Commands that print a table keep the notice to themselves...
        quiet = cli("status", "--schema", "taskq_demo")
        assert quiet.returncode == 0, quiet.stderr
        assert quiet.stderr == ""
        # ...unless a log level is asked for.
        told = cli("--log-level", "info", "status", "--schema", "taskq_demo")
        assert told.returncode == 0, told.stderr
        assert "using the embedded Postgres already running" in told.stderr
        assert f"(data: {home / 'postgres'}, log: " in told.stderr
        # A worker says where the data lives.
        worker = subprocess.Popen(
            [PYTHON, "-m", "taskq", "worker", "workerapp:app"],
            env={**env, "TASKQ_SCHEMA": "taskq_demo"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert worker.stderr is not None
            seen = ""
            for line in worker.stderr:
                seen += line
                if " started: concurrency" in line:
                    break
            assert "using the embedded Postgres already running" in seen, seen
            assert f"(data: {home / 'postgres'}, log: " in seen
            worker.send_signal(signal.SIGTERM)
            worker.communicate(timeout=60)
        finally:
            if worker.poll() is None:
                worker.kill()
        assert worker.returncode == 0
        # The server outlives the demo (reused next time) until stopped.
        assert _embedded._read_live_pidfile(home / "postgres") is not None
        stop = subprocess.run(
            [PYTHON, "-m", "taskq", "embedded", "stop"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert stop.returncode == 0, stop.stderr
        assert "stopped the embedded Postgres" in stop.stdout
        assert _embedded._read_live_pidfile(home / "postgres") is None
    finally:
        if (home / "postgres" / "PG_VERSION").exists():
            _embedded.ensure_server(home / "postgres").stop()


async def test_second_sigint_forces_shutdown_and_returns_the_job(pg_dsn: str, schema: str) -> None:
    app = taskq.App(pg_dsn, schema=schema)
    app.task(name="cli.sleep", retry=taskq.Retry(attempts=1))(lambda seconds: None)
    app.task(name="cli.add", queue="math")(lambda a, b: a + b)
    app.task(name="cli.pid")(lambda: 0)
    async with app:
        proc = subprocess.Popen(
            [PYTHON, "-m", "taskq", "worker", "workerapp:app", "--shutdown-timeout", "600"],
            env=subprocess_env(pg_dsn, TASKQ_SCHEMA=schema),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            job = await app.enqueue("cli.sleep", {"seconds": 3600})
            deadline = time.monotonic() + 30
            while (await job.status()).state is not taskq.JobState.RUNNING:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            assert proc.stdout is not None
            stdout = proc.stdout

            def read_until_waiting() -> str:
                seen = ""
                for line in stdout:
                    seen += line
                    if "waiting up to 600s for 1 running job" in line:
                        break
                return seen

            first = await asyncio.wait_for(asyncio.to_thread(read_until_waiting), 30)
            assert proc.poll() is None  # waiting for the job (grace period: 600 s)
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=30)  # far less than the grace period
            out = first + rest
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out
        assert "SIGINT received again" in out
        status = await job.status()
        assert (status.state, status.attempts) == (taskq.JobState.QUEUED, 0)


async def test_queues_commands_change_settings_that_the_api_sees(pg_dsn: str, schema: str) -> None:
    app = taskq.App(pg_dsn, schema=schema)
    async with app:  # installs the schema
        pass
    done = run_cli(
        pg_dsn,
        "queues",
        "set",
        "emails",
        "--concurrency-limit",
        "3",
        "--rate-limit",
        "100/minute",
        schema=schema,
    )
    assert done.returncode == 0, done.stderr
    assert "emails" in done.stdout and "100/minute" in done.stdout
    assert run_cli(pg_dsn, "queues", "pause", "emails", schema=schema).returncode == 0
    listed = run_cli(pg_dsn, "queues", "--json", schema=schema)
    assert json.loads(listed.stdout) == [
        {
            "name": "emails",
            "paused": True,
            "concurrency_limit": 3,
            "rate_limit": "100/minute",
            "per_key_limit": None,
            "queued": 0,
            "running": 0,
        }
    ]
    assert run_cli(pg_dsn, "queues", "resume", "emails", schema=schema).returncode == 0
    cleared = run_cli(
        pg_dsn,
        "queues",
        "set",
        "emails",
        "--rate-limit",
        "none",
        "--concurrency-limit",
        "none",
        schema=schema,
    )
    assert cleared.returncode == 0, cleared.stderr
    async with app:
        info = await app.queue("emails").info()
    assert (info.paused, info.concurrency_limit, info.rate_limit) == (False, None, None)

    # Error paths: clear messages, exit code 1 (2 for usage errors), nothing changed.
    bad_rate = run_cli(
        pg_dsn, "queues", "set", "emails", "--rate-limit", "5/fortnight", schema=schema
    )
    assert bad_rate.returncode == 1 and "bad rate limit" in bad_rate.stderr
    no_name = run_cli(pg_dsn, "queues", "pause", schema=schema)
    assert no_name.returncode == 2 and "needs a queue name" in no_name.stderr
    nothing = run_cli(pg_dsn, "queues", "set", "emails", schema=schema)
    assert nothing.returncode == 2 and "--concurrency-limit" in nothing.stderr
    usage = run_cli(pg_dsn, "queues", "set", "emails", "--concurrency-limit", "lots", schema=schema)
    assert usage.returncode == 2 and "positive integer" in usage.stderr
    zero = run_cli(pg_dsn, "queues", "set", "emails", "--concurrency-limit", "0", schema=schema)
    assert zero.returncode == 1 and "positive int" in zero.stderr
    async with app:
        assert (await app.queue("emails").info()).concurrency_limit is None


async def test_upgrade_from_version_1_keeps_queued_jobs_runnable(pg_dsn: str, schema: str) -> None:
    first = _migrations.all_migrations()[0]
    conn = await asyncpg.connect(pg_dsn)
    try:
        async with conn.transaction():
            await conn.execute(_migrations._bootstrap(schema))
            await conn.execute(first.sql(schema))
            await conn.execute(
                f"INSERT INTO \"{schema}\".migrations VALUES (1, '{first.name}', now())"
            )
        await conn.execute(
            f"INSERT INTO \"{schema}\".jobs (queue, task, args) VALUES ('default', 'up.add', "
            """'{"a": 1, "b": 2}')"""
        )
    finally:
        await conn.close()
    app = taskq.App(pg_dsn, schema=schema)

    @app.task(name="up.add")
    async def add(a: int, b: int) -> int:
        return a + b

    async with app:  # applies migration 2 over the live table
        stats = await app.drain()
        assert stats.succeeded == 1
        job = await add.options(unique_key="after-upgrade").enqueue(a=2, b=3)
        await app.drain()
        assert await job.result(timeout=5) == 5
