"""Workflows: fan-out/fan-in, map-reduce over a file, a join of partial results, recorded steps.

Run it with ``python workflows.py`` (``$TASKQ_DSN``, or the embedded Postgres):
a worker beside the code runs four workflows and prints one line for each.
The code between ``--8<--`` markers is shown in docs/workflows.md; the test
suite runs this file.
"""

import asyncio
import collections
import tempfile
from pathlib import Path

import taskq

app = taskq.App()  # $TASKQ_DSN, or an embedded Postgres when it is unset

PRICES = {"north": 12.5, "south": 11.75, "east": 13.0}


# --8<-- [start:fan]
@app.task(retry=taskq.Retry(attempts=1))
async def fetch_price(shop: str, sku: str) -> float:
    await asyncio.sleep(0.05)  # call the shop's API here
    if shop not in PRICES:
        raise LookupError(f"{shop} does not sell {sku}")
    return PRICES[shop]


@app.task
async def cheapest(prices: dict[str, float]) -> str:
    shop = min(prices, key=prices.__getitem__)
    return f"{shop} at {prices[shop]:.2f}"


async def compare_prices(sku: str) -> str:
    wf = taskq.Workflow(name="compare-prices")
    # Fan-out: one step per shop, all queued at once.
    prices = {shop: wf.add(fetch_price, shop=shop, sku=sku) for shop in PRICES}
    # Fan-in: a dict of references becomes the dict of their results.
    wf.add(cheapest, prices=prices)
    run = await wf.enqueue()
    return await run.result(timeout=30)  # the result of the only step without children


# --8<-- [end:fan]


# --8<-- [start:mapreduce]
@app.task
def split(path: str, lines_per_chunk: int) -> list[list[str]]:  # plain def: runs in a thread
    lines = Path(path).read_text().splitlines()
    return [lines[i : i + lines_per_chunk] for i in range(0, len(lines), lines_per_chunk)]


@app.task
async def count_words(lines: list[str]) -> dict[str, int]:
    return dict(collections.Counter(w.lower() for line in lines for w in line.split()))


@app.task
async def add_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for part in counts:
        total.update(part)
    return dict(total)


async def word_frequencies(path: str) -> dict[str, int]:
    wf = taskq.Workflow(name="word-count")
    chunks = wf.add(split, path=path, lines_per_chunk=2)
    # One count_words step per chunk, made when split's list is known:
    # count[0], count[1], ...; `counts` stands for the list of their results.
    counts = wf.map(count_words, over=chunks, arg="lines", step_name="count")
    wf.add(add_counts, counts=counts)
    run = await wf.enqueue()
    total = await run.result(timeout=30)
    steps = [s.name for s in (await run.status()).steps]
    print(f"map-reduce steps: {', '.join(steps)}")
    return total


# --8<-- [end:mapreduce]


# --8<-- [start:partial]
@app.task
async def best_offer(prices: dict[str, float]) -> str:
    offers = {s: p for s, p in prices.items() if not isinstance(p, taskq.StepFailed)}
    missing = sorted(s for s, p in prices.items() if isinstance(p, taskq.StepFailed))
    shop = min(offers, key=offers.__getitem__)
    return f"{shop} at {offers[shop]:.2f} ({len(offers)} shops answered; no price from {missing})"


async def compare_despite_failures(sku: str) -> str:
    wf = taskq.Workflow(name="compare-prices")
    prices = {shop: wf.add(fetch_price, shop=shop, sku=sku) for shop in [*PRICES, "west"]}
    # "west" fails: best_offer runs anyway, with a taskq.StepFailed in its place.
    wf.add(best_offer, prices=prices, on_parent_failure="run")
    run = await wf.enqueue()
    return await run.result(timeout=30)


# --8<-- [end:partial]


# --8<-- [start:steps]
calls: collections.Counter[str] = collections.Counter()


async def reserve_stock(order_id: int) -> str:
    calls["reserve"] += 1
    return f"R-{order_id}"


async def book_courier(reservation: str) -> str:
    calls["courier"] += 1
    if calls["courier"] == 1:
        raise ConnectionError("the courier's API timed out")
    return f"{reservation} on its way"


@app.task(retry=taskq.Retry(attempts=3, wait=0))
async def ship(order_id: int, ctx: taskq.JobContext) -> str:
    # Attempt 1 records reserve_stock's result, then fails in book_courier;
    # attempt 2 gets the recorded reservation back and only books the courier.
    reservation = await ctx.step("reserve", reserve_stock, order_id)
    return await ctx.step("courier", book_courier, reservation)


@app.task
async def notify(order_id: int, status: str) -> str:
    return f"order {order_id}: {status}"


async def ship_order(order_id: int) -> str:
    wf = taskq.Workflow(name="ship-order")
    shipped = wf.add(ship, order_id=order_id)
    wf.add(notify, order_id=order_id, status=shipped)
    run = await wf.enqueue()
    return await run.result(timeout=30)


# --8<-- [end:steps]


TEXT = """\
The quick brown fox
jumps over the lazy dog
the dog sleeps
and the fox runs
"""


async def main() -> None:
    async with app, app.worker(concurrency=10):
        print(f"fan-out/fan-in: {await compare_prices('sku-1')}")

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "words.txt"
            path.write_text(TEXT)
            counts = await word_frequencies(str(path))
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        print(f"map-reduce: {len(counts)} words, top {top}")

        print(f"partial join: {await compare_despite_failures('sku-1')}")

        shipped = await ship_order(7)
        ran = f"reserve ran {calls['reserve']}x, courier {calls['courier']}x"
        print(f"recorded steps: {shipped}; {ran}")


if __name__ == "__main__":
    asyncio.run(main())
