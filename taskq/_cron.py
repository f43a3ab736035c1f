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
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ._errors import ConfigurationError
from ._names import check_queue, check_task_name

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
