import asyncio
import time

import taskq

app = taskq.App()  # $TASKQ_DSN, or an embedded Postgres when it is unset

ticks: list[float] = []
running = 0
most_running = 0


@app.cron("* * * * * *")  # six fields, seconds first: every second
@app.task(queue="ticks")
async def tick() -> None:
    ticks.append(time.monotonic())


@app.task(queue="reports")
async def build_report(day: str) -> str:
    return f"report for {day}"


@app.task(queue="exports")
async def export(part: int) -> None:
    global running, most_running
    running += 1
    most_running = max(most_running, running)
    await asyncio.sleep(0.2)
    running -= 1


async def main() -> None:
    async with app:
        # At most 2 jobs of "exports" run at once, across all workers.
        await app.queue("exports").configure(concurrency_limit=2)

        report = build_report.options(unique_key="report:2026-01-05")
        first = await report.enqueue(day="2026-01-05")
        second = await report.enqueue(day="2026-01-05")  # the key is taken
        print(f"unique: second enqueue duplicate={second.duplicate}, same job={second == first}")

        exports = await export.enqueue_many([{"part": n} for n in range(6)])

        # A worker beside this code; its scheduler makes one tick job per second.
        async with app.worker(concurrency=10):
            print(await first.result(timeout=10))
            for job in exports:
                await job.result(timeout=10)
            await asyncio.sleep(3)
        limit = (await app.queue("exports").info()).concurrency_limit
        print(f"exports: {len(exports)} done, at most {most_running} at once (limit {limit})")
        print(f"cron: {len(ticks)} tick jobs ran")


if __name__ == "__main__":
    asyncio.run(main())
