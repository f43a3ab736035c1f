"""``worker --autoscale MIN:MAX``: more worker children while jobs wait and the CPU is idle.

Every ``check_seconds`` the autoscaler asks Postgres two cheap questions on
one small connection of its own (the supervisor opens no App): how long the
job next in line of each served queue has waited (an index probe per queue,
whatever the backlog), and how many jobs this supervisor's children run.
It reads the CPU's idle share from ``/proc/stat`` (else the load average).

- **Grow** by one child when the wait was above ``lag_seconds`` at
  ``grow_checks`` checks in a row, the CPU is at least ``idle_cpu`` idle
  (more processes on a busy CPU only take turns), and the last growth was
  ``grow_seconds`` ago.
- **Shrink** by one child when no job waited past the threshold for
  ``quiet_seconds``, the children's running jobs at each check of that time
  would have fit in one child fewer at half its concurrency (hysteresis: a load that needs
  1.5 children keeps 2), and the last change was ``shrink_seconds`` ago.
  The child is drained, never killed: SIGTERM makes it stop claiming, finish
  its running jobs and exit; no other shrink starts until it has exited.

Every decision, and every growth the CPU held back, is logged with its
reason (the latter at most once a minute).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from types import TracebackType
from typing import Any

import asyncpg

from .._names import quote_schema
from .supervisor import Supervisor, Timings

log = logging.getLogger("taskq.supervisor")

#: A growth held back by a busy CPU is logged at most this often.
HELD_BACK_LOG_SECONDS = 60.0
#: A failed check (database unreachable) is logged at most this often.
ERROR_LOG_SECONDS = 60.0
#: A check that takes longer is abandoned (no change made): the supervisor's
#: loop, which also restarts children, waits for it.
QUERY_TIMEOUT_SECONDS = 5.0
#: Shrink only if the peak of running jobs fits in one child fewer at this
#: share of its concurrency.
SHRINK_FILL = 0.5


def lag_sql(schema: str, *, all_queues: bool) -> str:
    """Per served queue that is not paused: seconds the job next in line has waited.

    The head of ``jobs_claim`` (the claim's own order) per queue: one index
    probe each, so a backlog of millions costs what an empty queue does. With
    every queue served, the queues with queued jobs are found by a skip scan
    of the same index (one probe per queue, not a read of every row).
    """
    s = quote_schema(schema)
    if all_queues:
        queues = (
            "WITH RECURSIVE q(queue) AS ("
            f"(SELECT queue FROM {s}.jobs WHERE state = 'queued' ORDER BY queue LIMIT 1) "
            f"UNION ALL SELECT (SELECT j.queue FROM {s}.jobs j WHERE j.state = 'queued' "
            "AND j.queue > q.queue ORDER BY j.queue LIMIT 1) FROM q WHERE q.queue IS NOT NULL) "
            "SELECT q.queue, "
        )
        source = "FROM q "
    else:
        queues = "SELECT q.queue, "
        source = "FROM unnest($1::text[]) AS q(queue) "
    return (
        queues + "extract(epoch FROM now() - h.run_at)::float8 AS lag "
        f"{source}CROSS JOIN LATERAL (SELECT j.run_at FROM {s}.jobs j "
        "WHERE j.state = 'queued' AND j.queue = q.queue AND j.run_at <= now() "
        "ORDER BY j.priority DESC, j.run_at, j.id LIMIT 1) AS h "
        f"WHERE q.queue IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {s}.queues p "
        "WHERE p.name = q.queue AND p.paused)"
    )


def running_sql(schema: str) -> str:
    """Jobs that this supervisor's children run (their worker ids end ``:SPID/INDEX``)."""
    return (
        f"SELECT count(*) FROM {quote_schema(schema)}.jobs "
        "WHERE state = 'running' AND worker_id LIKE $1"
    )


class CpuIdle:
    """The share of CPU time spent idle since the previous reading (0 to 1)."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = None

    def __call__(self) -> float:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError, IndexError):
            # No /proc: the 1-minute load average against the cores.
            return max(0.0, 1.0 - os.getloadavg()[0] / (os.cpu_count() or 1))
        idle, total = fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])
        last, self._last = self._last, (idle, total)
        if last is None or total <= last[1]:
            return 1.0  # no interval to measure yet
        return (idle - last[0]) / (total - last[1])


class Autoscaler:
    """Grows and shrinks a :class:`Supervisor`'s children; see the module docstring."""

    def __init__(
        self,
        supervisor: Supervisor,
        dsn: str,
        schema: str,
        queues: list[str] | None,
        *,
        low: int,
        high: int,
        concurrency: int,
        connect_args: dict[str, Any],
    ) -> None:
        self.supervisor = supervisor
        self.low, self.high = low, high
        self.concurrency = concurrency
        self.timings: Timings = supervisor.timings
        self._dsn = dsn
        self._connect_args = connect_args
        self._queues = queues
        self._lag_sql = lag_sql(schema, all_queues=queues is None)
        self._running_sql = running_sql(schema)
        self._conn: Any = None
        self._cpu = CpuIdle()
        self._next_check = 0.0
        self._lagging = 0  # consecutive checks with a wait above the threshold
        self._last_change = 0.0  # monotonic time of the last grow or shrink
        self._last_backlog = time.monotonic()
        # (time, running jobs) of the checks of the last quiet_seconds.
        self._running: deque[tuple[float, int]] = deque()
        self._last_held_log = 0.0
        self._last_error_log = 0.0
        self._cpu()  # first reading: the next one is a delta

    async def __aenter__(self) -> Autoscaler:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _measure(self) -> tuple[str | None, float, int]:
        """(the queue with the longest wait, that wait, running jobs of the children)."""
        if self._conn is None or self._conn.is_closed():
            kwargs = {**self._connect_args, "timeout": QUERY_TIMEOUT_SECONDS}
            self._conn = await asyncpg.connect(self._dsn, **kwargs)
        args = () if self._queues is None else (self._queues,)
        rows = await self._conn.fetch(self._lag_sql, *args, timeout=QUERY_TIMEOUT_SECONDS)
        worst = max(rows, key=lambda r: r["lag"], default=None)
        running = await self._conn.fetchval(
            self._running_sql, f"%:{os.getpid()}/%", timeout=QUERY_TIMEOUT_SECONDS
        )
        if worst is None:
            return None, 0.0, int(running)
        return worst["queue"], max(0.0, float(worst["lag"])), int(running)

    async def tick(self) -> None:
        """Called by the supervisor's loop: a check every ``check_seconds``."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.timings.check_seconds
        try:
            queue, lag, running = await self._measure()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            if now - self._last_error_log >= ERROR_LOG_SECONDS:
                self._last_error_log = now
                log.warning("autoscale: cannot read the backlog (no change made): %s", exc)
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
            return
        self.decide(now, queue, lag, running, self._cpu())

    def decide(self, now: float, queue: str | None, lag: float, running: int, idle: float) -> str:
        """Act on one check; return what was done (``grow``, ``shrink``, ``held``, ``""``)."""
        t = self.timings
        sup = self.supervisor
        size = sup.size
        if lag > t.lag_seconds:
            self._lagging += 1
            self._last_backlog = now
        else:
            self._lagging = 0
        self._running.append((now, running))
        while self._running[0][0] < now - t.quiet_seconds:
            self._running.popleft()
        peak = max(n for _, n in self._running)
        if size < self.low:  # a slot was forgotten or drained below MIN
            sup.grow(f"below the minimum of {self.low}")
            self._last_change = now
            return "grow"
        if self._lagging >= t.grow_checks and size < self.high:
            if now - self._last_change < t.grow_seconds:
                return ""
            if idle < t.idle_cpu:
                if now - self._last_held_log >= HELD_BACK_LOG_SECONDS:
                    self._last_held_log = now
                    log.info(
                        "autoscale: not growing past %d children although the job next in "
                        "queue %r has waited %.1f s: the CPU is only %.0f%% idle (< %.0f%%)",
                        size,
                        queue,
                        lag,
                        idle * 100,
                        t.idle_cpu * 100,
                    )
                return "held"
            sup.grow(
                f"{size} -> {size + 1}: the job next in queue {queue!r} has waited "
                f"{lag:.1f} s (> {t.lag_seconds:g} s) at {self._lagging} checks in a row, "
                f"CPU {idle * 100:.0f}% idle"
            )
            self._last_change = now
            self._lagging = 0
            return "grow"
        quiet = now - max(self._last_backlog, self._last_change)
        fits = peak <= (size - 1) * self.concurrency * SHRINK_FILL
        if (
            size > self.low
            and not sup.draining
            and quiet >= t.quiet_seconds
            and now - self._last_change >= t.shrink_seconds
            and fits
        ):
            sup.shrink(
                f"{size} -> {size - 1}: no job waited over {t.lag_seconds:g} s for "
                f"{quiet:.0f} s, and at most {peak} job(s) ran at once in that time"
            )
            self._last_change = now
            return "shrink"
        return ""
