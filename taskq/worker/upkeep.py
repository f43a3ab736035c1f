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

#: Each prune round deletes old history in batches of PRUNE_BATCH rows for up
#: to this long (then it goes on at the next round): enough to keep up with
#: tens of thousands of finished jobs a second.
PRUNE_BUDGET_SECONDS = 5.0
PRUNE_BATCH = 5000
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


class Pruner:
    """Deletes history past its retention, in its own loop so it never delays renewals."""

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
        cfg = self._config
        while True:
            await anyio.sleep(cfg.prune_interval)
            deadline = time.monotonic() + PRUNE_BUDGET_SECONDS
            try:
                while time.monotonic() < deadline:
                    async with self._database.acquire("pruning history") as conn:
                        deleted = await self._store.prune_history(
                            conn,
                            self._retention.total_seconds(),
                            batch=PRUNE_BATCH,
                            max_batches=1,
                        )
                    if deleted < PRUNE_BATCH:
                        break  # caught up
            except Exception as exc:  # a lost database or a driver fault must not end the loop
                log.warning("worker %s could not prune history: %s", self._state.worker_id, exc)
