"""Exactly-once effects in the same database: a payment and its job commit together.

Run it with ``python exactly_once.py`` (``$TASKQ_DSN``, or the embedded Postgres).
The code between ``--8<--`` markers is shown in docs/guarantees.md.
"""

import asyncio

import taskq

app = taskq.App()

TABLES = """
CREATE TABLE IF NOT EXISTS shop_orders (
    id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    total numeric NOT NULL,
    paid  boolean NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS shop_payments (
    order_id bigint NOT NULL REFERENCES shop_orders,
    job_id   bigint NOT NULL,
    amount   numeric NOT NULL
);
"""


# --8<-- [start:task]
@app.task(retry=taskq.Retry(attempts=5))
async def settle(order_id: int, ctx: taskq.JobContext) -> str:
    await ctx.progress(0.5, "recording the payment")
    async with ctx.transaction() as conn:
        # These writes and the job's success commit together. A worker that
        # dies before the commit leaves neither, and the job runs again; once
        # committed, the job is done and never runs again.
        total = await conn.fetchval(
            "UPDATE shop_orders SET paid = true WHERE id = $1 RETURNING total", order_id
        )
        await conn.execute(
            "INSERT INTO shop_payments (order_id, job_id, amount) VALUES ($1, $2, $3)",
            order_id,
            ctx.id,
            total,
        )
    # The job is succeeded now; what the task returns is its result.
    return f"paid {total}"


# --8<-- [end:task]


async def main() -> None:
    async with app:
        async with app.pool.acquire() as conn:
            await conn.execute(TABLES)
            order_id = await conn.fetchval(
                "INSERT INTO shop_orders (total) VALUES (49.90) RETURNING id"
            )
        job = await settle.enqueue(order_id=order_id)
        async with app.worker():
            print(await job.result(timeout=30))
        async with app.pool.acquire() as conn:
            payments = await conn.fetchval(
                "SELECT count(*) FROM shop_payments WHERE order_id = $1", order_id
            )
        status = await job.status()
        print(f"{status.state}, {payments} payment, progress: {status.progress['message']}")


if __name__ == "__main__":
    asyncio.run(main())
