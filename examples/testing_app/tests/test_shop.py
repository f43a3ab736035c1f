"""The shop's tests: every test gets the shop's App on a schema of its own.

The code between ``--8<--`` markers is shown in docs/guides/testing.md.
"""

from __future__ import annotations

from typing import Any

import pytest
from shop import tasks
from shop.checkout import place_order
from shop.tasks import charge_order, send_receipt

import taskq
from taskq import testing

pytestmark = pytest.mark.anyio


# --8<-- [start:direct]
async def test_receipt_text() -> None:
    # A task called like a function runs inline: no job, no database.
    text = await send_receipt(order_id=1, email="ada@example.com")
    assert text == "receipt for order 1 sent to ada@example.com"


# --8<-- [end:direct]


# --8<-- [start:assert]
async def test_an_order_is_charged(taskq_app: taskq.App) -> None:
    await place_order(order_id=1, amount_cents=1250, email="ada@example.com")

    await testing.assert_enqueued(charge_order, order_id=1, amount_cents=1250)
    await testing.assert_not_enqueued(send_receipt)  # not before the charge


async def test_a_free_order_is_not_charged(taskq_app: taskq.App) -> None:
    await place_order(order_id=2, amount_cents=0, email="bob@example.com")

    await testing.assert_not_enqueued(charge_order)
    await testing.assert_enqueued("shop.tasks.send_receipt", order_id=2)  # by name


# --8<-- [end:assert]


# --8<-- [start:enqueued_jobs]
async def test_orders_wait_in_the_payments_queue(taskq_app: taskq.App) -> None:
    for order_id in (3, 4):
        await place_order(order_id, amount_cents=500, email="cy@example.com")

    jobs = await testing.enqueued_jobs(charge_order)  # oldest first
    assert [job.args["order_id"] for job in jobs] == [3, 4]
    assert {(job.queue, job.attempts) for job in jobs} == {("payments", 0)}
    assert await testing.enqueued_jobs(queue="emails") == []


# --8<-- [end:enqueued_jobs]


# --8<-- [start:run_job]
async def test_a_charge_sends_the_receipt(taskq_app: taskq.App) -> None:
    job = await place_order(order_id=5, amount_cents=990, email="dan@example.com")

    status = await testing.run_job(job)

    assert status.state is taskq.JobState.SUCCEEDED
    # "attempt" comes from the JobContext that the shop's middleware saw.
    assert status.result == {"charge": "ch_5_990", "attempt": 1}
    await testing.assert_enqueued(send_receipt, order_id=5, email="dan@example.com")


# --8<-- [end:run_job]


# --8<-- [start:retry]
async def test_a_failed_charge_is_retried(
    taskq_app: taskq.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers: list[Any] = [ConnectionError("gateway unreachable"), "ch_6_100"]

    async def charge(order_id: int, amount_cents: int) -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    monkeypatch.setattr(tasks.gateway, "charge", charge)
    job = await place_order(order_id=6, amount_cents=100, email="eve@example.com")

    status = await testing.run_job(job)
    # Back in the queue, due in a minute, with the error; no receipt yet.
    assert status.state is taskq.JobState.QUEUED
    assert status.attempts == 1
    assert status.last_error == "ConnectionError: gateway unreachable"
    await testing.assert_not_enqueued(send_receipt)

    status = await testing.run_job(job)  # runs the retry now, not in a minute
    assert status.state is taskq.JobState.SUCCEEDED
    assert status.result == {"charge": "ch_6_100", "attempt": 2}


# --8<-- [end:retry]


# --8<-- [start:hooks]
async def test_hooks_see_the_job(taskq_app: taskq.App) -> None:
    seen: list[tuple[Any, ...]] = []

    # Added for this test only: the fixture restores the App's hooks after it.
    @taskq_app.after_job
    def record(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
        seen.append((ctx.id, ctx.task, ctx.queue, ctx.attempt, outcome.kind))

    job = await place_order(order_id=7, amount_cents=300, email="fay@example.com")
    await testing.run_job(job)

    assert seen == [(job.id, "shop.tasks.charge_order", "payments", 1, "succeeded")]


# --8<-- [end:hooks]


# --8<-- [start:drain]
async def test_drain_runs_every_due_job(taskq_app: taskq.App) -> None:
    for order_id in (10, 11, 12):
        await place_order(order_id, amount_cents=100, email="gus@example.com")

    stats = await testing.drain(taskq_app, queues=["payments"])
    assert (stats.succeeded, stats.failed) == (3, 0)
    assert len(await testing.enqueued_jobs(send_receipt)) == 3

    stats = await testing.drain(taskq_app)  # every queue
    assert stats.succeeded == 3
    assert await testing.enqueued_jobs() == []


# --8<-- [end:drain]


async def test_every_test_starts_with_an_empty_schema(taskq_app: taskq.App) -> None:
    assert taskq_app.schema.startswith("taskq_test_")
    assert await testing.enqueued_jobs() == []
