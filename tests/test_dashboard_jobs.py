"""The jobs page: tabs, filters, keyset paging, bounded searches, bulk actions.

Real Postgres, a real HTTP server (uvicorn) and, where a person acts, a real
browser (headless Chromium). Finished jobs are written straight into history
(ids from the jobs sequence, as finish() keeps them), so each test controls
states, queues, times and arguments exactly.
"""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

import taskq
from taskq.dashboard import Dashboard, no_auth
from taskq.dashboard.pages import jobs_query

from .dashboard_support import Browser, browser, csrf_form, serve

pytestmark = pytest.mark.anyio

SCRIPT = "<script>document.title='pwned'</script>"
NOW = datetime.now(UTC).replace(microsecond=0)


def make_app(app: taskq.App) -> dict[str, taskq.Task]:
    @app.task(queue="mail", name="t.send")
    async def send(to: str) -> str:
        return to

    @app.task(queue="reports", name="t.report")
    async def report(n: int) -> int:
        return n

    return {"send": send, "report": report}


async def finished(
    conn: asyncpg.Connection,
    schema: str,
    n: int = 1,
    *,
    state: str = "failed",
    queue: str = "mail",
    task: str = "t.send",
    args: str = '{"n": %d}',
    enqueued_at: datetime | None = None,
    finished_at: datetime | None = None,
    error: str = "ValueError",
) -> list[int]:
    """``n`` finished jobs in history, ids from the jobs sequence; their ids, oldest first."""
    s = f'"{schema}"'
    ids = []
    for i in range(n):
        ids.append(
            await conn.fetchval(
                f"INSERT INTO {s}.history (id, queue, task, args, state, priority, attempts, "
                "max_attempts, enqueued_at, finished_at, error) "
                f"VALUES (nextval(pg_get_serial_sequence('{s}.jobs', 'id')), $1, $2, $3::jsonb, "
                "$4, 0, 1, 1, $5, $6, CASE WHEN $4 = 'succeeded' THEN NULL ELSE "
                "jsonb_build_object('type', $7::text, 'message', 'boom ' || $8::text, "
                "'traceback', '') END) RETURNING id",
                queue,
                task,
                args % i if "%d" in args else args,
                state,
                enqueued_at or NOW - timedelta(hours=1),
                finished_at or NOW - timedelta(minutes=1),
                error,
                str(i),
            )
        )
    return ids


async def tick(b: Browser, job: int) -> None:
    """Tick a row's box in one step: the live region may be replaced between a
    WebDriver lookup and its click (once a box is ticked it is left alone)."""
    await b.script("document.querySelector(arguments[0]).click()", f"input[name=id][value='{job}']")


def ids_on(page: str) -> list[int]:
    """The job ids listed in a page's rows, top to bottom."""
    return [int(i) for i in re.findall(r'<td class="n"><a href="[^"]*/jobs/(\d+)">', page)]


def link(page: str, text: str) -> str | None:
    """The href of the link whose text contains ``text``."""
    for href, label in re.findall(r'<a href="([^"]+)"[^>]*>([^<]*)</a>', page):
        if text in label:
            return html.unescape(href)
    return None


async def test_each_tab_and_filter_lists_exactly_its_jobs(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    tasks = make_app(app)
    s = f'"{schema}"'
    async with app:
        due = await tasks["send"].enqueue(to="a@example.com")
        later = await tasks["send"].options(delay=3600).enqueue(to="later@example.com")
        running = await tasks["report"].enqueue(n=1)
        await conn.execute(
            f"UPDATE {s}.jobs SET state = 'running', started_at = now(), worker_id = 'w', "
            "lease_expires_at = now() + interval '1 hour' WHERE id = $1",
            running.id,
        )
        waiting = await conn.fetchval(
            f"INSERT INTO {s}.jobs (queue, task, args, state, workflow_id, step) "
            "VALUES ('mail', 't.send', '{}', 'waiting', 42, 'b') RETURNING id"
        )
        old = await finished(
            conn,
            schema,
            state="succeeded",
            args='{"to": "Old@Example.com"}',
            enqueued_at=NOW - timedelta(days=3),
            finished_at=NOW - timedelta(days=3),
        )
        ok = await finished(conn, schema, 2, state="succeeded", args='{"to": "x%d@example.com"}')
        failed_mail = await finished(conn, schema, 2, state="failed")
        failed_reports = await finished(
            conn, schema, state="failed", queue="reports", task="t.report", error="KeyError"
        )
        cancelled = await finished(conn, schema, state="cancelled")
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:

            async def listed(query: str) -> list[int]:
                r = await client.get("/jobs?" + query)
                assert r.status_code == 200, r.text
                return ids_on(r.text)

            assert await listed("") == [due.id]  # the default tab: ready jobs
            assert await listed("state=queued") == [due.id]
            assert await listed("state=scheduled") == [later.id]
            assert await listed("state=running") == [running.id]
            assert await listed("state=waiting") == [waiting]
            assert await listed("state=succeeded") == [*reversed(ok), *old]
            assert await listed("state=failed") == [*reversed(failed_mail + failed_reports)]
            assert await listed("state=cancelled") == cancelled
            # queue, task
            assert await listed("state=failed&queue=reports") == failed_reports
            assert await listed("state=failed&task=t.send") == list(reversed(failed_mail))
            assert await listed("state=failed&queue=mail&task=t.report") == []
            # text in the arguments, any case
            assert await listed("state=succeeded&text=old%40EXAMPLE") == old
            assert await listed("state=queued&text=nobody") == []
            # LIKE's wildcards are plain characters: no argument holds them.
            assert await listed("state=succeeded&text=%25") == []
            assert await listed("state=succeeded&text=_") == []
            # times: enqueued, finished
            cut = (NOW - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
            assert await listed(f"state=succeeded&enqueued_before={cut}") == old
            assert await listed(f"state=succeeded&finished_after={cut}") == list(reversed(ok))
            assert await listed(f"state=succeeded&finished_before={cut}") == old
            assert await listed(f"state=queued&enqueued_after={cut}") == [due.id]
            # The failed tab shows each error's type and message.
            page = (await client.get("/jobs?state=failed&queue=reports")).text
            assert "KeyError" in page and "boom 0" in page
            # Wrong input is a clear 400.
            r = await client.get("/jobs?state=nope")
            assert r.status_code == 400 and "state must be one of" in r.text
            r = await client.get("/jobs?state=failed&enqueued_after=yesterday")
            assert r.status_code == 400 and "enqueued_after" in r.text
            r = await client.get(f"/jobs?limit={jobs_query.MAX_PAGE_SIZE + 1}")
            assert r.status_code == 400
        await dashboard.aclose()


async def test_keyset_pages_never_repeat_or_skip_a_row(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    make_app(app)
    async with app:
        mail = await finished(conn, schema, 130, state="succeeded")
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            seen: list[int] = []
            pages: list[str] = []
            href: str | None = "/jobs?state=succeeded&limit=7"
            while href is not None:
                page = (await client.get(href)).text
                assert "OFFSET" not in href
                pages.append(href)
                seen.extend(ids_on(page))
                href = link(page, "Older")
                assert len(pages) < 40
            assert seen == sorted(mail, reverse=True)
            assert len(pages) == 19  # 18 full pages of 7 and one of 4
            # Back up again with "Newer": the same rows, page by page.
            back: list[int] = []
            href = link((await client.get(pages[-1])).text, "Newer")
            back = ids_on((await client.get(pages[-1])).text)
            while href is not None:
                page = (await client.get(href)).text
                back = ids_on(page) + back
                href = link(page, "Newer")
            assert back == seen
        await dashboard.aclose()


async def test_a_bounded_search_says_how_far_it_looked_and_continues(
    app: taskq.App, conn: asyncpg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_app(app)
    monkeypatch.setattr(jobs_query, "SCAN_ROWS", 40)
    async with app:
        needle = await finished(conn, schema, state="succeeded", args='{"to": "needle"}')
        hay = await finished(conn, schema, 100, state="succeeded")
        newest = await finished(conn, schema, state="succeeded", args='{"to": "Needle 2"}')
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            page = (await client.get("/jobs?state=succeeded&text=needle")).text
            # The newest match, then the note: no more than 40 rows were read.
            assert ids_on(page) == newest
            edge = sorted([*newest, *hay], reverse=True)[39]
            assert f"Searched rows down to id {edge}" in page
            href = link(page, "continue searching older")
            assert href is not None and f"before={edge}" in href
            found: list[int] = []
            for _ in range(5):
                page = (await client.get(href)).text
                found += ids_on(page)
                href = link(page, "continue searching older")
                if href is None:
                    break
            assert found == needle
            assert link(page, "Older") is None  # the end of history
        await dashboard.aclose()


async def test_retry_two_ticked_failed_jobs_in_a_browser(
    app: taskq.App, conn: asyncpg.Connection, schema: str, tmp_path: Path
) -> None:
    make_app(app)
    async with app:
        failed = await finished(conn, schema, 4, state="failed")
        await finished(
            conn, schema, state="failed", args='{"to": "' + SCRIPT + '"}', error="RuntimeError"
        )
        dashboard = Dashboard(app, auth=no_auth, live_interval=0.5)
        async with serve(dashboard) as url, browser(url, tmp_path / "shots") as b:
            await b.get("/jobs?state=failed")
            await b.wait_text("#live-state", "live")
            await b.screenshot("jobs-failed")
            for job in failed[:2]:
                await tick(b, job)
            await b.click("#bulk button[value=retry]")
            await b.wait_text(".flash", "Retried 2 jobs.")
            assert "state=failed" in await b.url()
            listed = await b.text("[data-region=rows]")
            for job in failed[:2]:
                assert f"\n{job} " not in listed and not listed.startswith(f"{job} ")
            assert ids_on(await b.source())[-2:] == [failed[3], failed[2]]
            await b.get("/jobs?state=queued")
            assert sorted(ids_on(await b.source())) == failed[:2]
            assert await b.script("return document.title") == "Jobs · Ready · taskq"
            assert await b.console_errors() == []
        await dashboard.aclose()


async def test_retry_all_matching_goes_through_a_confirmation_with_the_count(
    app: taskq.App, conn: asyncpg.Connection, schema: str, tmp_path: Path
) -> None:
    make_app(app)
    async with app:
        mail = await finished(conn, schema, 5, state="failed")
        other = await finished(conn, schema, 2, state="failed", queue="reports", task="t.report")
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, browser(url, tmp_path / "shots") as b:
            await b.get("/jobs?state=failed")
            await b.fill("form.filters input[name=queue]", "mail")
            await b.click("form.filters button[type=submit]")
            await b.wait_text("h1", "Jobs")
            assert sorted(ids_on(await b.source())) == mail
            await b.click("form[action$='/jobs/matching'] button[value=retry]")
            await b.wait_text("h1", "Retry 5 failed jobs in queue 'mail'?")
            await b.screenshot("jobs-confirm-retry")
            # Nothing happened yet.
            assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".jobs') == 0
            await b.click(".confirm button[type=submit]")
            await b.wait_text(".flash", "Retried 5 jobs.")
            assert ids_on(await b.source()) == []  # the mail filter is kept
            await b.get("/jobs?state=failed")
            assert sorted(ids_on(await b.source())) == other
        assert sorted(await conn.fetchval(f'SELECT array_agg(id) FROM "{schema}".jobs')) == mail
        await dashboard.aclose()


async def test_cancel_ticked_queued_jobs_in_a_browser(
    app: taskq.App, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    tasks = make_app(app)
    async with app:
        jobs = [await tasks["send"].enqueue(to=f"u{i}@example.com") for i in range(3)]
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, browser(url, tmp_path / "shots") as b:
            await b.get("/jobs?state=queued")
            for job in jobs[:2]:
                await tick(b, job.id)
            await b.click("#bulk button[value=cancel]")
            await b.accept_alert()  # data-confirm
            await b.wait_text(".flash", "Cancelled 2 jobs.")
            assert ids_on(await b.source()) == [jobs[2].id]
            await b.get("/jobs?state=cancelled")
            assert ids_on(await b.source()) == [jobs[1].id, jobs[0].id]
        for job in jobs[:2]:
            assert (await job.status()).state == "cancelled"
        await dashboard.aclose()


async def test_delete_a_ticked_job_from_history_in_a_browser(
    app: taskq.App, conn: asyncpg.Connection, schema: str, tmp_path: Path
) -> None:
    make_app(app)
    async with app:
        done = await finished(conn, schema, 3, state="succeeded")
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, browser(url, tmp_path / "shots") as b:
            await b.get("/jobs?state=succeeded")
            await tick(b, done[1])
            await b.click("#bulk button[value=delete]")
            await b.wait_text("h1", "Delete 1 succeeded job from history?")
            assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".history') == 3
            await b.click(".confirm button[type=submit]")
            await b.wait_text(".flash", "Deleted 1 job from history.")
            assert ids_on(await b.source()) == [done[2], done[0]]
        left = await conn.fetchval(f'SELECT array_agg(id ORDER BY id) FROM "{schema}".history')
        assert left == [done[0], done[2]]
        await dashboard.aclose()


async def test_delete_all_matching_a_text_filter(
    app: taskq.App, conn: asyncpg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_app(app)
    monkeypatch.setattr(jobs_query, "COLLECT_ROWS", 7)  # several windows
    async with app:
        spam = await finished(conn, schema, 12, state="succeeded", args='{"to": "spam%d"}')
        keep = await finished(conn, schema, 10, state="succeeded")
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            form = await csrf_form(client, "/jobs?state=succeeded")
            form.update(state="succeeded", text="SPAM", op="delete")
            r = await client.post("/jobs/matching", data=form)
            assert r.status_code == 200
            assert "Delete 12 succeeded jobs from history whose arguments contain" in r.text
            # A job that arrives after the confirmation is not taken.
            late = await finished(conn, schema, state="succeeded", args='{"to": "spam late"}')
            upto = re.search(r'name="upto" value="(\d+)"', r.text)
            assert upto is not None
            form.update(confirm="yes", upto=upto.group(1))
            r = await client.post("/jobs/matching", data=form)
            assert r.status_code == 303
            assert "Deleted%2012%20jobs" in r.headers["set-cookie"]
        left = await conn.fetchval(f'SELECT array_agg(id ORDER BY id) FROM "{schema}".history')
        assert left == keep + late
        assert not set(spam) & set(left)
        await dashboard.aclose()


async def test_arguments_and_errors_are_shown_as_text(
    app: taskq.App, conn: asyncpg.Connection, schema: str, tmp_path: Path
) -> None:
    tasks = make_app(app)
    async with app:
        await tasks["send"].enqueue(to=SCRIPT)
        await finished(conn, schema, state="failed", args='{"to": "' + SCRIPT + '"}', error=SCRIPT)
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, browser(url, tmp_path / "shots") as b:
            for tab in ("queued", "failed"):
                await b.get(f"/jobs?state={tab}&text=script")
                source = await b.source()
                assert "&lt;script&gt;" in source, tab
                assert "<script>document" not in source
                assert (await b.script("return document.title")).startswith("Jobs")
                assert len(ids_on(source)) == 1
        await dashboard.aclose()


async def test_read_only_shows_no_checkbox_and_no_button(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    tasks = make_app(app)
    async with app:
        await tasks["send"].enqueue(to="a@example.com")
        await finished(conn, schema, state="failed")
        dashboard = Dashboard(app, auth=no_auth, read_only=True)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            for tab in ("queued", "failed", "succeeded"):
                r = await client.get(f"/jobs?state={tab}")
                assert r.status_code == 200
                assert 'type="checkbox"' not in r.text
                assert "<button" not in r.text.replace(
                    '<button type="submit" class="primary">Filter</button>', ""
                )
                assert "<form" not in r.text.replace('<form class="filters"', "")
            r = await client.post("/jobs/selected", data={"op": "retry", "state": "failed"})
            assert r.status_code == 403
        await dashboard.aclose()
