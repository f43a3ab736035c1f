"""The same helpers without the pytest plugin: a unittest test case."""

from __future__ import annotations

import unittest

from shop.checkout import place_order
from shop.tasks import app, send_receipt

import taskq
from taskq import testing


class CheckoutTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        # The shop's App on a throwaway schema of $TASKQ_TEST_DSN (else the
        # embedded Postgres); dropped, and the App restored, after each test.
        await self.enterAsyncContext(testing.isolated_app(app))

    async def test_a_charge_sends_the_receipt(self) -> None:
        job = await place_order(order_id=1, amount_cents=100, email="ada@example.com")
        status = await testing.run_job(job)
        assert status.state is taskq.JobState.SUCCEEDED
        await testing.assert_enqueued(send_receipt, order_id=1)
