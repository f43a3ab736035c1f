"""Cron: periodic jobs, made exactly once per slot across the cluster, with no leader.

Every worker runs a scheduler (unless ``cron=False``). When a slot of an entry
falls due, each scheduler asks Postgres to move the entry's ``last_slot``
forward to it, with an UPDATE that only moves it from an older slot, and to
enqueue the job in the same transaction (``cron_fire()`` in migration 2). Row
locking makes the competing UPDATEs take turns; the first moves it and makes
the job, the others find it already there and change nothing. A worker that
dies between the two steps cannot leave one without the other: they commit
together.

Expressions are parsed and stepped through by cronsim, which follows Debian
cron in local time, daylight-saving changes included:

- a slot inside the hour skipped by a spring-forward change runs once, right
  after the change (02:30 becomes 03:00 that day);
- a slot inside the hour repeated by a fall-back change runs once, at its first
  occurrence, for entries with a fixed hour; entries that fire every hour (or
  more often) fire in both copies of the hour, as the clock shows each time.

Slots are stored as UTC instants, so each one is claimed once whatever the
zone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
from cronsim import CronSim, CronSimError

from ._errors import ConfigurationError
from ._names import check_queue, check_task_name
from ._serialization import encode

if TYPE_CHECKING:
    from ._app import App

log = logging.getLogger("taskq.cron")

#: What happens to slots that fell due while no scheduler ran (every worker
#: down): ``latest`` makes one job for the newest of them, ``all`` makes one
#: per slot, ``skip`` makes none.
MISSED_POLICIES = ("latest", "all", "skip")
#: A slot counts as missed when the scheduler first sees it more than this
#: long after its time; a slot seen sooner (a scheduler woke late, a worker
#: restarted) always gets its job.
MISSED_AFTER_SECONDS = 60.0
#: Most slots of one entry handled in one pass (``missed="all"`` after a long
#: outage goes on at the next pass, at once).
MAX_SLOTS_PER_PASS = 1000
#: Longest sleep between passes: entries added at run time and clock jumps are
#: noticed at least this often.
MAX_SLEEP_SECONDS = 30.0


def _zone(name: str) -> ZoneInfo:
    if not isinstance(name, str):
        raise ConfigurationError(f"timezone must be an IANA name such as 'UTC', got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(
            f"unknown time zone {name!r}; use an IANA name such as 'UTC' or 'Europe/Paris'"
        ) from None


@dataclass(frozen=True)
class CronEntry:
    """One periodic job: a cron expression in a time zone, and the job it makes.

    Made by ``@app.cron`` or ``app.add_cron``. ``queue`` and ``priority`` of
    ``None`` use the task's defaults.
    """

    name: str
    expression: str
    task: str
    timezone: str = "UTC"
    args: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    missed: str = "latest"

    def __post_init__(self) -> None:
        check_task_name(self.name)
        check_task_name(self.task)
        if not isinstance(self.expression, str):
            raise ConfigurationError(f"a cron expression must be a string, got {self.expression!r}")
        try:
            CronSim(self.expression, datetime.now(_zone(self.timezone)))
        except CronSimError as exc:
            raise ConfigurationError(
                f"bad cron expression {self.expression!r}: {exc} (five fields: minute hour "
                "day-of-month month day-of-week, or six with seconds first)"
            ) from None
        if self.queue is not None:
            check_queue(self.queue)
        if self.missed not in MISSED_POLICIES:
            raise ConfigurationError(
                f"missed must be one of {', '.join(MISSED_POLICIES)}, got {self.missed!r}"
            )

    @property
    def zone(self) -> ZoneInfo:
        return _zone(self.timezone)

    def _iter(self, start: datetime, *, reverse: bool = False) -> Iterator[datetime]:
        it = CronSim(self.expression, start.astimezone(self.zone), reverse=reverse)
        while True:
            try:
                local = next(it)
            except StopIteration:  # no match within cronsim's 50-year horizon
                return
            yield local.astimezone(UTC)

    def next_after(self, moment: datetime) -> datetime | None:
        """The first slot strictly after ``moment`` (an aware datetime), in UTC."""
        return next(self._iter(moment), None)

    def latest_at_or_before(self, moment: datetime) -> datetime | None:
        """The newest slot at or before ``moment``, in UTC."""
        # cronsim's reverse iteration starts strictly before a whole second and
        # at the second itself when there are microseconds: nudge by one.
        return next(self._iter(moment + timedelta(microseconds=1), reverse=True), None)

    def slots_between(
        self, after: datetime, until: datetime, limit: int = MAX_SLOTS_PER_PASS
    ) -> list[datetime]:
        """Slots in ``(after, until]``, oldest first, at most ``limit`` of them."""
        found: list[datetime] = []
        for slot in self._iter(after):
            if slot > until or len(found) >= limit:
                break
            found.append(slot)
        return found


class Scheduler:
    """Makes the jobs of an App's cron entries as their slots fall due.

    One runs inside each worker. ``clock`` returns the current aware datetime
    (tests pass a controllable one and call :meth:`tick` themselves).
    """

    def __init__(self, app: App, *, clock: Callable[[], datetime] | None = None) -> None:
        self.app = app
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
        unsubscribe = self.app._on_cron_change(self.notify_changed)
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
        entries = list(self.app.crons.values())
        if not entries:
            return MAX_SLEEP_SECONDS
        now = self.clock()
        more = False
        async with self.app._acquire("running cron entries") as conn:
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
        task = self.app.tasks[entry.task]
        job: dict[str, Any] = {
            "task": entry.task,
            "queue": entry.queue or task.queue,
            "args": encode(entry.args, what=f"args of cron entry {entry.name!r}"),
            "priority": entry.priority if entry.priority is not None else task.priority,
        }
        last = await self.app._store.register_cron(
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
            job_id = await self.app._store.cron_fire(
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
