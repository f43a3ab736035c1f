"""The shop's background jobs."""

from __future__ import annotations

import contextvars
from typing import Any

import taskq

# $TASKQ_DSN in production. Tests run this same App, with these tasks and
# hooks, on a throwaway schema of their own database (the taskq_app fixture).
app = taskq.App()

#: The job being run, for code deep inside a task (and for log lines).
current_job: contextvars.ContextVar[taskq.JobContext | None] = contextvars.ContextVar(
    "current_job", default=None
)


@app.middleware
async def remember_job(ctx: taskq.JobContext, call_next: Any) -> Any:
    token = current_job.set(ctx)
    try:
        return await call_next()
    finally:
        current_job.reset(token)


class PaymentGateway:
    """Stands in for a payment provider's client."""

    async def charge(self, order_id: int, amount_cents: int) -> str:
        return f"ch_{order_id}_{amount_cents}"


gateway = PaymentGateway()


@app.task(queue="emails")
async def send_receipt(order_id: int, email: str) -> str:
    return f"receipt for order {order_id} sent to {email}"


# A declined or unreachable gateway is tried again a minute later, twice.
@app.task(queue="payments", retry=taskq.Retry(attempts=3, wait=60), timeout=30)
async def charge_order(order_id: int, amount_cents: int, email: str) -> dict[str, Any]:
    charge_id = await gateway.charge(order_id, amount_cents)
    await send_receipt.enqueue(order_id=order_id, email=email)
    job = current_job.get()
    return {"charge": charge_id, "attempt": job.attempt if job else None}
