import asyncio

import taskq

app = taskq.App()  # $TASKQ_DSN, or an embedded Postgres when it is unset


@app.task(queue="emails", retry=taskq.Retry(attempts=3), timeout=30)
async def send_welcome(user_id: int) -> str:
    await asyncio.sleep(0.1)  # call your mail provider here
    return f"welcome mail sent to user {user_id}"


async def main() -> None:
    async with app:  # connects and applies pending migrations
        job = await send_welcome.enqueue(user_id=42)
        async with app.worker(concurrency=10):  # a worker beside your code
            print(await job.result(timeout=10))


if __name__ == "__main__":
    asyncio.run(main())
