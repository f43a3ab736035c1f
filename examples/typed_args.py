"""Typed arguments and results: the task's annotations say how they travel as JSON.

Run it with ``python typed_args.py`` (``$TASKQ_DSN``, or the embedded Postgres).
"""

import asyncio
import datetime as dt
import enum
import uuid
from dataclasses import dataclass
from decimal import Decimal

import taskq

app = taskq.App()


class Plan(enum.Enum):
    FREE = "free"
    PRO = "pro"


@dataclass
class Invoice:
    customer: uuid.UUID
    plan: Plan
    amount: Decimal
    due: dt.date


@app.task
async def bill(invoice: Invoice, sent_at: dt.datetime) -> dt.date:
    # The task receives an Invoice (with a UUID, a Plan, a Decimal and a
    # date inside) and a datetime, not their JSON forms.
    assert isinstance(invoice.amount, Decimal)
    return invoice.due + dt.timedelta(days=30)


async def main() -> None:
    invoice = Invoice(uuid.uuid4(), Plan.PRO, Decimal("49.90"), dt.date(2027, 1, 31))
    async with app:
        job = await bill.enqueue(invoice=invoice, sent_at=dt.datetime.now(dt.UTC))
        print((await job.status()).args["invoice"]["amount"])  # stored as JSON: '49.90'
        await app.drain()
        print(repr(await job.result(timeout=10)))  # decoded by the return annotation


if __name__ == "__main__":
    asyncio.run(main())
