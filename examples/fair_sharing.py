"""Fair sharing: one tenant's backlog does not hold up another tenant's job."""

import asyncio

import taskq

app = taskq.App()  # $TASKQ_DSN, or an embedded Postgres when it is unset

started: list[int] = []  # tenants, in the order their jobs started


async def render(tenant_id: int, report_id: int) -> str:
    started.append(tenant_id)
    await asyncio.sleep(0.01)
    return f"report {report_id} of tenant {tenant_id}"


# --8<-- [start:task]
@app.task(queue="reports", concurrency_key=lambda tenant_id, **_: f"tenant:{tenant_id}")
async def build_report(tenant_id: int, report_id: int) -> str:
    return await render(tenant_id, report_id)


# --8<-- [end:task]


async def main() -> None:
    async with app:
        await app.queue("reports").configure(per_key_limit=2)
        # Tenant 1 queues 300 reports, then tenant 42 asks for one.
        backlog = await build_report.enqueue_many(
            [{"tenant_id": 1, "report_id": n} for n in range(300)]
        )
        small = await build_report.enqueue(tenant_id=42, report_id=7)  # key "tenant:42"
        async with app.worker(concurrency=4):
            print(await small.result(timeout=60))
            print(f"tenant 42's job started after {started.index(42)} of tenant 1's")
            await backlog[-1].result(timeout=60)


if __name__ == "__main__":
    asyncio.run(main())
