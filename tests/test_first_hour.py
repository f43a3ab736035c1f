"""The traps a newcomer met in the first hour, each closed: every silent wait now speaks."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

import taskq
from taskq._embedded import EmbeddedPostgresError
from taskq.worker import worker as _worker
from taskq.worker.runner import _error_type

from .conftest import PYTHON, ROOT, subprocess_env

pytestmark = pytest.mark.anyio


def readme_quickstart() -> str:
    """The README's quickstart code block, as a user would copy it."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart") :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def without_in_process_worker(code: str) -> str:
    """The quickstart with its `async with app.worker(...)` line removed (body dedented)."""
    lines = code.splitlines()
    at = next(i for i, line in enumerate(lines) if "app.worker(" in line)
    indent = len(lines[at]) - len(lines[at].lstrip())
    body = []
    for line in lines[at + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line[4:])
    rest = lines[at + 1 + len(body) :]
    return "\n".join([*lines[:at], *body, *rest]) + "\n"


async def test_readme_quickstart_as_a_script_beside_a_worker_process(
    pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    code = without_in_process_worker(readme_quickstart())
    assert "app.worker(" not in code and "print(await job.result(timeout=10))" in code
    (tmp_path / "quickstart.py").write_text(code)
    env = subprocess_env(pg_dsn, TASKQ_SCHEMA=schema)
    env.pop("PYTHONPATH")  # only the user's folder, as in a fresh project
    worker = subprocess.Popen(
        [PYTHON, "-m", "taskq", "worker", "quickstart:app"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            [PYTHON, "quickstart.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        worker.terminate()
        out, _ = worker.communicate(timeout=30)
    assert done.returncode == 0, done.stderr + out
    assert done.stdout.strip() == "welcome mail sent to user 42"
    assert worker.returncode == 0, out
    # The script named its task as the worker's import does.
    app = taskq.App(pg_dsn, schema=schema)
    async with app:
        status = await app.get_job(1).status()
    assert (status.task, status.state) == ("quickstart.send_welcome", taskq.JobState.SUCCEEDED)


def test_task_names_do_not_depend_on_how_the_module_is_started(tmp_path: Path) -> None:
    pkg = tmp_path / "shop" / "jobs"
    pkg.mkdir(parents=True)
    (tmp_path / "shop" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "mail.py").write_text(
        textwrap.dedent(
            """
            import taskq

            app = taskq.App("postgresql://unused")

            @app.task
            async def send() -> None: ...

            if __name__ == "__main__":
                print(send.name)
            """
        )
    )
    (tmp_path / "loose.py").write_text((pkg / "mail.py").read_text())
    runs = {
        "as a script": [PYTHON, "shop/jobs/mail.py"],
        "with -m": [PYTHON, "-m", "shop.jobs.mail"],
        "imported": [PYTHON, "-c", "import shop.jobs.mail as m; print(m.send.name)"],
    }
    for how, cmd in runs.items():
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "shop.jobs.mail.send", how
    done = subprocess.run(
        [PYTHON, str(tmp_path / "loose.py")], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "loose.send"


async def test_a_worker_logs_due_jobs_of_tasks_it_lacks_once_per_task(
    pg_dsn: str, schema: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_worker, "STRAY_CHECK_SECONDS", 0.0)  # look on every empty wake-up
    producer = taskq.App(pg_dsn, schema=schema)
    producer.task(name="__main__.send_welcome", queue="emails")(lambda user_id: None)
    producer.task(name="reports.build")(lambda: None)
    worker_app = taskq.App(pg_dsn, schema=schema)

    @worker_app.task(name="quickstart.send_welcome", queue="emails")
    async def send_welcome(user_id: int) -> None:
        return None

    def warnings_about(task: str) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and f"task {task!r}" in r.getMessage()
        ]

    async def until(check: object, what: str) -> None:
        deadline = time.monotonic() + 20
        while not check():  # type: ignore[operator]
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)

    caplog.set_level(logging.WARNING, logger="taskq.worker")
    async with producer, worker_app:
        await producer.tasks["__main__.send_welcome"].enqueue_many(
            [{"user_id": i} for i in range(3)]
        )
        async with worker_app.worker(concurrency=2) as worker:
            await until(lambda: warnings_about("__main__.send_welcome"), "no warning")
            [message] = warnings_about("__main__.send_welcome")
            assert "3 due job(s) of task '__main__.send_welcome' in queue 'emails'" in message
            assert "this worker has 'quickstart.send_welcome'" in message
            # More jobs of the same task: not logged again. A second unknown task is.
            await producer.tasks["__main__.send_welcome"].enqueue(user_id=9)
            await producer.tasks["reports.build"].enqueue()
            await until(lambda: warnings_about("reports.build"), "no warning for the second task")
            assert len(warnings_about("__main__.send_welcome")) == 1
            assert (
                "1 due job(s) of task 'reports.build' in queue 'default'"
                in (warnings_about("reports.build")[0])
            )
            assert worker.stats.claimed == 0  # nothing it cannot run was taken


async def test_a_timed_out_result_says_why_the_job_has_not_finished(
    pg_dsn: str, schema: str
) -> None:
    app = taskq.App(pg_dsn, schema=schema)

    @app.task(name="__main__.send_welcome", queue="emails")
    async def send_welcome(user_id: int) -> None:
        return None

    @app.task(name="flaky", retry=taskq.Retry(attempts=3, wait=3600))
    async def flaky() -> None:
        raise ValueError("boom")

    @app.task(name="slow")
    async def slow() -> None:
        await asyncio.sleep(3600)

    other = taskq.App(pg_dsn, schema=schema)
    other.task(name="quickstart.send_welcome", queue="emails")(lambda user_id: None)

    async with app, other:
        job = await send_welcome.enqueue(user_id=42)
        with pytest.raises(TimeoutError) as info:
            await job.result(timeout=0.2)
        message = str(info.value)
        assert message.startswith(
            f"job {job.id} did not finish within 0.2 s (task '__main__.send_welcome', "
            "queue 'emails'): it is still queued"
        )
        assert f"no worker is running on schema {schema!r}" in message

        # A live worker that knows the task under another name (the quickstart trap).
        async with other.worker(queues=["emails"]):
            with pytest.raises(TimeoutError) as info:
                await job.result(timeout=0.2)
            assert (
                "none of the 1 live worker(s) has task '__main__.send_welcome'; they have "
                "'quickstart.send_welcome'"
            ) in str(info.value)

        await app.queue("emails").pause()
        with pytest.raises(TimeoutError, match=r"queue 'emails' is paused"):
            await job.result(timeout=0.2)

        failing = await flaky.enqueue()
        slow_job = await slow.enqueue()
        async with app.worker(queues=["default"]):
            while (await slow_job.status()).state is not taskq.JobState.RUNNING:
                await asyncio.sleep(0.02)
            with pytest.raises(TimeoutError) as info:
                await slow_job.result(timeout=0.2)
            assert "it is running, attempt 1 of" in str(info.value)
            while (await failing.status()).attempts < 1 or (
                await failing.status()
            ).state is not taskq.JobState.QUEUED:
                await asyncio.sleep(0.02)
            with pytest.raises(TimeoutError) as info:
                await failing.result(timeout=0.2)
            assert re.search(
                r"it is queued, due in 3\d{3}\.\d s \(a retry: attempt 1 failed with "
                r"ValueError: boom\); 1 live worker\(s\) can run it",
                str(info.value),
            ), str(info.value)
            await slow_job.cancel()


async def test_enqueue_by_an_unknown_name_suggests_the_known_one(pg_dsn: str, schema: str) -> None:
    worker_app = taskq.App(pg_dsn, schema=schema)
    worker_app.task(name="gjobs.store")(lambda key: None)
    async with worker_app:
        await worker_app.drain()  # a worker reports its tasks
    producer = taskq.App(pg_dsn, schema=schema)
    async with producer:
        with pytest.raises(taskq.UnknownTaskError, match=r"Did you mean 'gjobs\.store'\?"):
            await producer.enqueue("store", {"key": 1})
        with pytest.raises(taskq.UnknownTaskError, match=r"Did you mean 'gjobs\.store'\?"):
            await producer.enqueue("gjobs.stroe", {"key": 1})
        with pytest.raises(taskq.UnknownTaskError) as info:
            await producer.enqueue("nothing.like.it", {"key": 1})
        assert "Did you mean" not in str(info.value)


def test_public_errors_are_named_by_their_public_module() -> None:
    for name in taskq.__all__:
        obj = getattr(taskq, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert obj.__module__ == "taskq", name
            assert _error_type(obj) == f"taskq.{name}"
    # A private subclass is stored as the public class users can catch.
    assert _error_type(EmbeddedPostgresError) == "taskq.ConfigurationError"
    assert _error_type(ValueError) == "ValueError"
    assert _error_type(asyncio.CancelledError) == "asyncio.exceptions.CancelledError"


async def test_messages_do_not_name_private_modules(app: taskq.App) -> None:
    @app.task
    async def store(payload: object) -> None:
        return None

    async with app:
        errors: list[BaseException] = []
        for bad in (
            lambda: store.enqueue(payload=object()),
            lambda: app.enqueue("no.such.task", {}),
            lambda: app.get_job(2**70).status(),
            lambda: app.get_job(12345).result(timeout=0.1),
        ):
            try:
                await bad()
            except Exception as exc:
                errors.append(exc)
        assert len(errors) == 4
        for exc in errors:
            assert "taskq._" not in str(exc), exc
            assert type(exc).__module__ == "taskq", type(exc)
