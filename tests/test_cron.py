"""Cron: slot times across time zones and DST, one job per slot across workers, missed slots."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import taskq
from taskq._cron import MISSED_AFTER_SECONDS
from taskq._scheduler import Scheduler

from .conftest import PYTHON, subprocess_env
from .test_flow import worker_processes


def scheduler_of(app: taskq.App, clock: Any) -> Scheduler:
    return Scheduler(app.registry, app.database, app.store, clock=clock)


pytestmark = pytest.mark.anyio


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def slots(expression: str, timezone: str, start: datetime, n: int) -> list[datetime]:
    entry = taskq.CronEntry("e", expression, "t", timezone=timezone)
    found = []
    moment = start
    for _ in range(n):
        nxt = entry.next_after(moment)
        assert nxt is not None
        found.append(nxt)
        moment = nxt
    return found


# Each row: expression, zone, start (UTC), the next slots (UTC). Europe/Paris
# goes from UTC+1 to UTC+2 at 01:00 UTC on 2026-03-29 (02:00 -> 03:00 local)
# and back at 01:00 UTC on 2026-10-25 (03:00 -> 02:00 local).
DST_TABLE: list[tuple[str, str, datetime, list[datetime]]] = [
    # 02:30 daily: the day of spring-forward has no 02:30; it runs at 03:00 once.
    (
        "30 2 * * *",
        "Europe/Paris",
        utc(2026, 3, 27, 12),
        [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)],
    ),
    # 02:30 daily across fall-back: 02:30 happens twice that night, it runs once.
    (
        "30 2 * * *",
        "Europe/Paris",
        utc(2026, 10, 24, 12),
        [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)],
    ),
    # Every 30 minutes across fall-back: the wall clock shows 02:00 and 02:30
    # twice, and the entry fires at each (every real half hour).
    (
        "*/30 * * * *",
        "Europe/Paris",
        utc(2026, 10, 24, 23, 45),
        [
            utc(2026, 10, 25, 0, 0),
            utc(2026, 10, 25, 0, 30),
            utc(2026, 10, 25, 1, 0),
            utc(2026, 10, 25, 1, 30),
            utc(2026, 10, 25, 2, 0),
        ],
    ),
    # Hourly at :15 across spring-forward: 02:15 local does not exist.
    (
        "15 * * * *",
        "Europe/Paris",
        utc(2026, 3, 28, 23, 30),
        [utc(2026, 3, 29, 0, 15), utc(2026, 3, 29, 1, 15), utc(2026, 3, 29, 2, 15)],
    ),
    # New York: 09:00 on weekdays keeps 09:00 local across its DST change.
    (
        "0 9 * * 1-5",
        "America/New_York",
        utc(2026, 3, 6, 0),
        [utc(2026, 3, 6, 14), utc(2026, 3, 9, 13), utc(2026, 3, 10, 13)],
    ),
    # Seconds first: every 20 seconds.
    (
        "*/20 * * * * *",
        "UTC",
        utc(2026, 1, 1, 0, 0, 5),
        [utc(2026, 1, 1, 0, 0, 20), utc(2026, 1, 1, 0, 0, 40), utc(2026, 1, 1, 0, 1, 0)],
    ),
]


@pytest.mark.parametrize(("expression", "zone", "start", "expected"), DST_TABLE)
def test_slot_instants_across_time_zones_and_dst(
    expression: str, zone: str, start: datetime, expected: list[datetime]
) -> None:
    assert slots(expression, zone, start, len(expected)) == expected


def test_latest_slot_at_or_before_includes_the_instant_itself() -> None:
    entry = taskq.CronEntry("e", "0 * * * *", "t")
    assert entry.latest_at_or_before(utc(2026, 5, 1, 10, 0)) == utc(2026, 5, 1, 10, 0)
    assert entry.latest_at_or_before(utc(2026, 5, 1, 10, 59, 59)) == utc(2026, 5, 1, 10, 0)
    assert entry.slots_between(utc(2026, 5, 1, 10), utc(2026, 5, 1, 12)) == [
        utc(2026, 5, 1, 11),
        utc(2026, 5, 1, 12),
    ]


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def cron_app(pg_dsn: str, schema: str, expression: str, **options: Any) -> taskq.App:
    app = taskq.App(pg_dsn, schema=schema)

    @app.cron(expression, name="entry", **options)
    @app.task(name="cron.job", queue="cron")
    async def job(label: str = "") -> None:
        return None

    return app


async def made_slots(conn: asyncpg.Connection, schema: str) -> list[datetime]:
    rows = await conn.fetch(f'SELECT run_at FROM "{schema}".jobs ORDER BY run_at')
    return [r[0] for r in rows]


async def test_four_schedulers_make_one_job_per_slot_across_dst(
    pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    """Four schedulers tick at the same (fake) instants through the Paris
    fall-back night: every slot gives exactly one job."""
    apps = [cron_app(pg_dsn, schema, "*/30 * * * *", timezone="Europe/Paris") for _ in range(4)]
    clock = Clock(utc(2026, 10, 24, 22, 59))
    schedulers = [scheduler_of(a, clock) for a in apps]
    async with apps[0], apps[1], apps[2], apps[3]:
        while clock.now < utc(2026, 10, 25, 3, 1):
            await asyncio.gather(*(s.tick() for s in schedulers))
            clock.now += timedelta(minutes=7)
        made = await made_slots(conn, schema)
    expected = [utc(2026, 10, 24, 23, 0) + timedelta(minutes=30 * i) for i in range(8)]
    assert made == expected
    assert sum(s.jobs_made for s in schedulers) == len(expected)


async def test_spring_forward_slot_runs_once_right_after_the_change(
    pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    app = cron_app(pg_dsn, schema, "30 2 * * *", timezone="Europe/Paris")
    clock = Clock(utc(2026, 3, 28, 12))
    scheduler = scheduler_of(app, clock)
    async with app:
        while clock.now < utc(2026, 3, 30, 12):
            await scheduler.tick()
            clock.now += timedelta(seconds=20)
        made = await made_slots(conn, schema)
    assert made == [utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]


@pytest.mark.parametrize(
    ("missed", "expected_hours"),
    [("latest", [13]), ("all", [10, 11, 12, 13]), ("skip", [])],
)
async def test_missed_slots_follow_the_entry_policy(
    pg_dsn: str,
    schema: str,
    conn: asyncpg.Connection,
    missed: str,
    expected_hours: list[int],
) -> None:
    app = cron_app(pg_dsn, schema, "0 * * * *", missed=missed)
    clock = Clock(utc(2026, 6, 1, 9, 30))
    async with app:
        await scheduler_of(app, clock).tick()  # registers the entry: nothing due yet
        assert await made_slots(conn, schema) == []
        # Every worker down from 09:30 to 13:20: slots 10:00 .. 13:00 were missed.
        clock.now = utc(2026, 6, 1, 13, 20)
        await scheduler_of(app, clock).tick()
        assert await made_slots(conn, schema) == [utc(2026, 6, 1, h) for h in expected_hours]
        # The next slot is on time again under every policy.
        clock.now = utc(2026, 6, 1, 14, 0, 1)
        await scheduler_of(app, clock).tick()
        assert (await made_slots(conn, schema))[-1] == utc(2026, 6, 1, 14)


async def test_a_slot_seen_late_but_within_the_threshold_is_not_missed(
    pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    app = cron_app(pg_dsn, schema, "* * * * *", missed="skip")
    clock = Clock(utc(2026, 6, 1, 9, 0, 30))
    scheduler = scheduler_of(app, clock)
    async with app:
        await scheduler.tick()
        # A scheduler held up for almost the threshold still runs the slot, even under "skip".
        clock.now = utc(2026, 6, 1, 9, 1) + timedelta(seconds=MISSED_AFTER_SECONDS - 5)
        await scheduler.tick()
        assert await made_slots(conn, schema) == [utc(2026, 6, 1, 9, 1)]
        # Held up past it: 09:02 is a missed slot and "skip" skips it; 09:03 is on time.
        clock.now = utc(2026, 6, 1, 9, 2) + timedelta(seconds=MISSED_AFTER_SECONDS + 5)
        await scheduler.tick()
        assert await made_slots(conn, schema) == [utc(2026, 6, 1, 9, 1), utc(2026, 6, 1, 9, 3)]


async def test_a_new_entry_does_not_run_its_past_slots_and_a_changed_one_restarts(
    pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    app = cron_app(pg_dsn, schema, "0 3 * * *", missed="all")
    clock = Clock(utc(2026, 6, 1, 10))
    async with app:
        await scheduler_of(app, clock).tick()
        assert await made_slots(conn, schema) == []
        # Redeployed with another schedule a day later: no catch-up of either schedule.
        app.add_cron("0 4 * * *", app.tasks["cron.job"], name="entry", missed="all")
        clock.now = utc(2026, 6, 2, 12)
        await scheduler_of(app, clock).tick()
        assert await made_slots(conn, schema) == []
        clock.now = utc(2026, 6, 3, 4, 0, 1)
        await scheduler_of(app, clock).tick()
        assert await made_slots(conn, schema) == [utc(2026, 6, 3, 4)]


async def test_cron_job_arguments_and_queue(
    pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    app = cron_app(pg_dsn, schema, "* * * * *", args={"label": "nightly"}, queue="ops", priority=5)
    clock = Clock(utc(2026, 6, 1, 9, 0, 30))
    scheduler = scheduler_of(app, clock)
    async with app:
        await scheduler.tick()
        clock.now += timedelta(minutes=1)
        await scheduler.tick()
        row = await conn.fetchrow(f'SELECT queue, task, args, priority FROM "{schema}".jobs')
    assert (row["queue"], row["task"], json.loads(row["args"]), row["priority"]) == (
        "ops",
        "cron.job",
        {"label": "nightly"},
        5,
    )


def test_cron_configuration_errors() -> None:
    app = taskq.App("postgresql://unused")

    @app.task(name="cron.t")
    async def t(n: int) -> None:
        return None

    with pytest.raises(taskq.ConfigurationError, match="bad cron expression"):
        app.add_cron("61 * * * *", t, args={"n": 1})
    with pytest.raises(taskq.ConfigurationError, match="bad cron expression"):
        app.add_cron("* * *", t, args={"n": 1})
    with pytest.raises(taskq.ConfigurationError, match="time zone"):
        app.add_cron("* * * * *", t, args={"n": 1}, timezone="Mars/Olympus")
    with pytest.raises(taskq.ConfigurationError, match="missed"):
        app.add_cron("* * * * *", t, args={"n": 1}, missed="sometimes")
    with pytest.raises(TypeError, match="missing a required argument"):
        app.add_cron("* * * * *", t)
    with pytest.raises(taskq.SerializationError):
        app.add_cron("* * * * *", t, args={"n": object()})
    with pytest.raises(taskq.ConfigurationError, match="task of this App"):
        app.add_cron("* * * * *", "cron.unknown")
    app.add_cron("0 * * * *", t, args={"n": 1})
    with pytest.raises(taskq.ConfigurationError, match="own name"):
        app.add_cron("30 * * * *", t, args={"n": 2})
    app.add_cron("30 * * * *", t, args={"n": 2}, name="half-past")
    assert set(app.crons) == {"cron.t", "half-past"}

    # A plain function under @app.cron becomes a task.
    @app.cron("0 0 * * *", name="midnight")
    def midnight() -> None:
        return None

    assert isinstance(midnight, taskq.Task)
    assert app.crons["midnight"].task == midnight.name


async def test_entry_added_at_run_time_reaches_a_running_worker(app: taskq.App) -> None:
    ran = anyio.Event()

    @app.task(name="cron.late")
    async def late() -> None:
        ran.set()

    async with app, app.worker(concurrency=2):
        app.add_cron("* * * * * *", late)
        with anyio.fail_after(10):
            await ran.wait()


async def test_four_worker_processes_make_exactly_one_job_per_second(
    pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    # The workers serve another queue, so the jobs stay queued with their slot
    # in run_at for us to read.
    with worker_processes(pg_dsn, schema, 4, "--queue", "limited", FLOW_CRON="* * * * * *"):
        await anyio.sleep(10)
    made = await made_slots(conn, schema)
    assert len(made) >= 3, made
    duplicates = [slot for slot, n in Counter(made).items() if n > 1]
    assert duplicates == []
    gaps = [b - a for a, b in itertools.pairwise(made)]
    assert set(gaps) == {timedelta(seconds=1)}, made  # none missed

    listed = run_cli(pg_dsn, schema, "cron", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert (entry["name"], entry["expression"], entry["task"]) == (
        "every-second",
        "* * * * * *",
        "flow.tick",
    )
    assert datetime.fromisoformat(entry["last_slot"]) == made[-1]
    assert entry["last_job_id"] == await conn.fetchval(f'SELECT max(id) FROM "{schema}".jobs')


def run_cli(pg_dsn: str, schema: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "taskq", *args],
        env=subprocess_env(pg_dsn, TASKQ_SCHEMA=schema),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


async def test_an_entry_deleted_from_the_database_is_recorded_again(
    pg_dsn: str, schema: str, conn: asyncpg.Connection
) -> None:
    app = cron_app(pg_dsn, schema, "* * * * *")
    clock = Clock(utc(2026, 6, 1, 9, 0, 30))
    scheduler = scheduler_of(app, clock)
    async with app:
        await scheduler.tick()
        await conn.execute(f'DELETE FROM "{schema}".crons')
        clock.now = utc(2026, 6, 1, 9, 1, 1)
        await scheduler.tick()  # finds the row gone
        clock.now = utc(2026, 6, 1, 9, 2, 1)
        await scheduler.tick()  # recorded again at 09:02: from the next slot on
        clock.now = utc(2026, 6, 1, 9, 3, 1)
        await scheduler.tick()
        assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".crons') == 1
        assert await made_slots(conn, schema) == [utc(2026, 6, 1, 9, 3)]
