"""The scheduler: makes the jobs of cron entries as their slots fall due (see ``_cron``).

One runs inside each worker; Postgres makes sure each slot gives one job
across all of them, with no leader.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio

from ._cron import MAX_SLEEP_SECONDS, MAX_SLOTS_PER_PASS, MISSED_AFTER_SECONDS, CronEntry
from ._database import Database
from ._registry import Registry
from ._serialization import encode
from ._store import Store

log = logging.getLogger("taskq.cron")


class Scheduler:
    """Makes the jobs of an App's cron entries as their slots fall due.

    One runs inside each worker. ``clock`` returns the current aware datetime
    (tests pass a controllable one and call :meth:`tick` themselves).
    """

    def __init__(
        self,
        registry: Registry,
        database: Database,
        store: Store,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._registry = registry
        self._database = database
        self._store = store
        self.clock = clock or (lambda: datetime.now(UTC))
        # Per entry name: the newest slot known to be handled.
        self._pointer: dict[str, datetime] = {}
        self._registered: dict[str, CronEntry] = {}
        # Per entry name: the job each of its slots makes, resolved against
        # the task's defaults once, when the entry is registered.
        self._jobs: dict[str, dict[str, Any]] = {}
        self.jobs_made = 0
        self._changed: anyio.Event | None = None

    def notify_changed(self) -> None:
        """An entry was added at run time: look at it now."""
        if self._changed is not None:
            self._changed.set()

    async def run(self) -> None:
        """Handle slots until cancelled; database trouble is logged and retried."""
        backoff = 1.0
        unsubscribe = self._registry.on_cron_change(self.notify_changed)
        try:
            while True:
                # Made before the pass: an entry added during it wakes the next one.
                changed = self._changed = anyio.Event()
                try:
                    wait = await self.tick()
                    backoff = 1.0
                except Exception as exc:  # a lost database must not end the scheduler
                    log.warning("cron: %s (retrying in %.0fs)", exc, backoff)
                    wait = backoff
                    backoff = min(backoff * 2, MAX_SLEEP_SECONDS)
                with anyio.move_on_after(wait):
                    await changed.wait()
        finally:
            unsubscribe()

    async def tick(self) -> float:
        """Register new entries and make the jobs of due slots; return the seconds
        until the next slot of any entry (at most ``MAX_SLEEP_SECONDS``)."""
        entries = list(self._registry.crons.values())
        if not entries:
            return MAX_SLEEP_SECONDS
        now = self.clock()
        more = False
        async with self._database.acquire("running cron entries") as conn:
            for entry in entries:
                if self._registered.get(entry.name) != entry:
                    await self._register(conn, entry, now)
                more |= await self._handle(conn, entry, now)
        if more:
            return 0.0
        upcoming = [s for e in entries if (s := e.next_after(now)) is not None]
        if not upcoming:
            return MAX_SLEEP_SECONDS
        wait = (min(upcoming) - self.clock()).total_seconds()
        # Wake a hair after the slot, so that the clock has surely passed it.
        return min(max(wait + 0.001, 0.0), MAX_SLEEP_SECONDS)

    async def _register(self, conn: Any, entry: CronEntry, now: datetime) -> None:
        task = self._registry.tasks[entry.task]
        job: dict[str, Any] = {
            "task": entry.task,
            "queue": entry.queue or task.queue,
            "args": encode(entry.args, what=f"args of cron entry {entry.name!r}"),
            "priority": entry.priority if entry.priority is not None else task.priority,
        }
        last = await self._store.register_cron(
            conn,
            name=entry.name,
            expression=entry.expression,
            timezone=entry.timezone,
            missed=entry.missed,
            # A new entry starts from now: its past slots were never its to run.
            newest_slot=entry.latest_at_or_before(now) or now,
            **job,
        )
        self._pointer[entry.name] = last
        self._registered[entry.name] = entry
        self._jobs[entry.name] = {**job, "max_attempts": task.retry.attempts}

    async def _handle(self, conn: Any, entry: CronEntry, now: datetime) -> bool:
        """Handle the entry's due slots; True if some are left for the next pass."""
        pointer = self._pointer[entry.name]
        if pointer >= now:
            return False
        cutoff = now - timedelta(seconds=MISSED_AFTER_SECONDS)
        plan: list[tuple[datetime, bool]] = []
        if pointer < cutoff:
            newest_missed = entry.latest_at_or_before(cutoff)
            if newest_missed is not None and newest_missed > pointer:
                if entry.missed == "all":
                    missed = entry.slots_between(pointer, cutoff)
                    plan = [(slot, True) for slot in missed]
                    if missed[-1] < newest_missed:  # more than one pass's worth
                        await self._fire(conn, entry, plan)
                        return True
                else:
                    plan = [(newest_missed, entry.missed == "latest")]
            pointer = max(pointer, cutoff)
        recent = entry.slots_between(pointer, now)
        if recent and plan and entry.missed == "latest":
            # The newest slot gets its job anyway; the missed one is not run on top.
            plan[-1] = (plan[-1][0], False)
        plan += [(slot, True) for slot in recent]
        await self._fire(conn, entry, plan)
        return len(recent) >= MAX_SLOTS_PER_PASS

    async def _fire(self, conn: Any, entry: CronEntry, plan: list[tuple[datetime, bool]]) -> None:
        job = self._jobs[entry.name]
        for slot, make_job in plan:
            job_id = await self._store.cron_fire(
                conn, name=entry.name, slot=slot, make_job=make_job, **job
            )
            if job_id == -1:
                # Its row was deleted while we ran it: record it again next pass.
                log.warning(
                    "cron %s: entry missing from the database; recording it again", entry.name
                )
                self._registered.pop(entry.name, None)
                return
            self._pointer[entry.name] = slot
            if job_id:
                self.jobs_made += 1
                log.info("cron %s: slot %s -> job %d", entry.name, slot.isoformat(), job_id)
            elif job_id == 0:
                log.info("cron %s: missed slot %s skipped", entry.name, slot.isoformat())
