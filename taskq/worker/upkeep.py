"""Cluster upkeep any worker does: the rescuer of expired leases and the history pruner."""

from __future__ import annotations

import logging
import random
import time
from datetime import timedelta

import anyio

from .._database import Database
from .._store import Store
from .config import WorkerConfig
from .state import WorkerState

log = logging.getLogger("taskq.worker")

#: Each prune round deletes old rows of history's DEFAULT partition (and old
#: workflows) in batches of PRUNE_BATCH rows for up to this long (then it goes
#: on at the next round). Time partitions are dropped whole, before that.
PRUNE_BUDGET_SECONDS = 5.0
PRUNE_BATCH = 5000
#: History is partitioned by the time jobs finished, each partition about
#: the retention divided by this wide, so that rows are kept at least the
#: retention and dropped within about a seventh of it after (a week's
#: retention: daily partitions, up to 8 days of history), while a lookup by
#: id probes few partitions (one index probe each).
HISTORY_PARTITIONS_PER_RETENTION = 7
#: The widths a partition may take below a day, in seconds: each divides a
#: day, so that partitions end at round times (daily ones at midnight UTC).
#: From a day up, whole days.
_DIVISORS = (1, 2, 5, 10, 15, 30)  # of a minute in seconds, of an hour in minutes
HISTORY_PARTITION_WIDTHS = (
    *_DIVISORS,
    *(60 * m for m in _DIVISORS),
    *(3600 * h for h in (1, 2, 3, 4, 6, 12)),
)
#: A worker's first prune round comes this long after it starts (or one
#: prune interval, if that is shorter): soon, so that a new install's
#: finished jobs go to time partitions rather than the DEFAULT one (whose
#: rows every later partition's attach reads), but not at once, so that a
#: worker in a crash loop does not run the round at every start.
FIRST_PRUNE_SECONDS = 10.0
#: Partitions are made ahead of time to cover at least this many prune
#: intervals (and one partition width) past now, so that a round that fails
#: or a worker restart leaves no gap for rows to fall into the DEFAULT
#: partition.
HISTORY_AHEAD_ROUNDS = 3
#: Each pause between two rescues of one worker is drawn between this share of
#: ``rescue_interval`` and all of it, so that workers started together (a
#: deploy) drift apart instead of rescuing in lockstep. Never more than the
#: interval: the documented bound (lease + rescue_interval) stays true.
RESCUE_JITTER = 0.1


class Rescuer:
    """Re-queues (or ends) jobs whose worker stopped renewing their lease; no leader needed.

    A service of its own: it rescues as soon as the worker starts, then every
    ``rescue_interval`` (a little less, see RESCUE_JITTER), whatever the queues
    and tasks of this worker. Rescuing at start is what keeps a crash loop or a
    rolling deploy from starving the rescue: workers that never live a whole
    interval still each look once. Concurrent rescues by many workers are safe
    (the statement skips rows another one has locked).
    """

    def __init__(
        self, database: Database, store: Store, config: WorkerConfig, state: WorkerState
    ) -> None:
        self._database = database
        self._store = store
        self._config = config
        self._state = state

    async def run(self) -> None:
        """Rescue now, then on a steady cadence, until cancelled."""
        interval = self._config.rescue_interval
        while True:
            started = time.monotonic()
            # Bounded: a database that hangs must not hold up the next look.
            with anyio.move_on_after(max(interval, 1.0)):
                try:
                    await self.rescue()
                except Exception as exc:  # a lost database or a driver fault must not end the loop
                    log.warning(
                        "worker %s could not look for expired leases: %s",
                        self._state.worker_id,
                        exc,
                    )
            # Measured from the start of this look, so that slow statements do
            # not stretch the cadence.
            pause = interval * random.uniform(1 - RESCUE_JITTER, 1)
            await anyio.sleep(max(0.0, started + pause - time.monotonic()))

    async def rescue(self) -> None:
        """One look: re-queue or end the expired jobs, forget long-dead workers."""
        cfg = self._config
        state = self._state
        async with self._database.acquire("rescuing jobs") as conn:
            rescued, ended = await self._store.rescue_expired(conn, cfg.max_rescues)
            await self._store.forget_dead_workers(conn, cfg.lease_seconds * 10)
        if rescued or ended:
            state.observe("rescued", len(rescued), len(ended))
        if rescued:
            log.warning(
                "re-queued %d job(s) whose worker stopped renewing their lease: %s",
                len(rescued),
                rescued[:20],
            )
            state.wake.set()
        if ended:
            log.error(
                "ended %d job(s) whose lease expired and that may not run again "
                "(no attempts left, poison, or being cancelled): %s",
                len(ended),
                ended[:20],
            )


def partition_width(retention: float, prune_interval: float) -> float:
    """The width in seconds of the history partitions a worker adds.

    The larger of a seventh of the retention (HISTORY_PARTITIONS_PER_RETENTION)
    and the prune interval, rounded down to a width of HISTORY_PARTITION_WIDTHS
    or to whole days (at least a second). Not much less than the prune
    interval: narrower partitions would not drop rows any sooner (drops happen
    once a round), and as many more would be made ahead.
    """
    day = 86400.0
    target = max(retention / HISTORY_PARTITIONS_PER_RETENTION, prune_interval, 1.0)
    if target >= day:
        return day * (target // day)
    return float(max(w for w in HISTORY_PARTITION_WIDTHS if w <= target))


class Pruner:
    """Keeps history to its retention, in its own loop so it never delays renewals.

    Every ``prune_interval`` (the first FIRST_PRUNE_SECONDS after the worker
    starts, or one interval if that is shorter), one round: history's time
    partitions are made ahead (``Store.extend_history``), the ones past the
    retention are detached and
    dropped whole (``Store.detach_history``, ``Store.drop_detached_history``),
    and the DEFAULT partition's old rows and old workflows are deleted in
    batches (``Store.prune_history``). Each step goes on when another fails.
    """

    def __init__(
        self,
        database: Database,
        store: Store,
        config: WorkerConfig,
        state: WorkerState,
        retention: timedelta,
    ) -> None:
        self._database = database
        self._store = store
        self._config = config
        self._state = state
        self._retention = retention

    async def run(self) -> None:
        pause = min(self._config.prune_interval, FIRST_PRUNE_SECONDS)
        while True:
            await anyio.sleep(pause)
            await self.prune()
            pause = self._config.prune_interval

    async def prune(self) -> None:
        """One round."""
        retention = self._retention.total_seconds()
        interval = self._config.prune_interval
        width = partition_width(retention, interval)
        ahead = max(width, HISTORY_AHEAD_ROUNDS * interval)
        store, worker = self._store, self._state.worker_id
        try:
            async with self._database.acquire("adding history partitions") as conn:
                while made := await store.extend_history(conn, width, ahead):
                    log.info("worker %s added history partition %s", worker, made)
        except Exception as exc:  # a lost database or a driver fault must not end the loop
            log.warning("worker %s could not add history partitions: %s", worker, exc)
        try:
            async with self._database.acquire("dropping history partitions") as conn:
                detached: list[str] = []
                while True:
                    name, busy = await store.detach_history(conn, retention)
                    if busy:
                        log.info(
                            "history partition %s is past the retention, but history was in "
                            "use (a lock held on it): it is dropped at a later round",
                            busy,
                        )
                    if not name:
                        break
                    detached.append(name)
                dropped = await store.drop_detached_history(conn)
            if detached or dropped:
                log.info(
                    "worker %s dropped %d history partition(s) past the retention: %s",
                    worker,
                    dropped,
                    ", ".join(detached),
                )
        except Exception as exc:  # a lost database or a driver fault must not end the loop
            log.warning("worker %s could not drop history partitions: %s", worker, exc)
        deadline = time.monotonic() + PRUNE_BUDGET_SECONDS
        try:
            while time.monotonic() < deadline:
                async with self._database.acquire("pruning history") as conn:
                    deleted = await store.prune_history(
                        conn, retention, batch=PRUNE_BATCH, max_batches=1
                    )
                if deleted < PRUNE_BATCH:
                    break  # caught up
        except Exception as exc:  # a lost database or a driver fault must not end the loop
            log.warning("worker %s could not prune history: %s", worker, exc)
