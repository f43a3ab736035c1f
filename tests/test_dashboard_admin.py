"""The dashboard's Queues, Cron and Workers pages, against real Postgres, a real
HTTP server, real workers and, where a person clicks, headless Chromium."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

import taskq
from taskq.dashboard import Dashboard, no_auth

from .conftest import until
from .dashboard_support import Browser, browser, csrf_form, serve

pytestmark = pytest.mark.anyio

SCRIPT = "<script>document.title='pwned'</script>"


async def click_live(b: Browser, css: str) -> None:
    """Click a button inside a live region: a refresh may replace it between
    finding and clicking, so find it again."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(20):
        try:
            await b.click(css)
            return
        except StaleElementReferenceException:
            await asyncio.sleep(0.05)
    raise AssertionError(f"{css} kept being replaced")


async def queue_row(pg_dsn: str, schema: str, name: str) -> dict[str, object] | None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        row = await conn.fetchrow(
            f'SELECT paused, concurrency_limit, rate_limit, rate_period FROM "{schema}".queues '
            "WHERE name = $1",
            name,
        )
    finally:
        await conn.close()
    return None if row is None else dict(row)


async def test_pausing_a_queue_from_the_page_keeps_new_jobs_queued(
    app: taskq.App, tmp_path: Path
) -> None:
    @app.task(queue="mail")
    async def send(to: str) -> str:
        return f"sent to {to}"

    @app.task(queue="control")
    async def control() -> str:
        return "ran"

    async with app:
        # A job due in an hour makes the queue show before any setting exists.
        await send.options(delay=3600).enqueue(to="later@example.com")
        dashboard = Dashboard(app, auth=no_auth, live_interval=0.5)
        async with serve(dashboard) as url, browser(url, tmp_path / "shots") as b:
            await b.get("/queues")
            row = "[data-region=queues] tr[data-queue=mail]"
            await b.wait_text(row, "active")
            await click_live(b, f"{row} button[form=queue-pause]")
            await b.accept_alert()
            await b.wait_text(".flash.ok", "Queue mail paused")
            assert (await app.queue("mail").info()).paused is True
            await b.wait_text("#live-state", "live")
            await b.wait_text(row, "paused")

            async with app.worker(concurrency=4):
                held = await send.enqueue(to="held@example.com")
                probe = await control.enqueue()
                # The worker claimed the control job, so it had its chance at
                # the paused queue's job too: that one must still be queued.
                assert await probe.result(timeout=15) == "ran"
                assert (await held.status()).state == "queued"
                # The live table counts it as ready without a reload.
                await b.wait_text(row, lambda t: "paused" in t and " 1 " in f" {t} ")
                await b.screenshot("queues-paused")

                await click_live(b, f"{row} button[form=queue-resume]")
                await b.wait_text(".flash.ok", "Queue mail resumed")
                assert await held.result(timeout=15) == "sent to held@example.com"
                await b.wait_text(row, "active")
            # A queue that shows up after the page loaded is paused from it too.
            await send.options(queue="late", delay=3600).enqueue(to="late@example.com")
            await b.wait_text("[data-region=queues]", "late")
            await click_live(b, "tr[data-queue=late] button[form=queue-pause]")
            await b.accept_alert()
            await b.wait_text(".flash.ok", "Queue late paused")
            assert (await app.queue("late").info()).paused is True
            assert await b.console_errors() == []
        await dashboard.aclose()


async def test_queue_limits_are_edited_with_validation(
    app: taskq.App, pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    @app.task(queue="mail")
    async def send(to: str) -> None:
        return None

    @app.task(queue="reports", rate_limit="10/minute")
    async def report() -> None:
        return None

    async with app:
        await send.enqueue(to="a@example.com")
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, browser(url, tmp_path / "shots") as b:
            concurrency = "input[form='limits-mail'][name=concurrency_limit]"
            rate = "input[form='limits-mail'][name=rate_limit]"
            await b.get("/queues")
            await b.fill(concurrency, "2")
            await b.fill(rate, "5/1s")
            await b.click("button[form='limits-mail']")
            await b.wait_text(".flash.ok", "at most 2 running")
            assert await queue_row(pg_dsn, schema, "mail") == {
                "paused": False,
                "concurrency_limit": 2,
                "rate_limit": 5,
                "rate_period": 1.0,
            }
            # The page shows what was saved, in the table and in the form.
            await b.wait_text("[data-region=queues] tr[data-queue=mail]", "5 per 1 s")
            assert await b.script(f'return document.querySelector("{rate}").value') == "5/1s"
            await b.screenshot("queues-limits")

            for limit, rate_value, message in [
                ("0", "5/1s", "must be at least 1"),
                ("-1", "5/1s", "must be at least 1"),
                ("abc", "5/1s", "not a whole number"),
                ("2", "10/0s", "period must be between"),
                ("2", "abc", "bad rate limit"),
                ("2", "0/1s", "count must be between"),
            ]:
                await b.get("/queues")
                await b.fill(concurrency, limit)
                await b.fill(rate, rate_value)
                await b.click("button[form='limits-mail']")
                flash = await b.wait_text(".flash.bad", "Queue mail not changed")
                assert message in flash, (limit, rate_value, flash)
                assert await queue_row(pg_dsn, schema, "mail") == {
                    "paused": False,
                    "concurrency_limit": 2,
                    "rate_limit": 5,
                    "rate_period": 1.0,
                }

            # Blank fields remove both limits.
            await b.get("/queues")
            await b.fill(concurrency, "")
            await b.fill(rate, "")
            await b.click("button[form='limits-mail']")
            await b.wait_text(".flash.ok", "no concurrency limit, no rate limit")
            row = await queue_row(pg_dsn, schema, "mail")
            assert row is not None and row["concurrency_limit"] is None
            assert row["rate_limit"] is None

        # A task's rate limit, recorded by a worker, is shown read-only.
        async with app.worker(concurrency=1):
            pass
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            r = await client.get("/queues")
            assert "10 per 60 s" in r.text and "report" in r.text
        await dashboard.aclose()


def next_daily(hour: int, now: datetime) -> datetime:
    first = now.replace(hour=hour, minute=0, second=0, microsecond=0)
    return first if first > now else first + timedelta(days=1)


async def test_cron_entries_with_next_runs_and_trigger_now(
    app: taskq.App, pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    @app.cron("0 3 * * *", args={"note": SCRIPT}, queue="nightly")
    @app.task(queue="default")
    async def nightly(note: str) -> str:
        return f"done: {len(note)}"

    # A worker records its App's entries when its scheduler starts.
    async with app.worker(concurrency=1):
        await until(lambda: _has_cron(pg_dsn, schema), 15, "the worker to record the cron entry")

    # The dashboard of a process that does not import the task: the entry and
    # the task are known from what the worker recorded.
    viewer = taskq.App(pg_dsn, schema=schema)
    async with viewer:
        dashboard = Dashboard(viewer, auth=no_auth, live_interval=0.5)
        name = next(iter(app.crons))
        async with serve(dashboard) as url, browser(url, tmp_path / "shots") as b:
            await b.get("/cron")
            row = f"[data-region=entries] tr[data-cron='{name}']"
            text = await b.wait_text(row, "none yet")
            assert "0 3 * * *" in text and "nightly" in text and "none yet" in text
            first = next_daily(3, datetime.now(UTC))
            runs = await b.wait_text(f"{row} .next-runs", "UTC")
            for day in range(3):
                assert (first + timedelta(days=day)).strftime("%Y-%m-%d 03:00:00 UTC") in runs
            # The arguments are data: shown as text, never run.
            assert SCRIPT not in await b.source()
            assert await b.script("return document.title") != "pwned"

            await click_live(b, f"{row} button[form=cron-trigger]")
            await b.accept_alert()
            flash = await b.wait_text(".flash.ok", "triggered: job")
            job_id = int(flash.split("job ")[1].split(" ")[0])
            status = await viewer.get_job(job_id).status()
            assert (status.state, status.task, status.queue) == ("queued", name, "nightly")
            await b.wait_text(f"{row} .last-job", f"#{job_id} queued")
            assert (
                await b.script(
                    f"return document.querySelector(\"{row} .last-job a\").getAttribute('href')"
                )
                == f"/jobs/{job_id}"
            )

            # A worker runs it; the page shows how it ended, live.
            async with app.worker(concurrency=1, queues=["nightly"]):
                assert await viewer.get_job(job_id).result(timeout=15) == f"done: {len(SCRIPT)}"
            await b.wait_text(f"{row} .last-job", "succeeded")
            await b.screenshot("cron")
            assert await b.console_errors() == []

        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            token = await csrf_form(client, "/cron")
            r = await client.post("/cron/no.such.entry/trigger", data=token)
            assert r.status_code == 404 and "no.such.entry" in r.text
        await dashboard.aclose()


async def test_workers_page_shows_live_and_stale_workers(
    app: taskq.App, pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    @app.task(queue="slow")
    async def hold() -> None:
        started.set()
        await release.wait()

    async with app:
        conn = await asyncpg.connect(pg_dsn)
        try:
            # A worker that stopped beating 90 s ago: stale, but not yet old
            # enough for the upkeep to forget it.
            await conn.execute(
                f'INSERT INTO "{schema}".workers (id, hostname, pid, queues, tasks, '
                "concurrency, started_at, heartbeat_at) VALUES ('gone-1', 'aaa-old-host', 4242, "
                "ARRAY['mail'], ARRAY['x.y'], 7, now() - interval '1 hour', "
                "now() - interval '90 seconds')"
            )
        finally:
            await conn.close()
        dashboard = Dashboard(app, auth=no_auth, live_interval=0.5)
        async with (
            serve(dashboard) as url,
            browser(url, tmp_path / "shots") as b,
            app.worker(concurrency=3) as worker,
        ):
            job = await hold.enqueue()
            await asyncio.wait_for(started.wait(), 15)
            await b.get("/workers")
            live = "[data-region=workers] tbody tr:not(.stale-row)"
            await b.wait_text(live, "1 / 3")
            text = await b.wait_text(live, "live")
            assert "live" in text and f"#{job.id}" in text and "all" in text
            # Stale, and sorted after the live one although its host sorts first.
            rows = await b.script(
                "return Array.from(document.querySelectorAll('[data-region=workers] tbody tr'))"
                ".map(r => r.dataset.worker)"
            )
            assert rows == [worker.id, "gone-1"], rows
            stale = await b.wait_text("tr[data-worker='gone-1']", "stale")
            assert "stale" in stale and "0 / 7" in stale and "mail" in stale
            assert "1 min" in stale  # its heartbeat's age
            await b.screenshot("workers")
            release.set()
            await job.result(timeout=15)
            await b.wait_text(live, "0 / 3")
            assert await b.console_errors() == []
        await dashboard.aclose()


async def test_read_only_pages_show_no_forms_and_refuse_posts(
    app: taskq.App, pg_dsn: str, schema: str
) -> None:
    # Yearly: no slot falls due while the worker records it.
    @app.cron("0 0 1 1 *")
    @app.task(queue="mail")
    async def sweep() -> None:
        return None

    async with app:
        async with app.worker(concurrency=1):
            await app.queue("mail").configure(concurrency_limit=3)
            await until(
                lambda: _has_cron(pg_dsn, schema), 15, "the worker to record the cron entry"
            )
        dashboard = Dashboard(app, auth=no_auth, read_only=True)
        name = next(iter(app.crons))
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            for path in ("/queues", "/cron", "/workers"):
                r = await client.get(path)
                assert r.status_code == 200, path
                assert "<form" not in r.text and "<button" not in r.text, path
            assert "0 0 1 1 *" in (await client.get("/cron")).text
            for path in (
                "/queues/mail/pause",
                "/queues/mail/resume",
                "/queues/mail/limits",
                f"/cron/{name}/trigger",
            ):
                r = await client.post(path, data={"csrf_token": "x", "concurrency_limit": "1"})
                assert r.status_code == 403 and "read-only" in r.text, path
        info = await app.queue("mail").info()
        assert (info.paused, info.concurrency_limit) == (False, 3)
        assert await app.queue_counts() == []  # nothing was triggered
        await dashboard.aclose()


async def _has_cron(pg_dsn: str, schema: str) -> bool:
    conn = await asyncpg.connect(pg_dsn)
    try:
        return bool(await conn.fetchval(f'SELECT count(*) FROM "{schema}".crons'))
    finally:
        await conn.close()
