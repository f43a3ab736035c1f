"""History partitioned by time: partitions made ahead, dropped whole past the retention.

The upkeep's statements are called one by one (as a worker's prune round
calls them) on a real Postgres, then one worker shows the round end to end.
What must survive a drop does (the finished steps of unfinished workflows),
what goes with it goes (their jobs' checkpoints), a drop never waits long
behind a reader of history nor holds up the write-back, and an install of
version 11 keeps every row of its history in place.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
from typing import Any

import anyio
import asyncpg
import pytest

import taskq
from taskq import _migrations
from taskq.worker.upkeep import partition_width

from .conftest import until

pytestmark = pytest.mark.anyio

DAY = 86400.0


async def sql(app: taskq.App, query: str, *args: Any) -> Any:
    async with app.pool.acquire() as conn:
        return await conn.fetchval(query.format(s=f'"{app.schema}"'), *args)


async def rows(app: taskq.App, query: str, *args: Any) -> list[Any]:
    async with app.pool.acquire() as conn:
        return list(await conn.fetch(query.format(s=f'"{app.schema}"'), *args))


async def partitions(app: taskq.App) -> list[tuple[str, dt.datetime, dt.datetime]]:
    found = await rows(app, "SELECT name, from_at, to_at FROM {s}.history_partitions()")
    return [(r["name"], r["from_at"], r["to_at"]) for r in found]


async def add_partition(app: taskq.App, days_ago: float, days: float = 1.0) -> str:
    """A partition of the past, [now - days_ago, now - days_ago + days)."""
    name: str = await sql(
        app,
        "SELECT {s}.history_partition_add(date_trunc('second', now()) - make_interval("
        "secs => $1), date_trunc('second', now()) - make_interval(secs => $2))",
        days_ago * DAY,
        (days_ago - days) * DAY,
    )
    return name


async def finished(
    app: taskq.App, job_id: int, days_ago: float, workflow: int | None = None
) -> None:
    """A history row finished ``days_ago``, with a recorded step of its job."""
    await sql(
        app,
        "INSERT INTO {s}.history (id, queue, task, args, state, priority, attempts, "
        "max_attempts, enqueued_at, finished_at, workflow_id, result) VALUES ($1, 'q', 't', "
        "'{{}}', 'succeeded', 0, 1, 1, now() - interval '30 days', "
        "now() - make_interval(secs => $2), $3, to_jsonb($1::bigint))",
        job_id,
        days_ago * DAY,
        workflow,
    )
    await sql(
        app,
        "INSERT INTO {s}.job_checkpoints (job_id, name, result, attempt) VALUES ($1, 'a', '1', 1)",
        job_id,
    )


async def where(app: taskq.App, job_id: int) -> str | None:
    """The partition that holds the job's history row."""
    name: str | None = await sql(
        app, "SELECT tableoid::regclass::text FROM {s}.history WHERE id = $1", job_id
    )
    return None if name is None else name.rsplit(".", 1)[-1].strip('"')


async def extend(conn: asyncpg.Connection, app: taskq.App, width: float, ahead: float) -> list[str]:
    """What a prune round does first: partitions added until they reach far enough."""
    made = []
    while name := await app.store.extend_history(conn, width, ahead):
        made.append(name)
    return made


async def detach_and_drop(app: taskq.App, retention_days: float) -> tuple[list[str], int]:
    """What a prune round does next: partitions past the retention detached, then dropped."""
    detached = []
    async with app.pool.acquire() as conn:
        while True:
            name, busy = await app.store.detach_history(conn, retention_days * DAY)
            assert busy is None
            if name is None:
                return detached, await app.store.drop_detached_history(conn)
            detached.append(name)


def test_partition_width_follows_the_retention() -> None:
    # The larger of a seventh of the retention and the prune interval, rounded down to
    # a width that divides a day (or to whole days), at least a second.
    assert partition_width(7 * DAY, 60) == DAY  # a week: daily partitions
    assert partition_width(30 * DAY, 60) == 4 * DAY
    assert partition_width(DAY, 60) == 3 * 3600
    assert partition_width(3600, 60) == 300
    assert partition_width(60, 60) == 60  # short retention: the prune interval
    assert partition_width(0, 45) == 30
    assert partition_width(0, 0.1) == 1


async def test_partitions_are_made_ahead_contiguous_and_aligned(app: taskq.App) -> None:
    async with app:
        assert await partitions(app) == []  # a new install: the DEFAULT partition only
        async with app.pool.acquire() as conn:
            made = await extend(conn, app, 3600, 3 * 3600)
            assert await extend(conn, app, 3600, 3 * 3600) == []  # far enough
        now = await sql(app, "SELECT now()")
        found = await partitions(app)
        assert [p[0] for p in found] == made and len(made) in (3, 4)
        assert found[0][1] <= now < found[0][2]  # the current one: no row in DEFAULT yet
        assert found[-1][2] >= now + dt.timedelta(hours=3)
        for (_, _, end), (_, start, _) in itertools.pairwise(found):
            assert end == start  # contiguous
        assert all(p[2].timestamp() % 3600 == 0 for p in found)  # ending on the hour
        # Indexes of their own, attached to history's.
        indexes = {
            r[0]
            for r in await rows(
                app, "SELECT indexname FROM pg_indexes WHERE tablename = $1", made[0]
            )
        }
        suffixes = {"pkey", "finished_at", "dead", "unique", "workflow", "unsucceeded"}
        assert indexes == {f"{made[0]}_{x}" for x in suffixes}
        # A finished job goes to the current partition.
        await finished(app, 1, 0)
        assert await where(app, 1) == made[0]

        # Another App with another retention continues them with its own width.
        async with app.pool.acquire() as conn:
            wider = await extend(conn, app, DAY, 2 * DAY)
        found = await partitions(app)
        assert [p[0] for p in found] == made + wider
        assert found[len(made)][1] == found[len(made) - 1][2]  # no gap, no overlap
        assert all(p[2].timestamp() % DAY == 0 for p in found[len(made) :])  # midnights


async def test_workers_doing_the_upkeep_at_once_make_each_partition_once(
    pg_dsn: str, app: taskq.App
) -> None:
    async with app:
        old = await add_partition(app, 3)
        await finished(app, 1, 2.5)
        conns = [await asyncpg.connect(pg_dsn) for _ in range(4)]
        try:

            async def round_(conn: asyncpg.Connection) -> tuple[list[str], list[str]]:
                made = await extend(conn, app, 3600, 4 * 3600)
                detached = []
                while (name := (await app.store.detach_history(conn, DAY))[0]) is not None:
                    detached.append(name)
                await app.store.drop_detached_history(conn)
                return made, detached

            with anyio.fail_after(30):
                done = await asyncio.gather(*(round_(c) for c in conns))
        finally:
            for c in conns:
                await c.close()
        found = [p for p in await partitions(app) if p[0] != old]
        # Made once each (whoever made them), contiguous; the old one detached at most
        # once (or left to a later round, when each found another session at it).
        assert sorted(n for made, _ in done for n in made) == [p[0] for p in found]
        assert all(a[2] == b[1] for a, b in itertools.pairwise(found))
        assert [n for _, d in done for n in d] in ([], [old])
        await detach_and_drop(app, 1)
        assert await sql(app, "SELECT count(*) FROM {s}.history") == 0


async def test_new_partitions_start_after_the_rows_that_went_to_the_default_partition(
    app: taskq.App,
) -> None:
    async with app:
        await finished(app, 1, 0)  # no partition yet: in the DEFAULT partition
        assert await where(app, 1) == "history_default"
        async with app.pool.acquire() as conn:
            made = await extend(conn, app, DAY, DAY)
        first = (await partitions(app))[0]
        assert first[0] == made[0]
        finished_at = await sql(app, "SELECT finished_at FROM {s}.history WHERE id = 1")
        assert finished_at < first[1] <= finished_at + dt.timedelta(seconds=1)
        assert first[2].timestamp() % DAY == 0
        await finished(app, 2, -2 / DAY)  # finished 2 s from now
        assert await where(app, 1) == "history_default" and await where(app, 2) == made[0]


async def test_prune_drops_partitions_past_the_retention_and_keeps_the_younger(
    app: taskq.App,
) -> None:
    async with app:
        old = await add_partition(app, 3)  # [3 days ago, 2 days ago)
        young = await add_partition(app, 2)  # [2 days ago, 1 day ago)
        await finished(app, 1, 2.5)
        await finished(app, 2, 1.5)
        assert (await where(app, 1), await where(app, 2)) == (old, young)

        assert await detach_and_drop(app, 2.5) == ([], 0)  # no partition is all older
        assert await detach_and_drop(app, 1.5) == ([old], 1)  # every row of it is older
        assert [p[0] for p in await partitions(app)] == [young]
        assert await sql(app, "SELECT count(*) FROM {s}.history") == 1
        assert await sql(app, "SELECT to_regclass($1)", f'"{app.schema}".{old}') is None
        # The dropped job's recorded steps went with it.
        assert await sql(app, "SELECT array_agg(job_id) FROM {s}.job_checkpoints") == [2]


async def test_kept_workflow_steps_survive_a_drop_until_their_workflow_ends(
    app: taskq.App,
) -> None:
    async with app:
        # Workflow 1 runs, workflow 2 ended long ago.
        await sql(app, "INSERT INTO {s}.workflows (id, name, steps) VALUES (1, 'running', 2)")
        await sql(
            app,
            "INSERT INTO {s}.workflows (id, name, steps, state, finished_at) "
            "VALUES (2, 'ended', 1, 'succeeded', now() - interval '3 days')",
        )
        old = await add_partition(app, 4)
        young = await add_partition(app, 1, 2)  # [1 day ago, tomorrow)
        await finished(app, 10, 3.5)  # a plain job
        await finished(app, 11, 3.5, workflow=1)  # a step of the running workflow
        await finished(app, 12, 3.5, workflow=2)  # a step of the ended one
        await finished(app, 13, 0.5, workflow=1)  # a young step of the running one
        await sql(
            app,
            "INSERT INTO {s}.workflow_steps (job_id, workflow_id, name, parents, pending) "
            "VALUES (11, 1, 'old', 0, 0), (13, 1, 'young', 0, 0)",
        )
        # A job whose id is in the dropped partition's range but that is still live,
        # with a recorded step: not history's to delete.
        await sql(app, "INSERT INTO {s}.job_checkpoints (job_id, name, attempt) VALUES (9, 'a', 1)")

        assert await detach_and_drop(app, 1.5) == ([old], 1)
        left = await rows(app, "SELECT id, result FROM {s}.history ORDER BY id")
        assert [(r["id"], r["result"]) for r in left] == [(11, "11"), (13, "13")]
        assert await where(app, 11) == "history_default" and await where(app, 13) == young
        kept = await sql(app, "SELECT array_agg(job_id ORDER BY job_id) FROM {s}.job_checkpoints")
        assert kept == [9, 11, 13]
        # The running workflow still reads its step (its status counts it).
        status = await app.get_workflow(1).status()
        assert [(s.name, s.state) for s in status.steps] == [
            ("old", taskq.JobState.SUCCEEDED),
            ("young", taskq.JobState.SUCCEEDED),
        ]

        # Row by row in the DEFAULT partition: kept while the workflow runs (the
        # ended workflow goes)...
        async with app.pool.acquire() as conn:
            assert await app.store.prune_history(conn, 1.5 * DAY) == 1
        assert await where(app, 11) == "history_default"
        assert await sql(app, "SELECT array_agg(id) FROM {s}.workflows") == [1]
        # ...pruned with its checkpoints once it has ended (past the retention).
        await sql(
            app,
            "UPDATE {s}.workflows SET state = 'succeeded', finished_at = now() WHERE id = 1",
        )
        async with app.pool.acquire() as conn:
            assert await app.store.prune_history(conn, 1.5 * DAY) == 1
        assert await where(app, 11) is None and await where(app, 13) == young
        kept = await sql(app, "SELECT array_agg(job_id ORDER BY job_id) FROM {s}.job_checkpoints")
        assert kept == [9, 13]


async def test_a_detached_partition_left_by_a_crash_is_dropped_by_the_next_round(
    app: taskq.App,
) -> None:
    async with app:
        old = await add_partition(app, 3)
        await finished(app, 1, 2.5)
        async with app.pool.acquire() as conn:
            assert await app.store.detach_history(conn, DAY) == (old, None)
        # The worker died here: history no longer has the rows, the table is left.
        assert await sql(app, "SELECT count(*) FROM {s}.history") == 0
        assert await sql(app, "SELECT to_regclass($1) IS NOT NULL", f'"{app.schema}".{old}')
        assert await detach_and_drop(app, 1.0) == ([], 1)
        assert await sql(app, "SELECT to_regclass($1)", f'"{app.schema}".{old}') is None
        assert await sql(app, "SELECT count(*) FROM {s}.job_checkpoints") == 0


async def test_a_drop_gives_up_behind_a_reader_and_never_holds_up_the_write_back(
    pg_dsn: str, app: taskq.App
) -> None:
    @app.task
    async def answer() -> int:
        return 42

    async with app:
        old = await add_partition(app, 3)
        # The function waits 50 ms for the lock; here 2 s, so that the write-back
        # below surely arrives while it waits (and queues behind it).
        await sql(
            app, "ALTER FUNCTION {s}.history_detach(double precision) SET lock_timeout = '2s'"
        )
        reader = await asyncpg.connect(pg_dsn)
        pruner = await asyncpg.connect(pg_dsn)
        try:
            reading = reader.transaction()
            await reading.start()  # a long report on history, still open
            await reader.fetchval(f'SELECT count(*) FROM "{app.schema}".history')
            outcome: dict[str, Any] = {}

            async def drop() -> None:
                outcome["drop"] = await app.store.detach_history(pruner, DAY)

            async with anyio.create_task_group() as tg:
                tg.start_soon(drop)
                # The drop is queued for its lock: from now on, every statement on
                # history queues behind it until it gives up.
                await until(
                    lambda: sql(
                        app,
                        "SELECT EXISTS (SELECT FROM pg_locks WHERE NOT granted AND "
                        "mode = 'AccessExclusiveLock' AND relation = '{s}.history'::regclass)",
                    ),
                    10,
                    "the drop waiting for its lock",
                )
                job = await answer.enqueue()
                with anyio.fail_after(30):
                    stats = await app.drain()  # writes the job's end into history
            assert stats.succeeded == 1 and await job.result(timeout=5) == 42
            assert outcome["drop"] == (None, old)  # it gave up: a later round drops it
            assert not reader.is_closed() and reader.is_in_transaction()  # still reading
            await reading.commit()
            assert await detach_and_drop(app, 1.0) == ([old], 1)
        finally:
            await reader.close()
            await pruner.close()


async def test_a_worker_adds_partitions_and_drops_them_past_the_retention(
    app: taskq.App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="taskq.worker")
    app.history_retention = dt.timedelta(seconds=2)

    @app.task
    async def noop() -> None:
        return None

    async with app, app.worker(prune_interval=0.2):
        # 1-second partitions (the retention is short), made ahead by the upkeep.
        await until(lambda: partitions(app), 10, "partitions made ahead")
        job = await noop.enqueue()
        await job.result(timeout=10)
        holder = await where(app, job.id)
        assert holder is not None and holder != "history_default"
        await until(
            lambda: sql(app, "SELECT to_regclass($1) IS NULL", f'"{app.schema}".{holder}'),
            20,
            "the partition dropped",
        )
        assert await where(app, job.id) is None
        ahead = await partitions(app)
        assert ahead and ahead[-1][2] > await sql(app, "SELECT now()")
    assert f"history partition(s) past the retention: {holder}" in caplog.text


async def test_an_install_of_version_11_keeps_every_row_in_place(pg_dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    s = f'"{schema}"'
    try:
        async with conn.transaction():
            await conn.execute(_migrations._bootstrap(schema))
            for m in _migrations.all_migrations()[:11]:
                await conn.execute(m.sql(schema))
                await conn.execute(
                    f"INSERT INTO {s}.migrations (version, name) VALUES ($1, $2)",
                    m.version,
                    m.name,
                )
        # 20,000 finished jobs of the last 10 days, a few failed, some with a unique key.
        await conn.execute(
            f"INSERT INTO {s}.history (id, queue, task, args, state, priority, attempts, "
            "max_attempts, enqueued_at, finished_at, result, error, unique_key) "
            "SELECT g, 'q', 'v11.add', jsonb_build_object('a', g), "
            "CASE WHEN g % 100 = 0 THEN 'failed' ELSE 'succeeded' END, 0, 1, 1, "
            "now() - interval '11 days', now() - make_interval(secs => 43.2 * (20001 - g)), "
            "CASE WHEN g % 100 <> 0 THEN to_jsonb(g * 2) END, "
            'CASE WHEN g % 100 = 0 THEN \'{"type": "E", "message": "m"}\'::jsonb END, '
            "CASE WHEN g % 10 = 0 THEN 'k' || g END FROM generate_series(1, 20000) AS g"
        )
        await conn.execute(f"SELECT setval(pg_get_serial_sequence('{s}.jobs', 'id'), 20000)")
        before = await conn.fetchval(
            f"SELECT md5(string_agg(h::text, ',' ORDER BY id)) FROM {s}.history AS h"
        )
    finally:
        await conn.close()

    app = taskq.App(pg_dsn, schema=schema, history_retention=dt.timedelta(days=7))

    @app.task(name="v11.add")
    async def add(a: int) -> int:
        return a * 2

    async with app:  # migrates to the newest version
        assert await sql(app, "SELECT max(version) FROM {s}.migrations") >= 12
        after = await sql(
            app, "SELECT md5(string_agg(h::text, ',' ORDER BY id)) FROM {s}.history AS h"
        )
        assert after == before  # every row, every column, the same ids
        [(name, _start, end)] = await partitions(app)  # from MINVALUE
        assert name == "history_v11" and end <= await sql(app, "SELECT now()")
        assert await sql(app, "SELECT count(*) FROM {s}.history_v11") == 20000
        assert await sql(app, "SELECT count(*) FROM {s}.history_default") == 0
        # The App reads the old rows, and a unique key finished before still holds.
        assert await app.get_job(4).result(timeout=5) == 8
        with pytest.raises(taskq.JobFailed):
            await app.get_job(100).result(timeout=5)
        held = await add.options(queue="q", unique_key="k19990", unique_for=30 * DAY).enqueue(a=1)
        assert held.id == 19990
        # New jobs run and land in the partitions the upkeep makes.
        async with app.pool.acquire() as conn:
            await extend(conn, app, DAY, DAY)
        job = await add.enqueue(a=21)
        await app.drain()
        assert await job.result(timeout=5) == 42
        assert await where(app, job.id) not in (None, "history_v11", "history_default")
        # Once its bound is past the retention, the old table goes in one drop.
        assert await detach_and_drop(app, 7) == ([], 0)
        assert await detach_and_drop(app, 0) == (["history_v11"], 1)
        assert await sql(app, "SELECT count(*) FROM {s}.history") == 1


async def test_the_apps_role_keeps_history_without_ddl_rights_and_a_reader_cannot(
    pg_dsn: str, app: taskq.App
) -> None:
    """The upkeep's DDL runs as the schema's owner (SECURITY DEFINER), for a session
    whose user may write history: the deployment guide's DML grants are enough, and a
    role that may only read cannot add or drop partitions."""
    roles = {"reader": f"{app.schema}_ro", "writer": f"{app.schema}_app"}
    admin = await asyncpg.connect(pg_dsn)
    s = f'"{app.schema}"'
    try:
        async with app:
            old = await add_partition(app, 3)
            await finished(app, 1, 2.5)
        for role in roles.values():
            await admin.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER')
            await admin.execute(f'GRANT USAGE ON SCHEMA {s} TO "{role}"')
        writes = "SELECT, INSERT, UPDATE, DELETE"
        await admin.execute(f'GRANT {writes} ON ALL TABLES IN SCHEMA {s} TO "{roles["writer"]}"')
        await admin.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO "{roles["reader"]}"')
        for who, role in roles.items():
            conn = await asyncpg.connect(pg_dsn.replace("postgres@", f"{role}@", 1))
            try:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(f"CREATE TABLE {s}.sneaky (x int)")
                if who == "reader":
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await extend(conn, app, DAY, DAY)
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await app.store.detach_history(conn, DAY)
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await app.store.drop_detached_history(conn)
                    continue
                assert await extend(conn, app, DAY, DAY)
                assert await app.store.detach_history(conn, DAY) == (old, None)
                assert await app.store.drop_detached_history(conn) == 1
                assert await app.store.prune_history(conn, DAY) == 0
            finally:
                await conn.close()
        assert await admin.fetchval(f"SELECT count(*) FROM {s}.history") == 0
    finally:
        for role in roles.values():
            await admin.execute(f'DROP OWNED BY "{role}"')
            await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()
