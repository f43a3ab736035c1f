"""The web examples under real servers: uvicorn and aiohttp in their own processes, real HTTP.

Each server gets the test database through $TASKQ_DSN and a fresh schema
through $TASKQ_SCHEMA; the DSN also sets ``search_path`` to that schema, so the
examples' own ``signups`` table lands there and is dropped with it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

import taskq
from taskq.contrib.aiohttp import APP_KEY, setup
from taskq.contrib.fastapi import lifespan

from .conftest import PYTHON, ROOT, subprocess_env

EXAMPLES = ROOT / "examples"
# Generous: a loaded 2-core machine; every wait ends as soon as its condition holds.
TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_search_path(dsn: str, schema: str) -> str:
    # asyncpg sends unknown DSN parameters as server settings.
    return f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"


def query(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def wait_for(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Server:
    """An example app served by a real server in a child process."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [PYTHON, *(a.replace("{port}", str(self.port)) for a in args)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.pid = self.process.pid
        self.output = ""
        self.client = httpx.Client(base_url=self.base, timeout=30)

    def wait_ready(self, path: str = "/health") -> None:
        def answers() -> bool:
            if self.process.poll() is not None:
                self.stop()
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.output}")
            try:
                response = self.client.get(path)
            except httpx.TransportError:
                return False
            if path == "/health":
                assert response.json() == {"status": "ok"}, response.text
            return True

        wait_for(answers, f"the server on {self.base}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig``, wait for the process to exit, return its exit status."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            out, _ = self.process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
            self.output += out or ""
            raise
        self.output += out or ""
        return self.process.returncode

    def wait_job(self, job_id: int) -> dict[str, Any]:
        """The job's status once it has finished (the endpoint waits on a notification)."""

        def finished() -> dict[str, Any] | None:
            response = self.client.get(f"/jobs/{job_id}", params={"wait": 10})
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body if body["state"] in ("succeeded", "failed", "cancelled") else None

        return wait_for(finished, f"job {job_id} to finish")

    def wait_running(self, job_id: int) -> None:
        def running() -> bool:
            state = self.client.get(f"/jobs/{job_id}").json()["state"]
            assert state in ("queued", "running"), state
            return state == "running"

        wait_for(running, f"job {job_id} to start")


@pytest.fixture
def dsn(pg_dsn: str, schema: str) -> str:
    return with_search_path(pg_dsn, schema)


@pytest.fixture
def start(dsn: str, schema: str) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start_server(kind: str, *extra: str) -> Server:
        args = {
            "fastapi": [
                "-m",
                "uvicorn",
                "main:api",
                "--app-dir",
                str(EXAMPLES / "fastapi_app"),
                "--port",
                "{port}",
            ],
            "aiohttp": [str(EXAMPLES / "aiohttp_app" / "main.py"), "--port", "{port}"],
            # The README's app: no health endpoint; any answer means it is up.
            "minimal": [
                "-m",
                "uvicorn",
                "minimal:api",
                "--app-dir",
                str(EXAMPLES / "fastapi_app"),
                "--port",
                "{port}",
            ],
        }[kind]
        server = Server([*args, *extra], subprocess_env(dsn, TASKQ_SCHEMA=schema))
        servers.append(server)
        server.wait_ready("/jobs/1" if kind == "minimal" else "/health")
        return server

    yield start_server
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.communicate()


def job_count(dsn: str, schema: str) -> int:
    live, history = f'"{schema}".jobs', f'"{schema}".history'
    rows = query(dsn, f"SELECT (SELECT count(*) FROM {live}) + (SELECT count(*) FROM {history})")
    return int(rows[0][0])


def find_job(dsn: str, schema: str, job_id: int) -> dict[str, Any]:
    """The job's row, from the live table or from history; it must be in exactly one."""
    rows = query(
        dsn,
        f"""SELECT 'live' AS place, state, attempts, worker_id, NULL::timestamptz AS finished_at,
                   NULL::jsonb AS result
            FROM "{schema}".jobs WHERE id = $1
            UNION ALL
            SELECT 'history', state, attempts, worker_id, finished_at, result
            FROM "{schema}".history WHERE id = $1""",
        job_id,
    )
    assert len(rows) == 1, f"job {job_id} found {len(rows)} times"
    row = dict(rows[0])
    row["result"] = None if row["result"] is None else json.loads(row["result"])
    return row


def check_examples_api(server: Server, dsn: str, schema: str) -> None:
    """What both examples promise: jobs run in the server, results, 404, 409, transactions."""
    client = server.client
    response = client.post("/users/7/welcome")
    assert response.status_code == 200, response.text
    status = server.wait_job(response.json()["job_id"])
    assert status["task"] == "tasks.send_welcome"
    assert status["state"] == "succeeded", status
    # Run by the worker inside the server process, result read back over HTTP.
    assert status["result"] == {"user_id": 7, "pid": server.pid}
    assert status["attempts"] == 1

    email = f"{uuid.uuid4().hex}@example.com"
    response = client.post("/signups", json={"email": email})
    assert response.status_code == 201, response.text
    body = response.json()
    status = server.wait_job(body["job_id"])
    assert status["result"] == {"user_id": body["signup_id"], "pid": server.pid}
    rows = query(dsn, "SELECT id FROM signups WHERE email = $1", email)
    assert [r["id"] for r in rows] == [body["signup_id"]]

    before = job_count(dsn, schema)
    again = client.post("/signups", json={"email": email})
    assert again.status_code == 409
    assert email in again.text
    # The refused signup's transaction took its job with it.
    assert job_count(dsn, schema) == before

    missing = client.get("/jobs/999999999")
    assert missing.status_code == 404
    assert "no job with id 999999999" in missing.text


def test_fastapi_example_runs_jobs_in_the_server_process(
    start: Callable[..., Server], dsn: str, schema: str
) -> None:
    server = start("fastapi")
    check_examples_api(server, dsn, schema)

    before = job_count(dsn, schema)
    bad = [
        ("post", "/users/abc/welcome", None, "user_id"),
        ("post", "/users/0/welcome", None, "user_id"),
        ("post", f"/users/{2**63}/welcome", None, "user_id"),  # beyond bigint
        ("post", "/reports", {"seconds": "soon"}, "seconds"),
        ("post", "/reports", {"seconds": -1}, "seconds"),
        ("post", "/reports", None, "body"),
        ("post", "/signups", {"email": "not an address"}, "email"),
        ("get", "/jobs/abc", None, "job_id"),
        ("get", f"/jobs/{2**63}", None, "job_id"),
        ("get", "/jobs/1?wait=-1", None, "wait"),
    ]
    for method, path, body, field in bad:
        response = server.client.request(method, path, json=body)
        assert response.status_code == 422, (path, response.text)
        # FastAPI's validation error names the offending field.
        locations = [e["loc"][-1] for e in response.json()["detail"]]
        assert field in locations, (path, response.json())
    assert job_count(dsn, schema) == before  # bad requests wrote nothing

    assert server.stop(signal.SIGINT) == 0, server.output
    assert "Application shutdown complete" in server.output


def test_readme_fastapi_app_runs_a_job_in_the_server_process(
    start: Callable[..., Server], dsn: str, schema: str
) -> None:
    server = start("minimal")
    response = server.client.post("/users/42/welcome")
    assert response.status_code == 200, response.text
    status = server.wait_job(response.json()["job_id"])
    assert status["state"] == "succeeded", status
    assert status["result"] == {"user_id": 42, "pid": server.pid}
    assert server.client.get("/jobs/999999999").status_code == 404
    # Beyond Postgres's bigint: no such job either, not a server error.
    assert server.client.get(f"/jobs/{2**63}").status_code == 404
    assert server.client.post("/users/abc/welcome").status_code == 422
    assert job_count(dsn, schema) == 1
    assert server.stop(signal.SIGINT) == 0, server.output


def test_aiohttp_example_runs_jobs_in_the_server_process(
    start: Callable[..., Server], dsn: str, schema: str
) -> None:
    server = start("aiohttp")
    check_examples_api(server, dsn, schema)

    before = job_count(dsn, schema)
    bad = [
        ("post", "/users/abc/welcome", None, "user_id must be a positive integer"),
        ("post", "/users/0/welcome", None, "user_id must be a positive integer"),
        ("post", f"/users/{'9' * 5000}/welcome", None, "user_id must be a positive integer"),
        ("post", "/reports", {"seconds": "soon"}, '{"seconds": 2.5}'),
        ("post", "/reports", {"seconds": 61}, "0 < seconds <= 60"),
        ("post", "/reports", None, '{"seconds": 2.5}'),
        ("post", "/signups", {"email": "not an address"}, '{"email": '),
        ("post", "/signups", ["a@example.com"], '{"email": '),
        ("get", "/jobs/abc", None, "job_id must be a positive integer"),
        ("get", f"/jobs/{2**63}", None, "job_id must be a positive integer"),
        ("get", "/jobs/1?wait=soon", None, "wait must be a number"),
        ("get", "/jobs/1?wait=nan", None, "wait must be a number"),
    ]
    for method, path, body, message in bad:
        response = server.client.request(method, path, json=body)
        assert response.status_code == 400, (path, response.text)
        assert message in response.json()["error"], (path, response.text)
    assert job_count(dsn, schema) == before  # bad requests wrote nothing

    assert server.stop(signal.SIGTERM) == 0, server.output


def test_200_concurrent_requests_each_enqueue_a_job_that_runs_once(
    start: Callable[..., Server], dsn: str, schema: str
) -> None:
    server = start("fastapi")
    users = range(1, 201)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(users))
        async with httpx.AsyncClient(base_url=server.base, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(client.post(f"/users/{u}/welcome") for u in users))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * len(users)
    job_ids = {r.json()["job_id"] for r in responses}
    assert len(job_ids) == len(users)

    history = f'"{schema}".history'
    wait_for(
        lambda: query(dsn, f"SELECT count(*) = $1 FROM {history}", len(users))[0][0],
        "all jobs to finish",
    )
    rows = query(dsn, f"SELECT id, state, attempts, rescues, args, result FROM {history}")
    assert {r["id"] for r in rows} == job_ids
    # One attempt each, never rescued: every job ran exactly once, in the server.
    assert {(r["state"], r["attempts"], r["rescues"]) for r in rows} == {("succeeded", 1, 0)}
    results = sorted((json.loads(r["result"]) for r in rows), key=lambda r: r["user_id"])
    assert results == [{"user_id": u, "pid": server.pid} for u in users]
    assert query(dsn, f'SELECT count(*) FROM "{schema}".jobs')[0][0] == 0
    # The endpoint reports the same as the table.
    some = sorted(job_ids)[::50]
    for job_id in some:
        status = server.client.get(f"/jobs/{job_id}").json()
        assert (status["state"], status["result"]["pid"]) == ("succeeded", server.pid)

    assert server.stop(signal.SIGINT) == 0, server.output


def test_sigterm_lets_a_running_job_finish_before_the_server_exits(
    start: Callable[..., Server], dsn: str, schema: str
) -> None:
    server = start("fastapi")
    response = server.client.post("/reports", json={"seconds": 3})
    job_id = response.json()["job_id"]
    server.wait_running(job_id)
    signalled_at = query(dsn, "SELECT now()")[0][0]

    code = server.stop(signal.SIGTERM)
    # uvicorn finishes its shutdown, then re-raises SIGTERM to exit with it.
    assert code == -signal.SIGTERM, server.output
    assert "Application shutdown complete" in server.output

    row = find_job(dsn, schema, job_id)
    assert (row["place"], row["state"], row["attempts"]) == ("history", "succeeded", 1), row
    assert row["finished_at"] > signalled_at  # it was still running when the signal came
    assert row["result"] == {"seconds": 3, "pid": server.pid}
    assert query(dsn, f'SELECT count(*) FROM "{schema}".jobs')[0][0] == 0
    # The worker took itself off the workers table on its way out.
    assert query(dsn, f'SELECT count(*) FROM "{schema}".workers')[0][0] == 0


def test_sigint_returns_a_job_still_running_after_the_shutdown_timeout_to_the_queue(
    start: Callable[..., Server], dsn: str, schema: str
) -> None:
    server = start("aiohttp", "--shutdown-timeout", "0.2")
    job_id = server.client.post("/reports", json={"seconds": 3}).json()["job_id"]
    server.wait_running(job_id)

    assert server.stop(signal.SIGINT) == 0, server.output
    row = find_job(dsn, schema, job_id)
    # Back in the queue, its attempt given back: it was interrupted, not failed.
    assert (row["place"], row["state"], row["attempts"]) == ("live", "queued", 0), row
    assert row["worker_id"] is None

    # The next server process runs it from the start.
    again = start("aiohttp")
    status = again.wait_job(job_id)
    assert (status["state"], status["attempts"]) == ("succeeded", 1)
    assert status["result"] == {"seconds": 3, "pid": again.pid}
    assert again.stop(signal.SIGTERM) == 0, again.output


# -- the helpers themselves ----------------------------------------------------


def test_taskq_imports_no_web_framework() -> None:
    code = (
        "import sys, taskq, taskq.contrib, taskq.contrib.fastapi\n"
        "loaded = {'fastapi', 'starlette', 'aiohttp'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([PYTHON, "-c", code], check=True, timeout=60)


def test_helpers_refuse_bad_settings_at_once() -> None:
    from aiohttp import web

    jobs = taskq.App("postgresql://unused")
    with pytest.raises(taskq.ConfigurationError, match="concurrency"):
        lifespan(jobs, concurrency=0)
    with pytest.raises(taskq.ConfigurationError, match="unknown worker setting"):
        lifespan(jobs, concurency=5)
    with pytest.raises(taskq.ConfigurationError, match="worker=False"):
        lifespan(jobs, worker=False, concurrency=5)
    with pytest.raises(taskq.ConfigurationError, match=r"taskq\.App"):
        lifespan("postgresql://unused")  # type: ignore[arg-type]

    web_app = web.Application()
    with pytest.raises(taskq.ConfigurationError, match="shutdown_timeout"):
        setup(web_app, jobs, shutdown_timeout=-1)
    setup(web_app, jobs)
    assert web_app[APP_KEY] is jobs
    with pytest.raises(taskq.ConfigurationError, match="already has a taskq App"):
        setup(web_app, jobs)


@pytest.mark.anyio
async def test_lifespan_composes_inside_another_lifespan(pg_dsn: str, schema: str) -> None:
    jobs = taskq.App(pg_dsn, schema=schema)

    @jobs.task
    async def double(x: int) -> int:
        return 2 * x

    async def workers() -> int:
        async with jobs.pool.acquire() as conn:
            return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".workers'))

    taskq_lifespan = lifespan(jobs, concurrency=2)
    async with taskq_lifespan:
        assert jobs.is_open
        assert await workers() == 1
        job = await double.enqueue(x=21)
        assert await job.result(timeout=TIMEOUT) == 42  # the lifespan's worker ran it
        with pytest.raises(taskq.ConfigurationError, match="already entered"):
            await taskq_lifespan.__aenter__()
    assert not jobs.is_open
    # Called with the web app, as a server does: a fresh context manager each time.
    async with lifespan(jobs, worker=False)(object()):
        assert jobs.is_open
        assert await workers() == 0  # this process only enqueues
    assert not jobs.is_open
