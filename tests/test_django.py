"""The Django example under a real uvicorn: views enqueue, a view reports, SIGTERM drains.

Each server runs in its own process with the test database in $TASKQ_DSN and a
fresh schema in $TASKQ_SCHEMA, and is driven over real HTTP.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import taskq
from taskq.contrib.django import TaskqLifespan, with_lifespan

from .conftest import PYTHON, ROOT, subprocess_env

EXAMPLE = ROOT / "examples" / "django_app"
# Generous for a loaded 2-core machine: every wait ends as soon as its condition holds.
TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Process:
    """A child process whose output goes to a file (no pipe to fill up)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        self.log = log
        with log.open("w") as out:
            self.popen = subprocess.Popen(
                args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
            )
        self.pid = self.popen.pid

    def output(self) -> str:
        return self.log.read_text()

    def terminate(self) -> int:
        """SIGTERM, then wait for the exit; returns the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(
                f"no exit within {TIMEOUT}s of SIGTERM:\n{self.output()}"
            ) from None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


class Server(Process):
    """``uvicorn project.asgi:application`` on a free loopback port."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        args = [PYTHON, "-m", "uvicorn", "project.asgi:application"]
        args += ["--app-dir", str(EXAMPLE), "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__(args, env, log, ROOT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def wait_ready(self) -> None:
        def answers() -> bool:
            assert self.popen.poll() is None, f"uvicorn exited:\n{self.output()}"
            try:
                self.client.get("/jobs/0")
            except httpx.TransportError:
                return False
            return True

        wait_for(answers, "uvicorn to serve requests")

    def job(self, job_id: int) -> dict[str, Any]:
        response = self.client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_state(self, job_id: int, state: str) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            body = self.job(job_id)
            assert body["state"] in ("queued", "running", state), body
            return body if body["state"] == state else None

        result: dict[str, Any] = wait_for(reached, f"job {job_id} to be {state}")
        return result

    def close(self) -> None:
        self.client.close()
        self.kill()


@pytest.fixture
def env(pg_dsn: str, schema: str) -> dict[str, str]:
    return subprocess_env(pg_dsn, TASKQ_SCHEMA=schema)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Server]]:
    servers: list[Server] = []

    def start(env: dict[str, str]) -> Server:
        server = Server(env, tmp_path / f"uvicorn-{len(servers)}.log")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def start_running(server: Server, user_id: int) -> int:
    """Enqueue a job and return its id once it runs (the job takes 0.5 s: on a
    slow machine it may end before a poll sees it running; then try again)."""
    for _ in range(5):
        job_id: int = server.client.post(f"/users/{user_id}/welcome").json()["job_id"]

        def started(job_id: int = job_id) -> str | None:
            state: str = server.job(job_id)["state"]
            return None if state == "queued" else state

        if wait_for(started, f"job {job_id} to start") == "running":
            return job_id
    raise AssertionError("never caught a job running")


def final_status(pg_dsn: str, schema: str, job_id: int) -> taskq.JobStatus:
    async def read() -> taskq.JobStatus:
        async with taskq.App(pg_dsn, schema=schema, auto_migrate=False) as app:
            return await app.get_job(job_id).status()

    return asyncio.run(read())


def test_views_enqueue_report_and_sigterm_drains(
    env: dict[str, str], pg_dsn: str, schema: str, server_factory: Callable[..., Server]
) -> None:
    server = server_factory(env)
    server.wait_ready()

    # The async view enqueues; the worker inside the server process runs the job.
    response = server.client.post("/users/7/welcome")
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    done = server.wait_state(job_id, "succeeded")
    assert done["result"] == {"user_id": 7, "pid": server.pid}
    assert done["task"] == "project.tasks.send_welcome"
    assert done["args"] == {"user_id": 7}
    assert done["attempts"] == 1
    assert done["finished_at"] is not None

    # The sync view enqueues through async_to_sync once its transaction commits.
    response = server.client.post("/users/8/welcome-after-commit")
    assert response.status_code == 202, response.text
    done = server.wait_state(response.json()["job_id"], "succeeded")
    assert done["result"] == {"user_id": 8, "pid": server.pid}

    missing = server.client.get(f"/jobs/{2**63}")
    assert missing.status_code == 404
    assert server.client.get("/jobs/999999999").status_code == 404

    # SIGTERM while a job runs: uvicorn's lifespan shutdown lets it finish.
    running_id = start_running(server, user_id=9)
    server.client.close()
    status = server.terminate()
    output = server.output()
    # uvicorn re-raises the signal it handled once shut down.
    assert status in (0, -signal.SIGTERM), output
    assert "Application shutdown complete." in output, output
    assert "Traceback" not in output, output
    finished = final_status(pg_dsn, schema, running_id)
    assert finished.state is taskq.JobState.SUCCEEDED, finished
    assert finished.result == {"user_id": 9, "pid": server.pid}


def test_separate_worker_process_runs_the_jobs(
    env: dict[str, str], tmp_path: Path, server_factory: Callable[..., Server]
) -> None:
    server = server_factory({**env, "TASKQ_WEB_WORKER": "0"})
    worker = Process(
        [PYTHON, "-m", "taskq", "worker", "project.worker:app", "--concurrency", "5"],
        env,
        tmp_path / "worker.log",
        EXAMPLE,
    )
    try:
        server.wait_ready()
        response = server.client.post("/users/5/welcome")
        assert response.status_code == 202, response.text
        done = server.wait_state(response.json()["job_id"], "succeeded")
        # Run by the worker process, not by the web server.
        assert done["result"] == {"user_id": 5, "pid": worker.pid}
        assert done["worker_id"].split(":")[1] == str(worker.pid)
        assert worker.terminate() == 0, worker.output()
        assert "worker stopped: 1 succeeded" in worker.output(), worker.output()
    finally:
        worker.kill()
    server.client.close()
    assert server.terminate() in (0, -signal.SIGTERM), server.output()
    assert "Application shutdown complete." in server.output(), server.output()


def test_failed_startup_stops_the_server(
    env: dict[str, str], server_factory: Callable[..., Server]
) -> None:
    # Nothing listens on this port: taskq cannot open, and uvicorn must not serve.
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    server = server_factory({**env, "TASKQ_DSN": dsn})
    status = server.popen.wait(TIMEOUT)
    output = server.output()
    assert status == 3, output  # uvicorn's exit status for a failed lifespan startup
    assert "taskq startup failed: DatabaseError" in output, output
    assert "Uvicorn running" not in output, output


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("not called")


def test_with_lifespan_checks_its_arguments() -> None:
    jobs = taskq.App("postgresql://unused@127.0.0.1/none")
    wrapped = with_lifespan(_no_app, jobs, concurrency=3, shutdown_timeout=5)
    assert isinstance(wrapped, TaskqLifespan)
    assert wrapped.application is _no_app
    assert wrapped.jobs_app is jobs
    assert wrapped.worker_options == {"concurrency": 3, "shutdown_timeout": 5}
    assert not with_lifespan(_no_app, jobs, worker=False).worker
    with pytest.raises(taskq.ConfigurationError, match="unknown worker setting"):
        with_lifespan(_no_app, jobs, concurency=3)
    with pytest.raises(taskq.ConfigurationError, match="concurrency must be a positive int"):
        with_lifespan(_no_app, jobs, concurrency=0)
    with pytest.raises(taskq.ConfigurationError, match="worker=False"):
        with_lifespan(_no_app, jobs, worker=False, concurrency=3)
    with pytest.raises(taskq.ConfigurationError, match=r"needs a taskq\.App"):
        with_lifespan(_no_app, object())  # type: ignore[arg-type]
    with pytest.raises(taskq.ConfigurationError, match="needs an ASGI application"):
        with_lifespan(None, jobs)  # type: ignore[arg-type]


def test_django_is_imported_only_by_the_example() -> None:
    # taskq.contrib.django speaks plain ASGI: importing it must not import Django.
    code = "import sys, taskq.contrib.django; assert 'django' not in sys.modules"
    subprocess.run([PYTHON, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
