"""``why_not_running()`` in a queue that shares by key (a per-key limit): the key's
limit, the jobs ahead within the key, and a keyless job beyond the claim's window,
each set up with real workers and checked against what the claim then does."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

import taskq
from taskq._admin.why import KEY_WINDOW
from taskq.dashboard import Dashboard, no_auth

from .dashboard_support import serve
from .test_why_not_running import blocking_task, codes, opened_gate, until_state, why

pytestmark = pytest.mark.anyio

CLAIM_KEYED = Path(taskq.__file__).parent / "objects" / "claim_keyed.sql"


def test_the_window_is_the_claims() -> None:
    """``why`` says how far the claim looks for a keyless job: the claim's own number."""
    found = re.search(r"c_window CONSTANT integer := (\d+);", CLAIM_KEYED.read_text())
    assert found is not None and int(found.group(1)) == KEY_WINDOW


async def test_a_key_at_its_limit_holds_its_next_job_and_the_page_says_so(
    app: taskq.App,
) -> None:
    block = blocking_task(app, queue="tenants")
    async with app:
        await app.queue("tenants").configure(per_key_limit=1)
        first = await block.options(concurrency_key="t:1").enqueue()
        second = await block.options(concurrency_key="t:1").enqueue()
        other = await block.options(concurrency_key="t:2").enqueue()
        keyless = [await block.enqueue(), await block.enqueue()]
        async with app.worker(concurrency=6), opened_gate(block):
            for job in (first, other, keyless[0]):
                await until_state(job, "running")
            explained = await why(app, second.id)
            no_key = await why(app, keyless[1].id)
            dashboard = Dashboard(app, auth=no_auth)
            async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
                page = (await client.get(f"/jobs/{second.id}")).text
            # What the claim does agrees: free slots, yet both stay queued.
            assert str((await second.status()).state) == "queued"
            assert str((await keyless[1].status()).state) == "queued"
    assert codes(explained) == ["key_limit_full"]
    r = explained.reasons[0]
    assert r.details == {"queue": "tenants", "concurrency_key": "t:1", "limit": 1, "running": 1}
    assert "at most 1 job per concurrency key at once and key 't:1' has 1 running" in r.message
    # Jobs without a key are one more key, under the same limit.
    assert codes(no_key) == ["key_limit_full"]
    assert no_key.reasons[0].details["concurrency_key"] is None
    assert "the jobs without a key have 1 running" in no_key.reasons[0].message
    assert 'data-reason="key_limit_full"' in page and "reason-held" in page
    assert "concurrency key" in page and "t:1" in page


async def test_only_the_keys_own_jobs_are_ahead(app: taskq.App) -> None:
    block = blocking_task(app, queue="tenants")
    async with app:
        await app.queue("tenants").configure(per_key_limit=5)
        running = await block.options(concurrency_key="a").enqueue()
        async with app.worker(concurrency=1), opened_gate(block):
            await until_state(running, "running")
            mine = await block.options(concurrency_key="b").enqueue()
            await block.options(concurrency_key="b", priority=5).enqueue()  # ahead
            await block.options(concurrency_key="a", priority=9).enqueue_many([{}] * 3)  # other key
            await block.options(priority=9).enqueue()  # no key: another key
            await block.options(concurrency_key="b").enqueue()  # behind
            explained = await why(app, mine.id)
            await app.queue("tenants").pause()  # the backlog must not start on close
    assert codes(explained) == ["workers_busy", "behind_other_jobs"]
    ahead = explained.reasons[1]
    expected = {"queue": "tenants", "concurrency_key": "b", "ahead": 1, "capped": False}
    assert ahead.details == expected
    assert "1 due job of key 'b' is ahead of it in queue 'tenants' (keys take turns)" in (
        ahead.message
    )


async def test_a_keyless_job_beyond_the_window_is_named_and_the_claim_passes_it_over(
    app: taskq.App,
) -> None:
    block = blocking_task(app, queue="tenants")
    done: list[int] = []

    @app.task(name="why.keyless", queue="tenants")
    async def keyless(n: int) -> None:
        done.append(n)

    async with app:
        await app.queue("tenants").configure(per_key_limit=1)
        # One key's backlog longer than the window, then keyless jobs: two at the
        # front of the claim order, one behind the whole backlog.
        backlog = await block.options(concurrency_key="big").enqueue_many([{}] * (KEY_WINDOW + 20))
        far = await keyless.enqueue(n=1)
        near = [await keyless.options(priority=5).enqueue(n=n) for n in (2, 3)]
        async with app.worker(concurrency=4), opened_gate(block):
            await until_state(backlog[0], "running")
            for job in near:
                await until_state(job, "succeeded")
            # Free slots and its key under the limit, yet out of the claim's sight.
            assert str((await far.status()).state) == "queued"
            explained = await why(app, far.id)
            await app.queue("tenants").pause()
    assert codes(explained) == ["beyond_key_window"]
    r = explained.reasons[0]
    assert r.details == {"queue": "tenants", "window": KEY_WINDOW}
    assert f"first {KEY_WINDOW} queued jobs" in r.message
    assert "give this queue's jobs a key" in r.message
    assert sorted(done) == [2, 3]


async def test_keyless_jobs_ahead_within_the_window(app: taskq.App) -> None:
    block = blocking_task(app, queue="tenants")
    async with app:
        await app.queue("tenants").configure(per_key_limit=3)
        running = await block.enqueue()
        async with app.worker(concurrency=1), opened_gate(block):
            await until_state(running, "running")
            mine = await block.enqueue()
            await block.options(priority=5).enqueue()  # keyless, ahead
            await block.options(priority=9, concurrency_key="k").enqueue()  # another key
            await block.enqueue()  # behind
            explained = await why(app, mine.id)
            await app.queue("tenants").pause()
    assert codes(explained) == ["workers_busy", "behind_other_jobs"]
    behind = explained.reasons[1]
    assert behind.details == {"queue": "tenants", "ahead": 1, "capped": False}
    assert "1 due job without a key is ahead of it in queue 'tenants' (keys take turns)" in (
        behind.message
    )
