"""The worker: its claim loop and its life (start, signals, stop, wind-down), and run_one."""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress

import anyio
from anyio.abc import TaskStatus

from .._hooks import OutcomeKind
from .._names import suggest_task
from .._scheduler import Scheduler
from .._store import ClaimResult
from .config import WorkerConfig, WorkerHost, WorkerStats
from .discovery import QueueDiscovery
from .leases import LeaseKeeper, LeaseWatchdog
from .runner import JobRunner
from .state import OUTCOME_NAMES, RunningJob, WorkerState
from .upkeep import Pruner, Rescuer
from .writeback import FLUSH_TIMEOUT_SECONDS, WriteBack

log = logging.getLogger("taskq.worker")

#: When most slots are busy, wait up to this long for more to free up before
#: claiming, so that claims come in batches rather than one job at a time.
CLAIM_GATHER_SECONDS = 0.002
#: Future due times a worker remembers (from notifications) to wake up for.
MAX_KNOWN_DUE_TIMES = 256
#: How long cancelled jobs get to unwind (finally-blocks) at shutdown.
JOB_CANCEL_GRACE_SECONDS = 10.0
#: A worker that claims nothing although due jobs were announced looks, at most
#: this often, for due jobs of tasks it does not have, and logs each such task
#: once (a job enqueued under a name no worker registers waits for ever).
STRAY_CHECK_SECONDS = 60.0
#: Rows that look reads at most, so that a huge backlog costs a bounded scan.
STRAY_SCAN_ROWS = 10_000
#: Exit status of a process that a third SIGINT/SIGTERM ends at once (as Ctrl-C).
EXIT_STATUS_THIRD_SIGNAL = 130
#: Set by ``worker --processes`` in each child to ``SUPERVISOR_PID/INDEX``,
#: which ends the worker id so that ``status`` shows whose child it is.
SUPERVISED_ENV = "TASKQ_SUPERVISED"


def _exit_now(signal_name: str, worker_id: str) -> None:
    """The third stop signal: leave the process now, without a traceback.

    Whatever still runs (a sync task's thread, a job that ignores its
    cancellation, a write-back in progress) is left to lease expiry.
    """
    log.warning(
        "%s received a third time: worker %s exits now (status %d); jobs still running "
        "or not yet written back run again once their leases expire",
        signal_name,
        worker_id,
        EXIT_STATUS_THIRD_SIGNAL,
    )
    logging.shutdown()  # flush the log handlers
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(EXIT_STATUS_THIRD_SIGNAL)


class Worker:
    """Claims and runs jobs of one App. Made by ``App.run_worker/worker/drain``."""

    def __init__(self, app: WorkerHost, config: WorkerConfig) -> None:
        self._database = app.database
        self._store = app.store
        self._registry = app.registry
        self.config = config
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        if os.environ.get(SUPERVISED_ENV):  # a child of `worker --processes`
            self.id += f":{os.environ[SUPERVISED_ENV]}"
        # What the claim loop, the runner and the services share.
        self._state = state = WorkerState(self.id, self._registry.hooks)
        self.stats = state.stats
        self._running = state.running  # the same dict, never replaced
        self._wake = state.wake
        self._stopped = anyio.Event()
        self._forced = False
        self._writeback = WriteBack(self._database, self._store, config, state)
        self._runner = JobRunner(
            self._registry,
            config,
            state,
            self._writeback,
            app.max_payload_bytes,
            self._database,
            self._store,
        )
        self._leases = LeaseKeeper(self._database, self._store, config, state, self._writeback)
        self._rescuer = Rescuer(self._database, self._store, config, state)
        self._watchdog = LeaseWatchdog(config, state)
        self._pruner = Pruner(self._database, self._store, config, state, app.history_retention)
        self._sleep_until = 0.0  # monotonic end of the claim loop's idle sleep, 0 if awake
        self._queue_filter = None if config.queues is None else set(config.queues)
        # Serving every queue: which ones to claim from (see discovery.py).
        self._discovery = (
            QueueDiscovery(config.poll_interval / 2) if config.queues is None else None
        )
        # Monotonic times at which jobs enqueued for later fall due, nearest
        # first, learnt from notifications (no polling query per wake-up).
        self._due: list[float] = []
        self._scan_due = True
        # Look for jobs of tasks this worker lacks: at start, then after a
        # wake-up for due jobs that gave it nothing (see _report_strays).
        self._stray_check = True
        self._stray_next = 0.0
        self._strays_reported: set[str] = set()
        self.scheduler = Scheduler(self._registry, self._database, self._store)

    def __repr__(self) -> str:
        return f"<taskq.Worker {self.id} running={len(self._running)}>"

    @property
    def running_jobs(self) -> list[int]:
        """Ids of the jobs this worker is running now."""
        return list(self._running)

    # -- control -----------------------------------------------------------------

    async def stop(self, *, force: bool = False) -> None:
        """Stop claiming, let running jobs finish (up to the shutdown timeout), return.

        With ``force`` running jobs are cancelled at once and returned to the queue.
        """
        self._state.stopping = True
        if force:
            self._force()
        self._wake.set()
        await self._stopped.wait()

    def _force(self) -> None:
        self._forced = True
        for running in list(self._running.values()):
            running.stop("release")

    async def run(self, *, until_empty: bool = False, handle_signals: bool = False) -> WorkerStats:
        """Serve until stopped (or, with ``until_empty``, until no runnable job is left)."""
        async with anyio.create_task_group() as tg:
            if handle_signals and threading.current_thread() is threading.main_thread():
                tg.start_soon(self._watch_signals)
            await self.serve(until_empty=until_empty)
            tg.cancel_scope.cancel()
        return self.stats

    async def _watch_signals(self) -> None:
        # 1st signal: stop claiming, give running jobs the shutdown timeout;
        # 2nd: cancel them now; 3rd: leave the process at once.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self._state.stopping:
                    log.warning(
                        "%s received: stopping (running jobs get %.0fs to finish; "
                        "send it again to stop now)",
                        name,
                        self.config.shutdown_timeout,
                    )
                    self._state.stopping = True
                    self._wake.set()
                elif not self._forced:
                    log.warning(
                        "%s received again: cancelling running jobs (send it once more to "
                        "exit at once)",
                        name,
                    )
                    self._force()
                    self._wake.set()
                else:
                    _exit_now(name, self.id)

    # -- main loop ---------------------------------------------------------------

    async def serve(
        self,
        *,
        until_empty: bool = False,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the worker in the current task; ``task_status.started()`` once it claims."""
        store = self._store
        notifier = await self._database.listener()
        unsubscribe: list[Callable[[], None]] = [
            notifier.subscribe(store.enqueued_channel, self._on_enqueued),
            notifier.subscribe(store.cancel_channel, self._on_cancel_request),
            notifier.on_reconnect(self._on_reconnect),
        ]
        try:
            await self._register()
            async with anyio.create_task_group() as services:
                services.start_soon(self._writeback.run)
                services.start_soon(self._leases.run)
                services.start_soon(self._rescuer.run)
                services.start_soon(self._watchdog.run)
                services.start_soon(self._pruner.run)
                if self.config.cron and not until_empty:
                    services.start_soon(self.scheduler.run)
                task_status.started()
                try:
                    await self._claim_loop(until_empty)
                except BaseException:
                    # Cancelled from outside (or broken): no grace period, the
                    # running jobs go back to the queue at once.
                    self._forced = True
                    raise
                finally:
                    self._state.stopping = True
                    with anyio.CancelScope(shield=True):
                        await self._wind_down()
                    services.cancel_scope.cancel()
        finally:
            for undo in unsubscribe:
                undo()
            # Write back what the last jobs produced (released jobs included),
            # even when the worker itself is being cancelled.
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self._writeback.flush_all()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    async with self._database.acquire("unregistering a worker") as conn:
                        await store.unregister_worker(conn, self.id)
                except Exception as exc:  # a lost database or a driver fault must not end the loop
                    log.warning("could not unregister worker %s: %s", self.id, exc)
            if self._writeback.outcomes:
                log.warning(
                    "worker %s stopped with %d outcome(s) not written back; those jobs "
                    "will be rescued when their leases expire",
                    self.id,
                    len(self._writeback.outcomes),
                )
            with anyio.CancelScope(shield=True):
                await self._runner.close_processes()  # no child process outlives the worker
            self._runner.threads.close()
            if self._runner.threads.busy:
                # Daemon threads: the process does not wait for them when it
                # exits, and their functions end with it.
                log.warning(
                    "worker %s stopped with %d sync task thread(s) still running; a process "
                    "that exits now does not wait for them, and their jobs run again once "
                    "their leases expire",
                    self.id,
                    self._runner.threads.busy,
                )
            self._stopped.set()

    async def _register(self) -> None:
        tasks = {
            name: (
                task.queue,
                task.retry.attempts,
                task.rate_limit.limit if task.rate_limit else None,
                task.rate_limit.period if task.rate_limit else None,
            )
            for name, task in self._registry.tasks.items()
        }
        # Idempotent (an upsert): a worker starting while Postgres restarts, or
        # whose backend is terminated, registers once the server is back.
        await self._database.run_again_if_lost(
            "registering a worker",
            lambda conn: self._store.register_worker(
                conn,
                worker_id=self.id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                queues=None if self.config.queues is None else list(self.config.queues),
                tasks=tasks,
                concurrency=self.config.concurrency,
            ),
        )
        log.info(
            "worker %s started: concurrency %d, queues %s, %d task(s)",
            self.id,
            self.config.concurrency,
            "all" if self.config.queues is None else ",".join(self.config.queues),
            len(tasks),
        )

    async def _wind_down(self) -> None:
        """After claiming stopped: give running jobs the grace period, then release them.

        A sync job whose thread still runs is not released (see
        ``JobRunner._stopped_outcome``): its lease expires instead.
        """
        if self._running and not self._forced:
            log.info(
                "worker %s: waiting up to %.0fs for %d running job(s)",
                self.id,
                self.config.shutdown_timeout,
                len(self._running),
            )
            deadline = time.monotonic() + self.config.shutdown_timeout
            while self._running and not self._forced and time.monotonic() < deadline:
                self._wake.clear()
                await self._wake.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        if self._running:
            log.warning(
                "worker %s: cancelling %d job(s) still running; they go back to the queue "
                "(but for sync jobs whose thread still runs: they wait for their lease to expire)",
                self.id,
                len(self._running),
            )
            self._force()
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            # A job that swallows its cancellation could hold shutdown for ever.
            _done, stuck = await asyncio.wait(tasks, timeout=JOB_CANCEL_GRACE_SECONDS)
            if stuck:
                log.error(
                    "worker %s: %d job(s) ignored cancellation for %.0fs; leaving them to "
                    "the lease rescuer",
                    self.id,
                    len(stuck),
                    JOB_CANCEL_GRACE_SECONDS,
                )

    async def _claim_loop(self, until_empty: bool) -> None:
        cfg = self.config
        queues = None if cfg.queues is None else list(cfg.queues)
        tasks = list(self._registry.tasks)
        backoff = 0.1
        waited_for_writeback = False
        while not self._state.stopping:
            free = cfg.concurrency - len(self._running)
            if self._state.held_back and self._writeback.pending and not waited_for_writeback:
                # A limit on running jobs held the last claim back, and our ended
                # jobs count as running until written back, which wakes us (once
                # a claim, so that jobs that keep ending cannot hold claims off).
                waited_for_writeback = True
                self._wake.clear()
                await self._wake.wait(cfg.poll_interval)
                continue
            if free <= 0 or len(self._writeback.outcomes) >= cfg.max_pending_outcomes:
                # Every slot busy: the first job to end wakes us (then see below).
                self._wake.clear()
                self._state.full = True
                await self._wake.wait(cfg.poll_interval)
                self._state.full = False
                continue
            if free < cfg.concurrency // 2 and self._running:
                # Most slots are busy: give running jobs a moment to end, so that
                # one claim (a round trip whatever its size) fills several slots.
                deadline = time.monotonic() + CLAIM_GATHER_SECONDS
                while free < cfg.concurrency // 2 and time.monotonic() < deadline:
                    self._wake.clear()
                    await self._wake.wait(max(0.0, deadline - time.monotonic()))
                    free = cfg.concurrency - len(self._running)
                if self._state.stopping:
                    break
            # Cleared first: a notification during the claim makes us look again.
            self._wake.clear()
            limit = min(free, cfg.batch_size)
            sent = time.monotonic()
            try:
                async with self._database.acquire("claiming jobs") as conn:
                    if (known := self._discovery) is not None and known.due(sent):
                        known.found(await self._store.queued_queues(conn), sent)
                    if known is None or known.queues:
                        result = await self._store.claim(
                            conn,
                            queues=queues if known is None else known.queues,
                            tasks=tasks,
                            limit=limit,
                            worker_id=self.id,
                            lease_seconds=cfg.lease_seconds,
                        )
                    else:
                        result = ClaimResult([])  # no queue holds a queued job
                claimed = result.jobs
            except Exception as exc:  # a lost database or a driver fault must not end the loop
                log.warning(
                    "worker %s cannot claim jobs: %s (retrying in %.1fs)", self.id, exc, backoff
                )
                await self._wake.wait(backoff)
                backoff = min(backoff * 2, cfg.poll_interval * 2)
                continue
            backoff = 0.1
            waited_for_writeback = False
            self._state.held_back = result.held_back and result.retry_in is None
            self.stats.claims += 1
            self.stats.claimed += len(claimed)
            if self._registry.hooks.observers:
                self._state.observe("claimed", time.monotonic() - sent, len(claimed))
            loop = asyncio.get_running_loop()
            for job in claimed:
                # A plain asyncio task per job, not an anyio task group child (a
                # third of the cost per job); the worker winds these down itself.
                running = self._running[job.id] = RunningJob(job, sent + cfg.lease_seconds)
                running.task = loop.create_task(self._runner.run(running))
            if len(claimed) == limit:
                continue
            if not claimed and not result.held_back and self._stray_check:
                await self._report_strays(queues, tasks)
            if result.held_back and result.retry_in is not None:
                # A rate window frees a start then (or a limit's lock was busy).
                self._add_due(time.monotonic() + result.retry_in)
            if until_empty:
                if self._running:
                    await self._wake.wait(cfg.poll_interval)
                    continue
                # Retries due now become claimable only once written back.
                await self._writeback.wait_flushed()
                if result.held_back and not claimed:
                    # Due jobs wait for a limit: look again when it may let them through.
                    await self._wake.wait(
                        min(result.retry_in or cfg.poll_interval, cfg.poll_interval)
                    )
                    continue
                if (
                    not claimed
                    and not self._writeback.outcomes
                    and not await self._more_due_now(conn_tasks=tasks, queues=queues)
                ):
                    return
                continue
            if self._scan_due:
                # Once at start and after each reconnect: learn when jobs that
                # were enqueued for later (while nobody listened) fall due.
                try:
                    async with self._database.acquire("looking for due jobs") as conn:
                        due = await self._store.seconds_until_next_due(
                            conn, queues=queues, tasks=tasks
                        )
                    self._scan_due = False
                except Exception:
                    due = None
                if due is not None:
                    self._add_due(time.monotonic() + due)
            # Sleep until a notification, the next known due time, or the
            # fallback poll, whichever comes first.
            now = time.monotonic()
            while self._due and self._due[0] <= now:
                del self._due[0]
            wait = cfg.poll_interval
            if self._due:
                wait = min(wait, self._due[0] - now + 0.001)
            self._sleep_until = now + wait
            await self._wake.wait(wait)
            self._sleep_until = 0.0

    async def _report_strays(self, queues: list[str] | None, tasks: list[str]) -> None:
        """Log, once per task, due jobs that wait for a task this worker does not have.

        Without this a job enqueued under a name no worker registers (a
        typo, a renamed function, a module started as a script) waits
        silently for ever.
        """
        now = time.monotonic()
        if now < self._stray_next:
            return
        self._stray_check = False
        self._stray_next = now + STRAY_CHECK_SECONDS
        try:
            async with self._database.acquire("looking for jobs of unknown tasks") as conn:
                strays = await self._store.stray_tasks(
                    conn, queues=queues, tasks=tasks, scan=STRAY_SCAN_ROWS
                )
        except Exception as exc:  # a courtesy: never let it stop the claim loop
            log.debug("worker %s could not look for jobs of unknown tasks: %s", self.id, exc)
            return
        for task, queue, count in strays:
            if task in self._strays_reported:
                continue
            self._strays_reported.add(task)
            guess = suggest_task(task, tasks)
            hint = f" (this worker has {guess!r}: was the job enqueued under another name?)"
            log.warning(
                "worker %s: %s%d due job(s) of task %r in queue %r wait for a worker that has "
                "this task; this one does not%s. Register the task on the App this worker "
                "runs, or start a worker that has it.",
                self.id,
                "at least " if count >= STRAY_SCAN_ROWS else "",
                count,
                task,
                queue,
                hint if guess else "",
                extra={"task": task, "queue": queue, "count": count},
            )

    async def _more_due_now(self, *, conn_tasks: list[str], queues: list[str] | None) -> bool:
        async with self._database.acquire("looking for due jobs") as conn:
            due = await self._store.seconds_until_next_due(conn, queues=queues, tasks=conn_tasks)
        return due is not None and due <= 0

    def _on_enqueued(self, payload: str) -> None:
        # "queue" (jobs due now) or "queue@epoch" (earliest job due later).
        queue, _, epoch = payload.partition("@")
        if self._queue_filter is not None and queue not in self._queue_filter:
            return
        if self._discovery is not None:
            self._discovery.heard(queue)
        if epoch:
            with suppress(ValueError):
                due = time.monotonic() + float(epoch) - time.time()
                self._add_due(due)
                # Only a sleeping claim loop that would wake too late needs
                # to hear of it; anything else finds it in _due.
                if self._sleep_until and due < self._sleep_until:
                    self._wake.set()
            return
        self._stray_check = True
        self._wake.set()

    def _on_reconnect(self) -> None:
        self._scan_due = True
        if self._discovery is not None:
            self._discovery.forget()
        self._wake.set()

    def _add_due(self, when: float) -> None:
        bisect.insort(self._due, when)
        # Only the nearest times matter; the fallback poll covers the rest.
        del self._due[MAX_KNOWN_DUE_TIMES:]

    def _on_cancel_request(self, payload: str) -> None:
        try:
            job_id = int(payload)
        except ValueError:
            return
        running = self._running.get(job_id)
        if running is not None and running.stop_reason is None:
            log.info("job %s: cancel requested", job_id)
            running.stop("cancel")

    # -- one chosen job, inline (taskq.testing.run_job) ------------------------------

    async def run_one(self, job_id: int) -> OutcomeKind | None:
        """Claim the queued job ``job_id`` now, run it like a claimed job, write it back.

        For tests (``taskq.testing.run_job``): no claim loop, no services. The
        claim takes a lease like any other (attempts + 1, a new token) but
        ignores the job's due time, queue pauses and limits. The run is the
        one every job gets (hooks, middleware, timeout, retry policy, result
        encoding); the lease is renewed while it runs, and the outcome is
        written back before this returns.

        Returns:
            how the attempt ended, or ``None`` when the job could not be
            claimed (no such job, not queued, or its task is not registered on
            this App): then nothing ran.

        Raises:
            DatabaseError: the claim or the write-back failed.
        """
        cfg = self.config
        sent = time.monotonic()
        async with self._database.acquire("claiming a job") as conn:
            job = await self._store.claim_job(
                conn,
                job_id,
                tasks=list(self._registry.tasks),
                worker_id=self.id,
                lease_seconds=cfg.lease_seconds,
            )
        if job is None:
            return None
        self.stats.claims += 1
        self.stats.claimed += 1
        loop = asyncio.get_running_loop()
        running = self._running[job.id] = RunningJob(job, sent + cfg.lease_seconds)
        running.task = loop.create_task(self._runner.run(running))
        keeper = loop.create_task(self._leases.run_renewals())
        try:
            # Shielded: the job's task swallows its own cancellation (it
            # records a release), which would swallow the caller's too.
            await asyncio.shield(running.task)
        except BaseException:
            # The caller is cancelled: stop the job as a shutdown would (back
            # to the queue, attempt given back) and write that back.
            running.stop("release")
            with anyio.CancelScope(shield=True):
                await asyncio.wait({running.task}, timeout=JOB_CANCEL_GRACE_SECONDS)
                with anyio.move_on_after(FLUSH_TIMEOUT_SECONDS):
                    await self._writeback.flush_all()
            raise
        finally:
            keeper.cancel()
            with anyio.CancelScope(shield=True):
                await self._runner.close_processes()
        if running.stop_reason == "committed":
            return "succeeded"  # its ctx.transaction() recorded it, nothing to write back
        outcome = next((o for o in self._writeback.outcomes if o.job_id == job.id), None)
        lost = self.stats.lost
        while self._writeback.outcomes:
            await self._writeback.flush_batch()
        if outcome is None or self.stats.lost > lost:
            return "lost"  # another worker owns the job now; nothing was written
        return OUTCOME_NAMES[outcome.kind]
