"""What a worker's parts share: its running jobs, its wake-up flag, its counts."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from .._hooks import Hooks, OutcomeKind
from .._store import ClaimedJob
from .config import WorkerStats

log = logging.getLogger("taskq.worker")

#: Outcome kinds as written back (see Outcome) -> as hooks, logs and metrics name them.
OUTCOME_NAMES: dict[str, OutcomeKind] = {
    "succeeded": "succeeded",
    "retry": "retried",
    "failed": "failed",
    "cancelled": "cancelled",
    "release": "released",
}


class Flag:
    """A resettable event with a timed wait (asyncio's Event, which can be cleared)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self, timeout: float | None = None) -> bool:
        if self._event.is_set():
            return True
        if timeout is None:
            await self._event.wait()
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            pass
        return self._event.is_set()


@dataclass(slots=True)
class RunningJob:
    """A claimed job while its task runs, and why the worker stopped it, if it did."""

    job: ClaimedJob
    # Monotonic time by which the lease in Postgres surely expires unless
    # renewed (measured from before the claim or renewal was sent).
    lease_deadline: float
    task: asyncio.Task[None] | None = None
    # Why we cancelled it, if we did: "release" (shutdown), "cancel" (the user
    # asked), "lost" (our lease was taken over).
    stop_reason: str | None = None
    # Its ctx.transaction() is committing: the job's row may be gone because
    # this very commit ended it (the lease keeper must not take that for a
    # lost lease).
    committing: bool = False

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.task is not None:
            self.task.cancel()


class WorkerState:
    """One worker's shared state: read and written by its claim loop, runner and services."""

    def __init__(self, worker_id: str, hooks: Hooks) -> None:
        self.worker_id = worker_id
        self.stats = WorkerStats()
        #: The jobs running now, by id.
        self.running: dict[int, RunningJob] = {}
        #: Wakes the claim loop (a slot freed up, a job was announced, stop...).
        self.wake = Flag()
        #: The worker claims no more jobs.
        self.stopping = False
        #: The claim loop waits for a slot to free up.
        self.full = False
        #: The last claim was held back by a limit on running jobs (a queue's
        #: concurrency or per-key limit), which the end of one of our own jobs
        #: lifts once its outcome is written back.
        self.held_back = False
        self._hooks = hooks

    def uncount(self, kind: str) -> None:
        # WorkerStats counts each outcome under its public name.
        field = OUTCOME_NAMES[kind]
        setattr(self.stats, field, getattr(self.stats, field) - 1)

    def observe(self, event: str, *args: Any) -> None:
        # Instrumentation must never disturb the worker: a claim whose jobs
        # were not started because a metric failed would leave them stuck.
        for observer in self._hooks.observers:
            try:
                getattr(observer, event)(*args)
            except Exception:
                log.exception("worker observer %r failed on %s", observer, event)
