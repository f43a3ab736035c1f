"""A worker serving every queue: which queues it claims from (taskq/worker/discovery.py).

It looks up the queues that hold jobs at most once per poll interval and
hears of others from enqueue notifications in between. These tests show
that a queue nobody announced is still found, that an announced one is
claimed at once, and that two queues with backlogs share the worker.
"""

from __future__ import annotations

import anyio
import pytest

import taskq
from tests.test_worker import fetchval

pytestmark = pytest.mark.anyio


async def test_a_queue_nobody_announced_is_found_by_the_next_look(app: taskq.App) -> None:
    ran: list[str] = []

    @app.task(name="disc.job")
    async def job(tag: str) -> None:
        ran.append(tag)

    async with app, app.worker(poll_interval=0.2):
        await job.options(queue="a").enqueue(tag="announced")
        with anyio.fail_after(10):
            while ran != ["announced"]:
                await anyio.sleep(0.01)
        # Written behind the worker's back: no notification names queue "b",
        # so only a fresh look at the queues finds it.
        await fetchval(
            app,
            "INSERT INTO {s}.jobs (queue, task, args) VALUES ('b', 'disc.job', "
            '\'{"tag": "silent"}\')',
        )
        with anyio.fail_after(10):
            while ran != ["announced", "silent"]:
                await anyio.sleep(0.01)


async def test_an_announced_queue_is_claimed_without_waiting_for_the_next_look(
    app: taskq.App,
) -> None:
    started = anyio.Event()

    @app.task(name="disc.now")
    async def now() -> None:
        started.set()

    # The worker looked (no queue held a job) and will not look again for a
    # minute: only the notification can tell it about queue "fresh".
    async with app, app.worker(poll_interval=60):
        await anyio.sleep(0.2)
        await now.options(queue="fresh").enqueue()
        with anyio.fail_after(10):
            await started.wait()


async def test_two_queues_with_backlogs_share_a_worker(app: taskq.App) -> None:
    order: list[str] = []

    @app.task(name="disc.share")
    async def share(q: str) -> None:
        order.append(q)

    async with app:
        for q in ("x", "y"):
            await share.options(queue=q).enqueue_many([{"q": q}] * 300)
        stats = await app.drain(concurrency=10)
    assert stats.succeeded == 600
    # Each claim starts from a random known queue: both are served from the
    # start, not one after the other (at 10 jobs a claim, a queue that got
    # fewer than 20 of the first 200 would have lost 19 of 20 coin tosses).
    first = order[:200]
    assert first.count("x") >= 20 and first.count("y") >= 20, first
