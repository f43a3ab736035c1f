"""The dashboard's frame: serving, live updates, and its safety (auth, CSRF,
read-only, headers, escaping). Real Postgres, real HTTP (uvicorn), and a real
browser (headless Chromium) where what matters happens in one."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import taskq
import taskq.dashboard
from taskq.dashboard import Dashboard, basic_auth, no_auth

from .dashboard_support import browser, csrf_form, serve

pytestmark = pytest.mark.anyio

SCRIPT = "<script>document.title='pwned'</script>"


def make_app(app: taskq.App) -> dict[str, taskq.Task]:
    @app.task(queue="mail")
    async def send(to: str) -> str:
        return f"sent to {to}"

    @app.task(queue="mail")
    async def slow(seconds: float) -> None:
        await asyncio.sleep(seconds)

    return {"send": send, "slow": slow}


def test_import_taskq_loads_no_web_dependency() -> None:
    code = (
        "import sys, taskq; "
        "print(any(m in sys.modules for m in ('starlette', 'jinja2', 'uvicorn')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_auth_is_required_and_checked() -> None:
    app = taskq.App("postgresql://nowhere/x", schema="x")
    with pytest.raises(TypeError, match="no_auth"):
        Dashboard(app, auth=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="password"):
        basic_auth("admin", "")
    with pytest.raises(ValueError, match="16 bytes"):
        Dashboard(app, auth=no_auth, secret="short")


async def test_overview_updates_live_in_a_browser(app: taskq.App, tmp_path: Path) -> None:
    tasks = make_app(app)

    @app.task(queue="billing", retry=1)
    async def charge(card: str) -> None:
        raise ValueError(f"card {card} declined")

    async with app:
        for i in range(3):
            await tasks["send"].enqueue(to=f"user{i}@example.com")
        dashboard = Dashboard(app, auth=no_auth, live_interval=0.5)
        async with serve(dashboard) as url, browser(url, tmp_path / "shots") as b:
            await b.get("/")
            assert await b.text("[data-count=queued]") == "3"
            assert "mail" in await b.text("[data-region=queues]")
            await b.wait_text("#live-state", "live")
            # Counters change without a reload: the worker drains the queue.
            marker = await b.script("window.marker = Math.random(); return window.marker")
            async with app.worker(concurrency=4):
                failed = [await charge.enqueue(card=f"4242-{i}") for i in range(2)]
                await b.wait_text("[data-count=queued]", "0", timeout=15)
                await b.wait_text("[data-region=charts]", "3 succeeded", timeout=15)
                await b.wait_text("[data-region=charts]", "2 failed", timeout=15)
            for job in failed:
                assert (await job.status()).state is taskq.JobState.FAILED
            # New work shows up too: a backlog, and a job due later.
            for i in range(4):
                await tasks["send"].enqueue(to=f"later{i}@example.com")
            await tasks["send"].options(delay=3600).enqueue(to="tomorrow@example.com")
            await b.wait_text("[data-count=queued]", "4", timeout=15)
            await b.wait_text("[data-count=scheduled]", "1", timeout=15)
            assert await b.script("return window.marker") == marker  # same page, no reload
            await b.screenshot("overview")
            assert await b.console_errors() == []
        await dashboard.aclose()


async def test_a_refused_user_sees_nothing_and_changes_nothing(app: taskq.App) -> None:
    tasks = make_app(app)
    async with app:
        job = await tasks["send"].enqueue(to="secret@example.com")
        dashboard = Dashboard(app, auth=basic_auth("admin", "s3cret-pass"))
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            for path in ("/", f"/jobs/{job.id}", "/jobs?state=queued", "/static/taskq.js"):
                r = await client.get(path)
                assert r.status_code == 401, path
                assert "secret@example.com" not in r.text
                assert r.headers["www-authenticate"].startswith("Basic realm=")
            wrong = base64.b64encode(b"admin:wrong").decode()
            r = await client.get("/", headers={"authorization": f"Basic {wrong}"})
            assert r.status_code == 401
            r = await client.post("/queues/mail/pause", data={"csrf_token": "x"})
            assert r.status_code == 401
            good = base64.b64encode(b"admin:s3cret-pass").decode()
            r = await client.get("/", headers={"authorization": f"Basic {good}"})
            assert r.status_code == 200 and "admin" in r.text
        assert (await app.queue("mail").info()).paused is False
        await dashboard.aclose()


async def test_a_callable_auth_refusal_is_403_without_data(app: taskq.App) -> None:
    tasks = make_app(app)

    async def only_admins(request: object) -> str | None:
        return "ops" if getattr(request, "headers", {}).get("x-user") == "ops" else None

    async with app:
        await tasks["send"].enqueue(to="hidden@example.com")
        dashboard = Dashboard(app, auth=only_admins)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            r = await client.get("/jobs?state=queued")
            assert r.status_code == 403 and "hidden@example.com" not in r.text
            r = await client.get("/jobs?state=queued", headers={"x-user": "ops"})
            assert r.status_code == 200
        await dashboard.aclose()


async def test_csrf_and_origin_are_checked_on_every_post(app: taskq.App) -> None:
    make_app(app)
    async with app:
        await app.queue("mail").resume()  # the queue row exists
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            # No token at all.
            r = await client.post("/queues/mail/pause", data={})
            assert r.status_code == 403 and "security token is missing" in r.text
            token = await csrf_form(client, "/queues")
            # A token that does not belong to this browser's cookie.
            r = await client.post("/queues/mail/pause", data={"csrf_token": "0" * 64})
            assert r.status_code == 403 and "security token is wrong" in r.text
            # The right token from another site's page.
            r = await client.post(
                "/queues/mail/pause", data=token, headers={"origin": "https://evil.example"}
            )
            assert r.status_code == 403 and "another site" in r.text
            # A GET never changes anything.
            r = await client.get("/queues/mail/pause")
            assert r.status_code in (404, 405)
            assert (await app.queue("mail").info()).paused is False
            # The real form works.
            r = await client.post("/queues/mail/pause", data=token)
            assert r.status_code == 303
            assert (await app.queue("mail").info()).paused is True
        await dashboard.aclose()


async def test_security_headers_on_every_response(app: taskq.App) -> None:
    make_app(app)
    async with app:
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            for path in ("/", "/nope", "/static/taskq.css", "/jobs?state=queued"):
                r = await client.get(path)
                csp = r.headers["content-security-policy"]
                assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
                assert "frame-ancestors 'none'" in csp
                assert r.headers["x-content-type-options"] == "nosniff"
                assert r.headers["x-frame-options"] == "DENY"
            r = await client.get("/")
            assert "no-store" in r.headers["cache-control"]
            assert "<script>" not in r.text.replace(
                '<script src="/static/taskq.js" defer></script>', ""
            )
        await dashboard.aclose()


async def test_read_only_shows_no_action_and_refuses_a_forged_post(app: taskq.App) -> None:
    tasks = make_app(app)
    async with app:
        await tasks["send"].enqueue(to="a@example.com")
        dashboard = Dashboard(app, auth=no_auth, read_only=True)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            for path in ("/", "/queues", "/jobs?state=queued", "/workflows", "/cron", "/workers"):
                r = await client.get(path)
                assert r.status_code == 200, path
                assert "<form" not in r.text.replace('<form class="filters"', ""), path
                assert "read-only" in r.text
            # Refused before the token is even looked at: read-only is not a
            # matter of hiding buttons.
            r = await client.post("/queues/mail/pause", data={"csrf_token": "x"})
            assert r.status_code == 403 and "read-only" in r.text
        assert (await app.queue("mail").info()).paused is False
        await dashboard.aclose()


async def test_a_form_posted_from_another_site_is_refused_in_a_browser(
    app: taskq.App, tmp_path: Path
) -> None:
    """A real cross-site forgery: a page on another origin whose form posts to
    the dashboard. The browser sends the dashboard's cookie along (same host,
    other port: the same site), but the form has no valid token and its
    Origin is foreign: refused, nothing changes."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    make_app(app)
    async with app:
        await app.queue("mail").resume()
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, browser(url, tmp_path / "shots") as b:

            async def evil_page(_request: object) -> HTMLResponse:
                return HTMLResponse(
                    f'<form id="f" method="post" action="{url}/queues/mail/pause">'
                    '<input type="hidden" name="csrf_token" value="guess">'
                    '<button id="go">win a prize</button></form>'
                )

            evil = Starlette(routes=[Route("/", evil_page)])
            async with serve(evil) as evil_url:
                await b.get("/queues")  # the dashboard's cookie is set in this browser
                await b.call(b.driver.get, evil_url + "/")
                await b.click("#go")
                await b.wait_text("body", "Refused")
                assert "another site" in await b.text("body")
        assert (await app.queue("mail").info()).paused is False
        await dashboard.aclose()


async def test_pages_fetch_nothing_from_elsewhere(app: taskq.App) -> None:
    """Air-gapped networks: every script, stylesheet and image is the
    dashboard's own (and the CSP would block anything else)."""
    make_app(app)
    async with app:
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            for path in ("/", "/jobs", "/workflows", "/queues", "/cron", "/workers"):
                html = (await client.get(path)).text
                for found in re.findall(r'(?:src|href)="([^"]*)"', html):
                    assert found.startswith(("/", "?", "#", "data:")), (path, found)
                    assert not found.startswith("//"), (path, found)
        await dashboard.aclose()


async def test_a_database_that_cannot_be_reached_is_a_clear_page() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = taskq.App(f"postgresql://postgres@127.0.0.1:{port}/x", schema="x", connect_retry=0.3)
    dashboard = Dashboard(app, auth=no_auth)
    async with serve(dashboard) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        r = await client.get("/")
        assert r.status_code == 503
        assert "The database could not answer" in r.text and str(port) in r.text
    await dashboard.aclose()
