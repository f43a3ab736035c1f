"""The job page: one job's whole story, why it is not running, and its actions.

Real Postgres, a real worker in the test's loop, real HTTP (uvicorn) and a
real browser (headless Chromium) where a person's view is the point.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

import taskq
from taskq.dashboard import Dashboard, no_auth

from .conftest import until
from .dashboard_support import browser, csrf_form, serve

pytestmark = pytest.mark.anyio

HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"window.pwned=1\">"


async def until_state(job: taskq.Job, state: str) -> None:
    async def reached() -> bool:
        return str((await job.status()).state) == state

    await until(reached, 20, f"job {job.id} {state}")


async def test_retry_a_failed_job_and_see_it_succeed_live(app: taskq.App, tmp_path: Path) -> None:
    second_run = asyncio.Event()  # the retried run is under way
    gate = asyncio.Event()  # the test lets the retried run end
    failing = {"on": True}

    @app.task(queue="mail", retry=1)
    async def deliver(to: str) -> str:
        if failing["on"]:
            raise ConnectionRefusedError(f"SMTP server refused mail for {to}")
        second_run.set()
        await gate.wait()
        return f"sent to {to}"

    async with app:
        job = await deliver.enqueue(to="ops@example.com")
        dashboard = Dashboard(app, auth=no_auth, live_interval=0.3)
        async with (
            app.worker(concurrency=2),
            serve(dashboard) as url,
            browser(url, tmp_path / "shots") as b,
        ):
            await until_state(job, "failed")
            await b.get(f"/jobs/{job.id}")
            head = await b.text("[data-region=head]")
            assert f"Job {job.id}" in head and "failed" in head
            assert "Failed for good" in head and "after 1 attempt: ConnectionRefusedError" in head
            attempts = await b.text("[data-region=attempts]")
            assert "ConnectionRefusedError" in attempts
            assert "SMTP server refused mail for ops@example.com" in attempts
            # The traceback of the newest error is open, with the failing line.
            assert 'raise ConnectionRefusedError(f"SMTP server' in await live_text(
                b, "[data-region=attempts] details[open] pre"
            )
            # Only the actions that apply to a failed job are shown.
            assert await displayed(b, ".act-retry") and await displayed(b, ".act-delete")
            assert not await displayed(b, ".act-cancel")
            await b.screenshot("job-failed")

            failing["on"] = False
            await b.click(".act-retry button")
            await b.accept_alert()
            await b.wait_text(".flash", "queued again")
            await asyncio.wait_for(second_run.wait(), 20)
            await b.wait_text("#live-state", "live")
            marker = await b.script("window.marker = Math.random(); return window.marker")
            await b.wait_text("[data-region=head]", "running")
            assert await displayed(b, ".act-cancel") and not await displayed(b, ".act-retry")
            gate.set()
            await b.wait_text("[data-region=head]", "succeeded", timeout=15)
            await b.wait_text("[data-region=result]", "sent to ops@example.com")
            assert await b.script("return window.marker") == marker  # no reload
            # It waited since its failure (not since its first enqueue).
            timings = await live_text(b, "table[aria-label=timings]")
            assert "since the previous attempt failed" in timings
            # The earlier failure stays in the job's story.
            assert "ConnectionRefusedError" in await b.text("[data-region=attempts]")
            assert await displayed(b, ".act-delete") and not await displayed(b, ".act-cancel")
            await b.screenshot("job-succeeded")
            assert await b.console_errors() == []
        await dashboard.aclose()


async def live_text(b: Any, css: str) -> str:
    """The text of an element in a live region (which may be replaced mid-read)."""
    return str(await b.wait_text(css, lambda _text: True))


async def displayed(b: Any, css: str) -> bool:
    return bool(
        await b.script(
            "const e = document.querySelector(arguments[0]);"
            "return e !== null && getComputedStyle(e).display !== 'none'",
            css,
        )
    )


async def test_a_running_job_shows_progress_worker_and_trace(
    app: taskq.App, tmp_path: Path
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from taskq.contrib.opentelemetry import instrument

    provider = TracerProvider()
    instrument(app, tracer_provider=provider)
    started = asyncio.Event()
    gate = asyncio.Event()

    @app.task(queue="files")
    async def copy(files: int, ctx: taskq.JobContext) -> int:
        await ctx.progress(0.4, f"copied 40 of {files} files")
        started.set()
        await gate.wait()
        return files

    async with app:
        with provider.get_tracer("test").start_as_current_span("POST /backup") as span:
            job = await copy.enqueue(files=100)
        trace_id = format(span.get_span_context().trace_id, "032x")
        dashboard = Dashboard(app, auth=no_auth, live_interval=0.3)
        async with (
            app.worker(),
            serve(dashboard) as url,
            browser(url, tmp_path / "shots") as b,
        ):
            await asyncio.wait_for(started.wait(), 20)
            await b.get(f"/jobs/{job.id}")
            await b.wait_text(".job-progress", "copied 40 of 100 files")  # written within 1 s
            assert "40%" in await live_text(b, ".job-progress")
            assert trace_id in await live_text(b, ".trace-id")
            running = await live_text(b, "[data-reason=running]")
            assert "is running: attempt 1 of" in running and "lease runs until" in running
            details = await live_text(b, "table[aria-label=details]")
            assert "Running on" in details and "pid" in details
            assert await displayed(b, ".act-cancel") and not await displayed(b, ".act-delete")
            await b.screenshot("job-running")
            gate.set()
            await b.wait_text("[data-region=head]", "succeeded", timeout=15)
            assert "100" in await b.text("[data-region=result]")
            assert await b.count("[data-reason]") == 0
            assert await b.console_errors() == []
        await dashboard.aclose()


async def test_every_attempt_error_is_shown(app: taskq.App) -> None:
    runs = {"n": 0}

    @app.task(retry=taskq.Retry(attempts=3, wait=0))
    async def flaky() -> None:
        runs["n"] += 1
        raise RuntimeError(f"disk full on run {runs['n']}")

    async with app:
        job = await flaky.enqueue()
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as c:
            async with app.worker():
                await until_state(job, "failed")
                r = await c.get(f"/jobs/{job.id}")
            # The worker that ran it has stopped: its id is all that is left.
            gone = await c.get(f"/jobs/{job.id}")
        assert "heartbeat" in r.text and "no longer registered" not in r.text
        assert "no longer registered" in gone.text and "heartbeat" not in gone.text
        assert r.status_code == 200
        found = re.findall(r'data-attempt="(\d+)"', r.text)
        assert found == ["3", "2", "1"]  # newest first
        for n in (1, 2, 3):
            assert f"disk full on run {n}" in r.text
        assert r.text.count("<summary>Traceback</summary>") == 3
        assert "3 of 3" in r.text
        await dashboard.aclose()


async def test_hostile_arguments_and_errors_are_shown_as_text(
    app: taskq.App, tmp_path: Path
) -> None:
    @app.task(retry=1)
    async def evil(note: str) -> None:
        raise ValueError(note)

    async with app:
        job = await evil.options(meta={"note": HOSTILE}).enqueue(note=HOSTILE)
        dashboard = Dashboard(app, auth=no_auth)
        async with app.worker(), serve(dashboard) as url, browser(url, tmp_path / "shots") as b:
            await until_state(job, "failed")
            await b.get(f"/jobs/{job.id}")
            title = await b.script("return document.title")
            assert title.startswith(f"Job {job.id}") and "pwned" not in title
            source = await b.source()
            assert "&lt;script&gt;" in source and "&lt;img src=x" in source
            # Shown as text where it belongs: arguments, meta, message, traceback.
            as_json = HOSTILE.replace('"', '\\"')
            assert as_json in await b.text("pre[aria-label=arguments]")
            assert as_json in await b.text("pre[aria-label=meta]")
            assert HOSTILE in await live_text(b, ".error-message-text")
            assert HOSTILE in await live_text(b, "[data-region=attempts] pre")
            assert await b.count("main img") == 0
            assert await b.count("main script") == 0
            await asyncio.sleep(0.5)  # an onerror handler would have run by now
            assert await b.script("return window.pwned === undefined")
            assert await b.console_errors() == []
        await dashboard.aclose()


async def test_why_a_scheduled_job_and_a_paused_queue_wait(app: taskq.App, tmp_path: Path) -> None:
    @app.task(queue="mail")
    async def send(to: str) -> str:
        return to

    async with app:
        later = await send.options(delay=3600).enqueue(to="later@example.com")
        dashboard = Dashboard(app, auth=no_auth, live_interval=0.3)
        async with (
            app.worker(),
            serve(dashboard) as url,
            browser(url, tmp_path / "shots") as b,
        ):
            await b.get(f"/jobs/{later.id}")
            why = await live_text(b, ".why")
            assert "Why is this job not running?" in why
            assert f"job {later.id} is scheduled to run at" in why
            assert "in 59m" in why or "in 1h00m" in why
            assert await b.count("[data-reason=scheduled].reason-info") == 1
            assert await b.count(".reason-problem") == 0
            assert "scheduled" in await b.text("[data-region=head]")
            await b.screenshot("job-why-scheduled")

            await app.queue("mail").pause()
            held = await send.enqueue(to="held@example.com")
            await b.get(f"/jobs/{held.id}")
            problem = await live_text(b, "[data-reason=queue_paused].reason-problem")
            assert "queue 'mail' is paused" in problem and "queues resume mail" in problem
            assert await b.count("[data-reason=queue_paused] a[href='/queues']") == 1
            await b.screenshot("job-why-paused")
            # Resumed, it runs: the page follows without a reload.
            marker = await b.script("window.marker = 1; return window.marker")
            await app.queue("mail").resume()
            await b.wait_text("[data-region=head]", "succeeded", timeout=15)
            assert await b.count(".why") == 0
            assert await b.script("return window.marker") == marker
            assert await b.console_errors() == []
        await dashboard.aclose()


async def test_a_workflow_step_links_to_its_workflow(app: taskq.App) -> None:
    @app.task
    async def extract() -> int:
        return 1

    @app.task
    async def load(n: int) -> int:
        return n

    async with app:
        wf = taskq.Workflow(name="nightly-etl")
        first = wf.add(extract)
        wf.add(load, n=first)
        run = await wf.enqueue()
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as c:
            r = await c.get(f"/jobs/{run.job_ids['load']}")
        assert r.status_code == 200
        assert f'href="/workflows/{run.id}"' in r.text
        assert "nightly-etl" in r.text and "<strong>load</strong>" in r.text
        assert 'data-reason="waiting_for_parents"' in r.text
        # No worker runs at all: a problem, shown as one.
        assert 'class="reason reason-problem" data-reason="no_workers"' in r.text
        assert "waits for 1 of its 1 parent steps to end: &#39;extract&#39;" in r.text
        await dashboard.aclose()


async def test_an_unknown_job_is_a_clear_404(app: taskq.App) -> None:
    async with app:
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as c:
            r = await c.get("/jobs/987654321")
            assert r.status_code == 404
            assert "There is no job 987654321" in r.text and "pruned" in r.text
            r = await c.get("/jobs/not-a-number")
            assert r.status_code == 404
        await dashboard.aclose()


async def test_cancel_and_delete_from_the_page(app: taskq.App) -> None:
    @app.task
    async def work() -> str:
        return "done"

    async with app:
        queued = await work.enqueue()
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as c:
            token = await csrf_form(c, f"/jobs/{queued.id}")
            page = (await c.get(f"/jobs/{queued.id}")).text
            assert 'data-job-actions="cancel"' in page and "data-confirm=" in page
            # Only finished jobs are deleted.
            r = await c.post(f"/jobs/{queued.id}/delete", data=token)
            assert r.status_code == 303
            assert "only finished jobs can be deleted" in (await c.get(r.headers["location"])).text
            r = await c.post(f"/jobs/{queued.id}/cancel", data=token)
            assert r.status_code == 303 and r.headers["location"] == f"/jobs/{queued.id}"
            page = (await c.get(f"/jobs/{queued.id}")).text
            assert f"Job {queued.id} is cancelled." in page
            assert 'data-job-actions="retry delete"' in page
            r = await c.post(f"/jobs/{queued.id}/delete", data=token)
            assert r.status_code == 303 and r.headers["location"] == "/jobs"
            assert (await c.get(f"/jobs/{queued.id}")).status_code == 404
            # Without the token nothing happens.
            other = await work.enqueue()
            r = await c.post(f"/jobs/{other.id}/cancel", data={"id": str(other.id)})
            assert r.status_code == 403
        assert str((await other.status()).state) == "queued"
        await dashboard.aclose()


async def test_read_only_shows_no_button(app: taskq.App) -> None:
    @app.task(retry=1)
    async def broken() -> None:
        raise RuntimeError("nope")

    async with app:
        job = await broken.enqueue()
        dashboard = Dashboard(app, auth=no_auth, read_only=True)
        async with app.worker(), serve(dashboard) as url, httpx.AsyncClient(base_url=url) as c:
            await until_state(job, "failed")
            r = await c.get(f"/jobs/{job.id}")
            assert r.status_code == 200 and "RuntimeError" in r.text
            assert "<form" not in r.text and "<button" not in r.text
            r = await c.post(f"/jobs/{job.id}/retry", data={"csrf_token": "x"})
            assert r.status_code == 403 and "read-only" in r.text
        assert str((await job.status()).state) == "failed"
        await dashboard.aclose()
