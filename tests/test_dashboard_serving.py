"""Serving the dashboard: ``python -m taskq dashboard`` as a real process, and the
dashboard mounted under /taskq in FastAPI, Django and aiohttp, each behind a
real server: links, static files, actions with their CSRF token, redirects,
cookies and the live event stream all stay under the prefix."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from aiohttp import web
from fastapi import FastAPI

import taskq
from taskq.contrib.aiohttp import mount_dashboard as aiohttp_mount
from taskq.contrib.django import mount_dashboard as django_mount
from taskq.dashboard import Dashboard, basic_auth, no_auth

from .conftest import PYTHON, ROOT, subprocess_env, until
from .dashboard_support import browser, csrf_form, serve

pytestmark = pytest.mark.anyio

# Generous for a loaded machine: every wait ends as soon as its condition holds.
TIMEOUT = 60.0
PASSWORD = "correct horse battery"
AUTH = {"authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}


def make_tasks(app: taskq.App) -> taskq.Task:
    @app.task(queue="mail")
    async def send(to: str) -> str:
        return f"sent to {to}"

    return send


def local_paths(html: str) -> list[str]:
    """Every link, form target and asset of a page that is a path on this site."""
    found = re.findall(r'(?:href|src|action)="([^"]*)"', html)
    return [p for p in found if p.startswith("/")]


def assert_under(html: str, root: str) -> None:
    paths = local_paths(html)
    assert paths, "the page links nowhere"
    outside = [p for p in paths if not p.startswith(root + "/")]
    assert not outside, f"links outside {root}/: {outside}"


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of a server-sent event stream, as they arrive."""
    buffer = ""
    async for chunk in response.aiter_text():
        buffer += chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            event, data = "message", []
            for line in block.splitlines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
            if data:
                yield event, "\n".join(data)


async def live_counts(
    client: httpx.AsyncClient, root: str, change: Callable[[], Awaitable[Any]] | None, want: int
) -> None:
    """Open the overview's event stream under ``root``; its first regions answer;
    after ``change`` (if given) a later event shows ``want`` queued jobs."""
    url = f"{root}/events?page=/"
    async with client.stream("GET", url, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        changed = False
        with anyio.fail_after(TIMEOUT):
            async for event, data in sse_events(response):
                if event != "regions":
                    continue
                regions = json.loads(data)
                if "summary" in regions:
                    assert_under(regions["summary"], root)
                    queued = re.search(r'data-count="queued">([0-9,]+)<', regions["summary"])
                    assert queued is not None, regions["summary"]
                    if int(queued.group(1).replace(",", "")) == want and (
                        change is None or changed
                    ):
                        return
                if change is not None and not changed:
                    await change()
                    changed = True


async def check_mounted(
    client: httpx.AsyncClient,
    root: str,
    paused: Callable[[], Awaitable[bool]],
    *,
    queue: str = "mail",
) -> None:
    """The overview, static files and the pause action, all under ``root``."""
    r = await client.get(f"{root}/")
    assert r.status_code == 200, r.text
    assert "Overview" in r.text
    assert_under(r.text, root)
    css = await client.get(f"{root}/static/taskq.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert ".card" in css.text
    js = await client.get(f"{root}/static/taskq.js")
    assert js.status_code == 200 and "EventSource" in js.text

    token = await csrf_form(client, f"{root}/queues")
    r = await client.post(f"{root}/queues/{queue}/pause", data=token)
    assert r.status_code == 303, r.text
    location = r.headers["location"]
    assert location.startswith(f"{root}/"), location
    assert f"Path={root}" in r.headers["set-cookie"], r.headers["set-cookie"]
    assert await paused()
    r = await client.get(location)
    assert r.status_code == 200 and f"Queue {queue} paused" in r.text
    assert_under(r.text, root)


def read(path: Path) -> str:
    return path.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the command -----------------------------------------------------------


class Command:
    """``python -m taskq dashboard ...`` in a child process, output in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("w") as out:
            self.popen = subprocess.Popen(
                [PYTHON, "-m", "taskq", "dashboard", *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def output(self) -> str:
        return self.log.read_text()

    async def url(self) -> str:
        """The address it says it serves on (it logs it once listening)."""

        async def said() -> str | None:
            if self.popen.poll() is not None:
                raise AssertionError(f"exited with {self.popen.returncode}:\n{self.output()}")
            found = re.search(r"on (http://\S+?)/ \(", self.output())
            return found.group(1) if found else None

        url: str = await until(said, TIMEOUT, "the dashboard to say where it serves")
        return url

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        self.popen.send_signal(sig)
        deadline = time.monotonic() + TIMEOUT
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                self.popen.kill()
                raise AssertionError(f"no exit within {TIMEOUT}s of {sig}:\n{self.output()}")
            await asyncio.sleep(0.05)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture
def command(tmp_path: Path) -> Any:
    started: list[Command] = []

    def start(args: list[str], env: dict[str, str]) -> Command:
        c = Command(args, env, tmp_path / f"dashboard-{len(started)}.log")
        started.append(c)
        return c

    yield start
    for c in started:
        c.kill()


def test_the_command_refuses_to_start_without_a_password(pg_dsn: str, schema: str) -> None:
    env = subprocess_env(pg_dsn)
    env.pop("TASKQ_DASHBOARD_PW", None)
    base = [PYTHON, "-m", "taskq", "dashboard", "--schema", schema, "--port", "0"]
    done = subprocess.run(base, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2, done.stderr
    assert "needs a password" in done.stderr
    assert "--password-env VAR" in done.stderr and "--insecure-no-auth" in done.stderr
    assert "Traceback" not in done.stderr

    for extra, message in (
        (["--password-env", "TASKQ_DASHBOARD_PW"], "$TASKQ_DASHBOARD_PW is not set or is empty"),
        (["--password-env", "X", "--insecure-no-auth"], "not both"),
    ):
        done = subprocess.run(
            base + extra, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
    env["TASKQ_DASHBOARD_PW"] = ""
    done = subprocess.run(
        [*base, "--password-env", "TASKQ_DASHBOARD_PW"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 2 and "is empty" in done.stderr


def test_the_command_names_the_extra_when_uvicorn_is_missing(pg_dsn: str) -> None:
    code = (
        "import sys; sys.modules['uvicorn'] = None; from taskq.cli import main; "
        "sys.exit(main(['dashboard', '--insecure-no-auth']))"
    )
    done = subprocess.run(
        [PYTHON, "-c", code], env=subprocess_env(pg_dsn), capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    assert "needs uvicorn: pip install 'taskq-pg[dashboard]'" in done.stderr


async def test_the_command_serves_with_a_password_and_stops_on_sigterm(
    app: taskq.App, pg_dsn: str, schema: str, command: Callable[..., Command]
) -> None:
    send = make_tasks(app)
    async with app:
        await send.enqueue(to="someone@example.com")
        await app.queue("mail").resume()
        env = subprocess_env(pg_dsn, TASKQ_DASHBOARD_PW=PASSWORD)
        proc = command(
            ["--schema", schema, "--port", "0", "--password-env", "TASKQ_DASHBOARD_PW"], env
        )
        url = await proc.url()
        assert url.startswith("http://127.0.0.1:")  # the default host: this machine only
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
            r = await client.get("/")
            assert r.status_code == 401 and "mail" not in r.text
            client.headers.update(AUTH)
            r = await client.get("/")
            assert r.status_code == 200 and "admin" in r.text
            assert "/jobs?queue=mail&amp;state=queued" in r.text
            token = await csrf_form(client, "/queues")
            r = await client.post("/queues/mail/pause", data=token)
            assert r.status_code == 303 and r.headers["location"] == "/queues"
            assert await _paused(app, "mail")
            # An open live page must not hold up the stop.
            async with client.stream("GET", "/events?page=/") as stream:
                assert stream.status_code == 200
                # Kept in a variable: a dropped iterator would close the stream.
                chunks = stream.aiter_text()
                assert "connected" in await anext(chunks)
                status = await proc.stop(signal.SIGTERM)
        output = proc.output()
        assert status == 0, output
        assert "Traceback" not in output and "ERROR" not in output, output
        assert "SIGTERM received, stopping" in output
        assert "taskq dashboard stopped" in output


async def _paused(app: taskq.App, queue: str) -> bool:
    return (await app.queue(queue).info()).paused


async def test_read_only_and_no_auth_from_the_command(
    app: taskq.App, pg_dsn: str, schema: str, command: Callable[..., Command]
) -> None:
    make_tasks(app)
    async with app:
        await app.queue("mail").resume()
        proc = command(
            [
                "--dsn",
                pg_dsn,
                "--schema",
                schema,
                "--port",
                "0",
                "--insecure-no-auth",
                "--read-only",
                "--root-path",
                "/ops/taskq/",
            ],
            subprocess_env(pg_dsn),
        )
        url = await proc.url()
        assert url.endswith("/ops/taskq")
        # --root-path: a proxy strips /ops/taskq before passing the request on;
        # the pages' links keep it.
        server = url.removesuffix("/ops/taskq")
        async with httpx.AsyncClient(base_url=server, timeout=TIMEOUT) as client:
            r = await client.get("/queues")
            assert r.status_code == 200, r.text
            assert_under(r.text, "/ops/taskq")
            assert "/pause" not in r.text  # no action is offered
            cookie = r.cookies.get("taskq_csrf")
            assert cookie
            # A forged form with a token taken from a writable page is refused too.
            r = await client.post("/queues/mail/pause", data={"csrf_token": "0" * 64})
            assert r.status_code == 403 and "read-only" in r.text
            assert not await _paused(app, "mail")
        status = await proc.stop(signal.SIGINT)
    output = proc.output()
    assert status == 0, output
    assert "warning: --insecure-no-auth" in output
    assert "(read-only)" in output and "no password" in output
    assert "Traceback" not in output, output


# -- mounted -----------------------------------------------------------------


async def test_mounted_in_fastapi(app: taskq.App) -> None:
    send = make_tasks(app)
    async with app:
        await app.queue("mail").resume()
        await send.enqueue(to="a@example.com")
        dashboard = Dashboard(app, auth=basic_auth("admin", PASSWORD), live_interval=0.5)
        api = FastAPI()

        @api.get("/hello")
        async def hello() -> dict[str, str]:
            return {"hello": "world"}

        api.mount("/taskq", dashboard)

        async def enqueue_more() -> None:
            for i in range(2):
                await send.enqueue(to=f"b{i}@example.com")

        async with (
            serve(api) as url,
            httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client,
        ):
            assert (await client.get("/hello")).json() == {"hello": "world"}
            assert (await client.get("/taskq/")).status_code == 401
            client.headers.update(AUTH)
            r = await client.get("/taskq", follow_redirects=False)
            assert r.status_code in (301, 307, 308)
            assert r.headers["location"].endswith("/taskq/")
            await check_mounted(client, "/taskq", lambda: _paused(app, "mail"))
            await live_counts(client, "/taskq", enqueue_more, want=3)
        await dashboard.aclose()


async def test_mounted_in_aiohttp(app: taskq.App) -> None:
    send = make_tasks(app)
    async with app:
        await app.queue("mail").resume()
        dashboard = Dashboard(app, auth=basic_auth("admin", PASSWORD), live_interval=0.5)
        web_app = web.Application()

        async def hello(request: web.Request) -> web.Response:
            return web.json_response({"hello": "world"})

        web_app.router.add_get("/hello", hello)
        aiohttp_mount(web_app, "/taskq", dashboard)
        # Longer than the test waits: a stream that held up the shutdown would fail it.
        runner = web.AppRunner(web_app, shutdown_timeout=TIMEOUT * 2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        cleaned = False
        try:
            port = runner.addresses[0][1]
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT
            ) as client:
                assert (await client.get("/hello")).json() == {"hello": "world"}
                assert (await client.get("/taskqx")).status_code == 404
                r = await client.get("/taskq/")
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
                client.headers.update(AUTH)
                await check_mounted(client, "/taskq", lambda: _paused(app, "mail"))
                # A HEAD answers like a GET, without a body.
                r = await client.head("/taskq/static/taskq.css")
                assert r.status_code == 200 and r.content == b""

                async def enqueue_one() -> None:
                    await send.enqueue(to="c@example.com")

                # A live event arrives over the bridged stream.
                await live_counts(client, "/taskq", enqueue_one, want=1)
            # The client went away: the bridge told the dashboard, whose stream ended.
            await until(lambda: _true(dashboard.hub.topics == 0), TIMEOUT, "the stream to end")

            # The server shuts down while a live page is open: its stream ends
            # (aiohttp's on_shutdown), the shutdown does not wait for it, and
            # the dashboard closes (on_cleanup).
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as client,
                client.stream("GET", "/taskq/events?page=/", timeout=TIMEOUT) as stream,
            ):
                chunks = stream.aiter_text()
                assert "connected" in await anext(chunks)
                with anyio.fail_after(TIMEOUT):
                    cleaned = True
                    await runner.cleanup()
                    # The stream ends: the server closed it properly.
                    async for _chunk in chunks:
                        pass
        finally:
            if not cleaned:
                await runner.cleanup()
        assert dashboard.hub._task is None


async def _true(value: bool) -> bool:
    return value


# -- Django ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def django_server(
    pg_dsn: str, schema: str, log: Path, *, lifespan: bool
) -> AsyncIterator[tuple[str, subprocess.Popen[str]]]:
    """uvicorn serving examples/django_app/project/asgi_dashboard.py."""
    port = free_port()
    env = subprocess_env(
        pg_dsn,
        TASKQ_SCHEMA=schema,
        TASKQ_DASHBOARD_PASSWORD=PASSWORD,
        TASKQ_DJANGO_LIFESPAN="1" if lifespan else "0",
    )
    args = [PYTHON, "-m", "uvicorn", "project.asgi_dashboard:application"]
    args += ["--app-dir", str(ROOT / "examples" / "django_app"), "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:

        async def answers() -> bool:
            assert proc.poll() is None, read(log)
            try:
                async with httpx.AsyncClient() as c:
                    await c.get(url + "/no/such/page")
            except httpx.TransportError:
                return False
            return True

        await until(answers, TIMEOUT, "uvicorn to serve Django")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def stop_clean(proc: subprocess.Popen[str], log: Path) -> str:
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"no exit after SIGTERM:\n{read(log)}"
        await asyncio.sleep(0.05)
    output = read(log)
    # uvicorn re-raises the signal once it has shut down.
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete." in output, output
    assert "Traceback" not in output, output
    return output


@pytest.mark.parametrize("lifespan", [True, False], ids=["with_lifespan", "django_alone"])
async def test_mounted_in_django(
    app: taskq.App, pg_dsn: str, schema: str, tmp_path: Path, lifespan: bool
) -> None:
    send = make_tasks(app)
    async with app:  # the schema exists and the queue has a row
        await app.queue("emails").resume()
        log = tmp_path / "uvicorn.log"
        async with django_server(pg_dsn, schema, log, lifespan=lifespan) as (url, proc):
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
                # Django still answers its own addresses.
                r = await client.get("/no/such/page")
                assert r.status_code == 404 and "taskq" not in r.headers.get("set-cookie", "")
                assert "Page not found" in r.text  # Django's own 404 page (DEBUG)
                assert (await client.get("/taskq/")).status_code == 401
                client.headers.update(AUTH)
                await check_mounted(
                    client, "/taskq", lambda: _paused(app, "emails"), queue="emails"
                )

                async def enqueue_one() -> None:
                    await send.enqueue(to="e@example.com")

                await live_counts(client, "/taskq", enqueue_one, want=1)
            await stop_clean(proc, log)


def test_mount_prefixes_are_checked() -> None:
    app = taskq.App("postgresql://nowhere/x", schema="x")
    dashboard = Dashboard(app, auth=no_auth)
    for bad in ("taskq", "", "//x", "/a?b"):
        with pytest.raises(taskq.ConfigurationError, match="prefix"):
            django_mount(dashboard, bad, dashboard)
        with pytest.raises(taskq.ConfigurationError, match="prefix"):
            aiohttp_mount(web.Application(), bad, dashboard)
    assert django_mount(dashboard, "/taskq/", dashboard).prefix == "/taskq"


# -- a browser on the FastAPI mount ---------------------------------------------


async def test_the_mounted_dashboard_in_a_browser(app: taskq.App, tmp_path: Path) -> None:
    send = make_tasks(app)
    async with app:
        await send.enqueue(to="d@example.com")
        dashboard = Dashboard(app, auth=no_auth, live_interval=0.5)
        api = FastAPI()
        api.mount("/taskq", dashboard)
        async with serve(api) as url, browser(url, tmp_path / "shots") as b:
            await b.get("/taskq/")
            await b.wait_text("#live-state", "live")
            assert await b.text("[data-count=queued]") == "1"
            # The stylesheet under /taskq/static applied: the cards are laid out by it.
            display = await b.script(
                "return getComputedStyle(document.querySelector('.card')).display"
            )
            assert display != "inline", display
            links = await b.script(
                "return Array.from(document.querySelectorAll('nav a')).map(a => a.pathname)"
            )
            assert links and all(p.startswith("/taskq/") for p in links), links
            await b.screenshot("dashboard-mounted-fastapi")
            assert await b.console_errors() == []
        await dashboard.aclose()


def test_ci_installs_the_browser() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    install = ci.index("chromium chromium-driver")
    assert "DEBIAN_FRONTEND=noninteractive" in ci
    assert install < ci.index("python -m pytest")
