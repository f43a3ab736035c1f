"""Cluster upkeep any worker does: the rescuer of expired leases and the history pruner."""

from __future__ import annotations

import logging
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


class Rescuer:
    """Re-queues (or ends) jobs whose worker stopped renewing their lease; no leader needed.

    It runs in the lease keeper's round (see LeaseKeeper), every
    ``rescue_interval`` at most, whatever the queues and tasks of this worker.
    """

    def __init__(
        self, database: Database, store: Store, config: WorkerConfig, state: WorkerState
    ) -> None:
        self._database = database
        self._store = store
        self._config = config
        self._state = state

    async def rescue(self) -> None:
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
