"""The batched write-back of job outcomes: the buffer and the flush loop."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

import anyio

from .._database import Database
from .._errors import DatabaseError
from .._store import Outcome, Store
from .config import WorkerConfig
from .state import Flag, WorkerState

log = logging.getLogger("taskq.worker")

#: Longest a single write-back may take before it is abandoned and retried.
FLUSH_TIMEOUT_SECONDS = 30.0


class WriteBack:
    """Buffers outcomes and writes them back in batches, fenced by each job's lease token.

    :meth:`run` writes them on a connection of its own, one statement at a
    time: while one write is in flight the next outcomes gather, so batches
    grow with the load without any timer, and claims (on another connection)
    never wait for a write-back, nor a write-back for a claim.
    """

    def __init__(
        self, database: Database, store: Store, config: WorkerConfig, state: WorkerState
    ) -> None:
        self._database = database
        self._store = store
        self._config = config
        self._state = state
        #: Outcomes recorded and not yet taken by a write, oldest first.
        self.outcomes: list[Outcome] = []
        # Outcomes taken from the buffer by a write that has not returned yet.
        self._writing: dict[int, Outcome] = {}  # by job id
        self._ready = Flag()
        self._flushed = Flag()
        self._flushed.set()

    def add(self, outcome: Outcome) -> None:
        """Buffer one outcome; the flush loop writes it with the others gathered meanwhile."""
        self.outcomes.append(outcome)
        self._flushed.clear()
        self._ready.set()

    @property
    def pending(self) -> bool:
        """Some outcome is not written yet (buffered, or in a write that has not returned)."""
        return bool(self.outcomes or self._writing)

    def held(self) -> list[tuple[int, uuid.UUID]]:
        """Jobs whose outcome is not written yet: their leases must still be renewed."""
        return [(o.job_id, o.token) for o in (*self.outcomes, *self._writing.values())]

    async def wait_flushed(self) -> None:
        while self.pending:
            self._ready.set()
            await self._flushed.wait(1.0)

    def take(self) -> list[Outcome]:
        """Move the oldest buffered outcomes (up to a batch) to the in-flight list."""
        batch = self.outcomes[: self._config.batch_size]
        del self.outcomes[: len(batch)]
        self._writing.update((o.job_id, o) for o in batch)
        return batch

    def written(self, batch: list[Outcome], lost: list[int], committed: Sequence[int] = ()) -> None:
        """A write of ``batch`` committed; ``lost``: the ids whose lease was no longer held.

        ``committed``: ids whose outcome an earlier write had committed already
        (its reply was lost with the connection, and the batch was sent again).
        They count as written: the job ended (or went back) once, as recorded.
        """
        state = self._state
        for outcome in batch:
            self._writing.pop(outcome.job_id, None)
        state.stats.writebacks += 1
        if lost:
            # Counted when recorded; another worker owns these jobs now.
            gone = set(lost)
            for outcome in batch:
                if outcome.job_id in gone:
                    state.uncount(outcome.kind)
                    state.stats.lost += 1
        if not self.pending:
            self._flushed.set()
        if state.held_back or any(o.kind == "retry" for o in batch):
            # A limit held the last claim back and the jobs just written back
            # may have freed its slots (finish() announces that too, but a
            # NOTIFY comes back through the listener a round trip later); or
            # a retry may be due soon: recompute when to wake.
            state.wake.set()
        if committed:
            log.info(
                "worker %s: the reply to a write-back was lost, but the outcome of job(s) %s "
                "had committed; sent again, it changed nothing",
                state.worker_id,
                list(committed),
            )
        if lost:
            log.warning(
                "worker %s: lease lost for job(s) %s before their outcome was written; "
                "another worker owns them now, outcome dropped",
                state.worker_id,
                lost,
            )

    def not_written(self, batch: list[Outcome]) -> None:
        """A write of ``batch`` failed, or may not have committed."""
        # Back to the front of the buffer, to be sent again: the lease token
        # makes a repeat of a write that did commit change nothing.
        for outcome in batch:
            self._writing.pop(outcome.job_id, None)
        self.outcomes[:0] = batch

    async def run(self) -> None:
        """Write back outcomes as they come: at once, or as soon as the previous write returns."""
        backoff = 0.05
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self.outcomes:
                try:
                    await self.flush_batch()
                except Exception as exc:  # a lost database or a driver fault must not end the loop
                    log.warning(
                        "worker %s cannot write back %d outcome(s): %s",
                        self._state.worker_id,
                        len(self.outcomes),
                        exc,
                    )
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05

    async def flush_all(self) -> None:
        """Write back every buffered outcome now, retrying until cancelled."""
        backoff = 0.05
        while self.outcomes:
            try:
                await self.flush_batch()
            except Exception as exc:  # a lost database or a driver fault must not end the loop
                log.warning("worker %s cannot write back outcomes: %s", self._state.worker_id, exc)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def flush_batch(self) -> None:
        """Write back the oldest buffered outcomes (up to a batch) in one statement."""
        # Shielded: a write-back cancelled half-way (at shutdown) would commit
        # without the buffer knowing, then be sent again and look like a lost
        # lease. Bounded, so a hung database cannot hold shutdown for ever.
        batch = self.take()
        if not batch:
            return
        lost: list[int] | None = None
        committed: list[int] = []
        try:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(FLUSH_TIMEOUT_SECONDS) as scope,
            ):
                async with self._database.acquire("writing back job outcomes") as conn:
                    lost, committed = await self._store.write_back(conn, batch)
        finally:
            if lost is None:
                self.not_written(batch)
            else:
                self.written(batch, lost, committed)
        if scope.cancelled_caught:
            raise DatabaseError(f"writing back outcomes took over {FLUSH_TIMEOUT_SECONDS:.0f}s")
