"""Fair sharing between tenants: concurrency keys and a queue's per_key_limit.

The claim of a queue with a per_key_limit takes turns between keys and starts
at most that many jobs per key at once, across every worker. The checks read
what Postgres recorded: the running counts sampled from the jobs table while
real worker processes run, and every job's enqueue, start and end times on
the database clock.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

import anyio
import asyncpg
import pytest

import taskq

from .test_cli import run_cli
from .test_flow import worker_processes

pytestmark = pytest.mark.anyio


async def test_options_and_settings_refuse_bad_values(app: taskq.App) -> None:
    @app.task(name="fair.v")
    async def v() -> None:
        return None

    for bad in ("", 42, "x" * 201, "nul\x00", "\ud800"):
        with pytest.raises(taskq.ConfigurationError, match="concurrency_key"):
            v.options(concurrency_key=bad)  # type: ignore[arg-type]
    both = v.options(concurrency_key="t", unique_key="u").opts
    assert (both.concurrency_key, both.unique_key) == ("t", "u")
    assert v.options(concurrency_key="t").options(priority=3).opts.concurrency_key == "t"
    async with app:
        q = app.queue("fair")
        info = await q.configure(per_key_limit=2, concurrency_limit=5)
        assert (info.per_key_limit, info.concurrency_limit) == (2, 5)
        info = await q.configure(concurrency_limit=None)  # per-key limit untouched
        assert (info.per_key_limit, info.concurrency_limit) == (2, None)
        assert (await q.configure(per_key_limit=None)).per_key_limit is None
        for bad in (0, -1, "3", 2.5, True):
            with pytest.raises(taskq.ConfigurationError, match="per_key_limit"):
                await q.configure(per_key_limit=bad)
        assert (await q.info()).per_key_limit is None
        job = await v.options(concurrency_key="tenant:1").enqueue()
        schema = app.schema
        async with app.database.acquire("test") as conn:
            key = await conn.fetchval(
                f'SELECT concurrency_key FROM "{schema}".jobs WHERE id = $1', job.id
            )
        assert key == "tenant:1"


async def test_queues_command_sets_and_shows_the_per_key_limit(pg_dsn: str, schema: str) -> None:
    app = taskq.App(pg_dsn, schema=schema)
    async with app:  # installs the schema
        pass
    done = run_cli(pg_dsn, "queues", "set", "fair", "--per-key-limit", "3", schema=schema)
    assert done.returncode == 0, done.stderr
    assert "per key" in done.stdout and " 3" in done.stdout
    listed = run_cli(pg_dsn, "queues", "--json", schema=schema)
    assert [(q["name"], q["per_key_limit"]) for q in __import__("json").loads(listed.stdout)] == [
        ("fair", 3)
    ]
    zero = run_cli(pg_dsn, "queues", "set", "fair", "--per-key-limit", "0", schema=schema)
    assert zero.returncode == 1 and "per_key_limit" in zero.stderr
    cleared = run_cli(pg_dsn, "queues", "set", "fair", "--per-key-limit", "none", schema=schema)
    assert cleared.returncode == 0, cleared.stderr
    async with app:
        assert (await app.queue("fair").info()).per_key_limit is None


async def claim(
    conn: asyncpg.Connection, schema: str, limit: int, queue: str = "fair"
) -> tuple[list[Any], bool]:
    rows = await conn.fetch(
        f"SELECT * FROM {schema}.claim(ARRAY[$1], ARRAY['fair.c'], $2, 'w', 30)", queue, limit
    )
    return [r for r in rows if r["lost"] is False], any(r["lost"] is None for r in rows)


async def test_the_claim_takes_turns_between_keys_and_holds_each_to_its_limit(
    app: taskq.App, conn: asyncpg.Connection
) -> None:
    @app.task(name="fair.c", queue="fair")
    async def c(n: int) -> None:
        return None

    s = f'"{app.schema}"'
    async with app:
        await app.queue("fair").configure(per_key_limit=2)
        big = await c.options(concurrency_key="big").enqueue_many([{"n": i} for i in range(50)])
        small = await c.options(concurrency_key="small").enqueue_many([{"n": i} for i in range(3)])
        plain = await c.enqueue_many([{"n": i} for i in range(3)])
        # A queue without a per_key_limit ignores keys: claim order, no turns.
        other = await c.options(queue="other", concurrency_key="big").enqueue_many(
            [{"n": i} for i in range(4)]
        )

        # Every key's first job before any key's second (no key is one more key),
        # each key's jobs in claim order.
        got, _ = await claim(conn, s, 3)
        assert {r["id"] for r in got} == {big[0].id, small[0].id, plain[0].id}
        got, held = await claim(conn, s, 10)
        assert {r["id"] for r in got} == {big[1].id, small[1].id, plain[1].id}
        running = dict(
            await conn.fetch(
                f"SELECT coalesce(concurrency_key, '-'), count(*) FROM {s}.jobs "
                "WHERE state = 'running' AND queue = 'fair' GROUP BY 1"
            )
        )
        assert running == {"big": 2, "small": 2, "-": 2}
        assert held  # big still has due jobs that its limit holds back
        got, held = await claim(conn, s, 10, "other")
        assert ([r["id"] for r in got], held) == ([j.id for j in other], False)

        got, held = await claim(conn, s, 10)
        assert (got, held) == ([], True)
        # One small job ends: its key's slot is free again, and only that one.
        done = next(
            r
            for r in await conn.fetch(
                f"SELECT id, lease_token FROM {s}.jobs WHERE concurrency_key = 'small' "
                "AND state = 'running' ORDER BY id LIMIT 1"
            )
        )
        await conn.fetch(
            f"SELECT {s}.finish(ARRAY[$1::bigint], ARRAY[$2::uuid], ARRAY['succeeded'], "
            "ARRAY['null'], ARRAY[NULL], ARRAY[0::float8])",
            done["id"],
            done["lease_token"],
        )
        got, _ = await claim(conn, s, 10)
        assert [r["id"] for r in got] == [small[2].id]


# -- across worker processes -------------------------------------------------------

BIG = 400
SMALL = 10
PLAIN = 10
LIMIT = 2


def peak_overlap(rows: list[Any]) -> int:
    """Most jobs running at one instant, from their start and end times."""
    events = sorted(
        [(r["started_at"], 1) for r in rows] + [(r["finished_at"], -1) for r in rows],
        key=lambda e: (e[0], e[1]),
    )
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


async def test_a_small_tenant_is_not_starved_by_a_big_backlog_across_two_processes(
    pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    from . import fairapp

    app = taskq.App(pg_dsn, schema=schema)
    work = app.task(name="fair.work", queue="fair", retry=False)(fairapp.work.fn)
    s = f'"{schema}"'
    async with app:
        await app.queue("fair").configure(per_key_limit=LIMIT)
        await work.options(concurrency_key="tenant:big").enqueue_many(
            [{"tenant": "big", "seconds": 0.005}] * BIG
        )
        await work.enqueue_many([{"tenant": "none", "seconds": 0.005}] * PLAIN)
        samples: Counter[tuple[str, int]] = Counter()

        async def sample() -> None:
            for key, n in await conn.fetch(
                f"SELECT coalesce(concurrency_key, '-'), count(*) FROM {s}.jobs "
                "WHERE state = 'running' GROUP BY 1"
            ):
                samples[(key, n)] += 1

        with worker_processes(pg_dsn, schema, 2, "--concurrency", "8", app="fairapp:app"):
            with anyio.fail_after(120):
                # The small tenant arrives once the big backlog is well under way.
                while (
                    await conn.fetchval(
                        f"SELECT count(*) FROM {s}.history WHERE args->>'tenant' = 'big'"
                    )
                    < BIG // 20
                ):
                    await sample()
                # In a transaction, to read the database clock just before the
                # commit that makes them visible to claims.
                async with conn.transaction():
                    await work.options(
                        concurrency_key="tenant:small", connection=conn
                    ).enqueue_many([{"tenant": "small", "seconds": 0.005}] * SMALL)
                    committed: datetime = await conn.fetchval("SELECT clock_timestamp()")
                while await conn.fetchval(f"SELECT count(*) FROM {s}.jobs") > 0:
                    await sample()
        rows = await conn.fetch(
            f"SELECT args->>'tenant' AS tenant, state, enqueued_at, started_at, finished_at "
            f"FROM {s}.history"
        )
    by: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        by[r["tenant"]].append(r)
    # Everything ran, the big backlog included, and jobs without a key too.
    assert {t: len(v) for t, v in by.items()} == {"big": BIG, "small": SMALL, "none": PLAIN}
    assert all(r["state"] == "succeeded" for r in rows)

    # At no moment more than LIMIT running per key: sampled, and from the times.
    assert max(n for (_, n) in samples) <= LIMIT, samples
    assert ("tenant:big", LIMIT) in samples  # the limit is used, not just respected
    for tenant in ("big", "small", "none"):
        assert peak_overlap(by[tenant]) <= LIMIT, tenant

    # The small tenant's first job starts within one claim round of its
    # enqueue: big jobs started after its commit and before it come only from
    # claims that began before the commit (each starts at most LIMIT).
    first_small = min(r["started_at"] for r in by["small"])
    last_small = max(r["started_at"] for r in by["small"])
    big_starts = sorted(r["started_at"] for r in by["big"])
    assert sum(committed <= t < first_small for t in big_starts) <= 2 * LIMIT
    # All of them start before the big backlog is 20% drained ...
    assert sum(t <= last_small for t in big_starts) < BIG * 0.2
    # ... and wait little compared with the time the big backlog took.
    big_drain = max(r["finished_at"] for r in by["big"]) - big_starts[0]
    waits = [r["started_at"] - r["enqueued_at"] for r in by["small"]]
    assert max(waits) < big_drain * 0.2, (max(waits), big_drain)
