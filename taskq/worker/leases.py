"""The leases a worker holds: the keeper renews them, the watchdog gives them up."""

from __future__ import annotations

import logging
import time

import anyio

from .._database import Database
from .._store import Store
from .config import WorkerConfig
from .state import WorkerState
from .writeback import WriteBack

log = logging.getLogger("taskq.worker")

#: A worker that could not renew a job's lease for this share of the lease
#: cancels the job itself, before the lease runs out and another worker may
#: start it.
LEASE_GIVE_UP_FRACTION = 0.75


class LeaseKeeper:
    """Heartbeat, lease renewal, and the pickup of cancels whose notification was missed.

    One round every third of the lease. The rescue of other workers' expired
    leases is a service of its own (``Rescuer``), on its own cadence.
    """

    def __init__(
        self,
        database: Database,
        store: Store,
        config: WorkerConfig,
        state: WorkerState,
        writeback: WriteBack,
    ) -> None:
        self._database = database
        self._store = store
        self._config = config
        self._state = state
        self._writeback = writeback

    async def run(self) -> None:
        """Heartbeat: renew leases and pick up missed cancels, every third of the lease."""
        interval = self._config.lease_seconds / 3
        while True:
            await anyio.sleep(interval)
            # Bounded: a database that hangs must not stop the next heartbeat
            # from trying again (the lease watchdog acts if none gets through).
            with anyio.move_on_after(max(interval, 1.0)):
                try:
                    await self.renew()
                except Exception as exc:  # a lost database or a driver fault must not end the loop
                    log.warning(
                        "worker %s could not renew its leases: %s", self._state.worker_id, exc
                    )

    async def run_renewals(self) -> None:
        """Renew the leases of running jobs every third of a lease (for ``run_one``)."""
        while True:
            await anyio.sleep(self._config.lease_seconds / 3)
            try:
                await self.renew()
            except Exception as exc:  # the next round tries again; the watchdog is not running
                log.warning("worker %s could not renew its leases: %s", self._state.worker_id, exc)

    async def renew(self) -> None:
        """One round: heartbeat, then renew every lease this worker holds, in one statement."""
        cfg = self._config
        running_jobs = self._state.running
        sent = time.monotonic()
        async with self._database.acquire("renewing leases") as conn:
            await self._store.heartbeat(conn, self._state.worker_id)
            held = [(r.job.id, r.job.token) for r in running_jobs.values()]
            held += self._writeback.held()
            if not held:
                return
            renewed = await self._store.renew_leases(conn, held, cfg.lease_seconds)
        for job_id, _ in held:
            running = running_jobs.get(job_id)
            if running is None or running.stop_reason is not None:
                continue
            if job_id not in renewed:
                if running.committing:
                    continue  # ended by its own ctx.transaction() commit, which settles it
                log.warning("job %s: this worker lost its lease; cancelling it here", job_id)
                running.stop("lost")
                continue
            running.lease_deadline = sent + cfg.lease_seconds
            if renewed[job_id]:  # a cancel whose notification we missed
                log.info("job %s: cancel requested", job_id)
                running.stop("cancel")


class LeaseWatchdog:
    """Cancels our own jobs when their leases could not be renewed for most of their time.

    A worker cut off from Postgres keeps running its jobs while, after the
    lease expires, another worker may start them again. Giving up a little
    before expiry keeps the two runs from overlapping.
    """

    def __init__(self, config: WorkerConfig, state: WorkerState) -> None:
        self._config = config
        self._state = state

    async def run(self) -> None:
        cfg = self._config
        margin = cfg.lease_seconds * (1 - LEASE_GIVE_UP_FRACTION)
        while True:
            await anyio.sleep(max(cfg.lease_seconds / 20, 0.02))
            now = time.monotonic()
            doomed = [
                r
                for r in self._state.running.values()
                # A job committing its ctx.transaction() holds its row's lock:
                # nobody can take it over meanwhile, and the commit settles it.
                if r.stop_reason is None and not r.committing and r.lease_deadline - now < margin
            ]
            if doomed:
                log.warning(
                    "worker %s could not renew its leases for %.1fs; cancelling %d job(s) "
                    "before another worker takes them over: %s",
                    self._state.worker_id,
                    cfg.lease_seconds - (min(r.lease_deadline for r in doomed) - now),
                    len(doomed),
                    [r.job.id for r in doomed[:20]],
                )
                for running in doomed:
                    running.stop("lost")
