"""The demo's App and sample jobs (with failures and retries), and the run that shows them."""

from __future__ import annotations

import logging
import random
import sys
import time
from typing import Any

import anyio
import tenacity

from .._app import App
from .._retry import Retry

app = App(schema="taskq_demo")

# Deterministic "bad luck" so every run shows retries and a few dead letters.
_FLAKY_FIRST_TRY = 0.25


@app.task(name="demo.resize_image", queue="images")
async def resize_image(image_id: int, width: int) -> dict[str, int]:
    """An I/O-bound job: pretend to fetch, resize and store an image."""
    await anyio.sleep(random.uniform(0.02, 0.1))
    return {"image_id": image_id, "width": width, "bytes": width * 97}


@app.task(
    name="demo.send_email",
    queue="emails",
    retry=Retry(attempts=4, wait=tenacity.wait_exponential(multiplier=0.2, max=2)),
)
async def send_email(to: str, attempt_seed: int) -> None:
    """A flaky job: the mail server refuses some first attempts, retries go through."""
    await anyio.sleep(random.uniform(0.005, 0.02))
    if random.Random(attempt_seed).random() < _FLAKY_FIRST_TRY and _first_time(to):
        raise ConnectionError(f"SMTP server busy while sending to {to}")


_seen: set[str] = set()


def _first_time(key: str) -> bool:
    if key in _seen:
        return False
    _seen.add(key)
    return True


@app.task(name="demo.charge_card", queue="payments", retry=Retry(attempts=2, wait=0.2))
def charge_card(order_id: int, amount_cents: int) -> dict[str, Any]:
    """A sync job (runs in a thread) that fails for good on bad input: a dead letter."""
    time.sleep(0.005)
    if amount_cents <= 0:
        raise ValueError(f"order {order_id}: amount must be positive, got {amount_cents}")
    return {"order_id": order_id, "charged": amount_cents}


async def run_demo(*, dsn: str | None, jobs: int, concurrency: int) -> int:
    out = sys.stdout
    # Progress lines tell the story; per-job log lines would drown them (the
    # summary lists the dead letters).
    logging.getLogger("taskq.worker").setLevel(logging.CRITICAL)
    if dsn:
        app.database.dsn_arg = dsn
    out.write("taskq demo: starting Postgres and the worker...\n")
    out.flush()
    async with app:
        if app.embedded is not None:
            out.write(
                f"  embedded Postgres: data in {app.embedded.data_dir}\n"
                f"                     log  in {app.embedded.log_file}\n"
            )
        async with app.pool.acquire() as conn:
            # Start from a clean slate so the summary speaks of this run only.
            await conn.execute("TRUNCATE taskq_demo.jobs, taskq_demo.history")
        n_images = jobs // 2
        n_emails = jobs // 3
        n_orders = max(1, jobs - n_images - n_emails)
        started = time.monotonic()
        await resize_image.enqueue_many(
            [{"image_id": i, "width": 64 * (1 + i % 8)} for i in range(n_images)]
        )
        await send_email.enqueue_many(
            [{"to": f"user{i}@example.com", "attempt_seed": i} for i in range(n_emails)]
        )
        orders = [
            {"order_id": i, "amount_cents": 0 if i % 10 == 7 else 100 + i} for i in range(n_orders)
        ]
        await charge_card.enqueue_many(orders)
        total = n_images + n_emails + n_orders
        out.write(
            f"  enqueued {total} jobs: {n_images} image resizes, {n_emails} emails (some flaky), "
            f"{n_orders} card charges (some invalid)\n"
        )
        async with app.worker(concurrency=concurrency, poll_interval=0.5) as worker:
            while True:
                await anyio.sleep(0.25)
                counts = _counts(await app.queue_counts())
                finished = counts["succeeded"] + counts["failed"] + counts["cancelled"]
                rate = finished / max(time.monotonic() - started, 1e-9)
                out.write(
                    f"  progress: {finished:>5}/{total} finished | {counts['succeeded']:>5} ok "
                    f"| {counts['failed']:>3} dead | {worker.stats.retried:>3} retries "
                    f"| {counts['queued']:>4} waiting | {rate:7.0f} jobs/s\n"
                )
                out.flush()
                if finished >= total:
                    break
        elapsed = time.monotonic() - started
        failed = await _dead_letters()
        out.write(
            "\nsummary\n"
            f"  {total} jobs in {elapsed:.1f}s on one worker (concurrency {concurrency})\n"
            f"  succeeded: {counts['succeeded']}, failed for good (dead letters): "
            f"{counts['failed']}, retries along the way: {worker.stats.retried}\n"
        )
        for job_id, task, message in failed:
            out.write(f"  dead letter: job {job_id} {task}: {message}\n")
        out.write(
            "  look around: python -m taskq status --schema taskq_demo\n"
            + (
                "  the embedded Postgres keeps running for next time; "
                "stop it with: python -m taskq embedded stop\n"
                if app.embedded is not None
                else ""
            )
            + "  your own jobs: see the README quickstart\n"
        )
    return 0


def _counts(rows: list[tuple[str, str, int]]) -> dict[str, int]:
    counts = dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled"), 0)
    for _queue, state, n in rows:
        counts[state] += n
    return counts


async def _dead_letters() -> list[tuple[int, str, str]]:
    async with app.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, task, error->>'message' FROM taskq_demo.history "
            "WHERE state = 'failed' ORDER BY id LIMIT 3"
        )
    return [(r[0], r[1], r[2]) for r in rows]
