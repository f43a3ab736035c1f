"""The worker: claims jobs, runs each in its own task, writes outcomes back in batches.

One worker per process is the usual shape, but several may share an App. The
life of a job inside a worker::

    claim (one statement, up to the free slots, FOR UPDATE SKIP LOCKED, lease)
      -> run in its own task (timeout, user cancel, shutdown cancel it alone)
      -> outcome buffered -> written back with others in one statement
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import secrets
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import TaskStatus

from ._database import Database
from ._errors import ConfigurationError, DatabaseError, DecodeError, SerializationError
from ._hooks import JobContext, JobOutcome, OutcomeKind
from ._names import check_queue, suggest_task
from ._registry import Registry
from ._scheduler import Scheduler
from ._serialization import decode, encode
from ._store import ClaimedJob, Outcome, Store

if TYPE_CHECKING:
    from ._task import Task

log = logging.getLogger("taskq.worker")


class WorkerHost(Protocol):
    """What a worker needs from the App it runs: its parts and two settings."""

    @property
    def database(self) -> Database: ...

    @property
    def store(self) -> Store: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def max_payload_bytes(self) -> int: ...

    @property
    def history_retention(self) -> timedelta: ...


#: Jobs run at once by one worker: its back pressure. Jobs beyond it stay in Postgres.
DEFAULT_CONCURRENCY = 10
#: Fallback poll when no notification arrives (LISTEN is the normal wake-up;
#: this bounds the delay when a notification is lost, e.g. behind PgBouncer).
DEFAULT_POLL_INTERVAL = 2.0
#: A claimed job's lease; renewed every third of it while the job runs. After it
#: expires without renewal (the worker died or was cut off) the job is rescued.
DEFAULT_LEASE_SECONDS = 30.0
#: On shutdown, running jobs get this long to finish before they are cancelled
#: and returned to the queue (without using up an attempt).
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
#: Most jobs claimed, or outcomes written back, in one statement.
DEFAULT_BATCH_SIZE = 500
#: Outcomes waiting to be written back before the worker stops claiming: while
#: Postgres is unreachable, finished work piles up in memory only this far.
DEFAULT_MAX_PENDING_OUTCOMES = 5000
#: When most slots are busy, wait up to this long for more to free up before
#: claiming, so that claims come in batches rather than one job at a time.
CLAIM_GATHER_SECONDS = 0.002
#: Each prune round deletes old history in batches of PRUNE_BATCH rows for up
#: to this long (then it goes on at the next round): enough to keep up with
#: tens of thousands of finished jobs a second.
PRUNE_BUDGET_SECONDS = 5.0
PRUNE_BATCH = 5000
#: Future due times a worker remembers (from notifications) to wake up for.
MAX_KNOWN_DUE_TIMES = 256
#: How long cancelled jobs get to unwind (finally-blocks) at shutdown.
JOB_CANCEL_GRACE_SECONDS = 10.0
#: How long finished outcomes wait for a claim to carry them before they are
#: written back on their own.
FLUSH_DELAY_SECONDS = 0.005
#: Longest a single write-back may take before it is abandoned and retried.
FLUSH_TIMEOUT_SECONDS = 30.0
#: How often history is pruned. Expired leases are looked for every half
#: lease (15 s by default), so a crashed worker's jobs run again within about
#: 1.5 leases (45 s).
DEFAULT_PRUNE_INTERVAL = 60.0
#: A job whose worker stops renewing its lease this many times (it crashes
#: the worker, or is killed with it, every time) is failed as poison.
DEFAULT_MAX_RESCUES = 3
#: A worker that could not renew a job's lease for this share of the lease
#: cancels the job itself, before the lease runs out and another worker may
#: start it.
LEASE_GIVE_UP_FRACTION = 0.75
#: Longest traceback kept with a failed attempt, in characters.
MAX_TRACEBACK_CHARS = 16_000
#: A worker that claims nothing although due jobs were announced looks, at most
#: this often, for due jobs of tasks it does not have, and logs each such task
#: once (a job enqueued under a name no worker registers waits for ever).
STRAY_CHECK_SECONDS = 60.0
#: Rows that look reads at most, so that a huge backlog costs a bounded scan.
STRAY_SCAN_ROWS = 10_000


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one worker; each default is the named constant beside it.

    Attributes:
        concurrency: jobs run at once; the worker's back pressure (10).
        queues: queues served; ``None`` serves all of them.
        poll_interval: seconds between fallback polls when no notification comes (2).
        lease_seconds: a claimed job's lease, renewed every third of it (30).
        shutdown_timeout: seconds running jobs get on shutdown before they are
            cancelled and returned to the queue (30).
        batch_size: most jobs claimed, or outcomes written back, per statement (500).
        max_pending_outcomes: outcomes buffered while Postgres is unreachable
            before the worker stops claiming (5000).
        rescue_interval: seconds between looks for expired leases (half the lease).
        max_rescues: rescues after which a job is failed as poison (3).
        prune_interval: seconds between history prunes (60).
        cron: run the cron scheduler in this worker (True; ``drain()`` never does).
    """

    concurrency: int = DEFAULT_CONCURRENCY
    queues: tuple[str, ...] | None = None
    poll_interval: float = DEFAULT_POLL_INTERVAL
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    batch_size: int = DEFAULT_BATCH_SIZE
    max_pending_outcomes: int = DEFAULT_MAX_PENDING_OUTCOMES
    rescue_interval: float = 0.0  # 0: half the lease
    max_rescues: int = DEFAULT_MAX_RESCUES

    def __post_init__(self) -> None:
        lease = self.lease_seconds
        if not self.rescue_interval and isinstance(lease, int | float) and lease > 0:
            object.__setattr__(self, "rescue_interval", lease / 2)

    prune_interval: float = DEFAULT_PRUNE_INTERVAL
    cron: bool = True

    @classmethod
    def make(cls, *, queues: Any = None, **settings: Any) -> WorkerConfig:
        """Validate settings and build a config; unknown or bad values raise ConfigurationError."""
        unknown = set(settings) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigurationError(
                f"unknown worker setting(s) {sorted(unknown)}; known: "
                f"{sorted(cls.__dataclass_fields__)}"
            )
        if isinstance(queues, str):
            raise ConfigurationError(f"queues must be a list of names, e.g. [{queues!r}]")
        qs = None if queues is None else tuple(check_queue(q) for q in queues)
        if qs is not None and not qs:
            raise ConfigurationError("queues must not be empty (None means: all queues)")
        config = cls(queues=qs, **settings)
        for name in ("concurrency", "batch_size", "max_pending_outcomes", "max_rescues"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{name} must be a positive int, got {value!r}")
        for name in ("poll_interval", "lease_seconds", "rescue_interval", "prune_interval"):
            value = getattr(config, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ConfigurationError(f"{name} must be a positive number of seconds")
        if not isinstance(config.cron, bool):
            raise ConfigurationError(f"cron must be True or False, got {config.cron!r}")
        if not config.shutdown_timeout >= 0:
            raise ConfigurationError("shutdown_timeout must be >= 0 seconds")
        return config


@dataclass
class WorkerStats:
    """What a worker did: counts of outcomes it recorded."""

    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    released: int = 0
    lost: int = 0
    #: Claim statements run, and write-back statements run: with batching both
    #: stay far below the number of jobs under load.
    claims: int = 0
    writebacks: int = 0

    @property
    def processed(self) -> int:
        """Jobs whose attempt ended (succeeded, failed, retried or cancelled)."""
        return self.succeeded + self.failed + self.retried + self.cancelled


class _Flag:
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
class _Running:
    job: ClaimedJob
    # Monotonic time by which the lease in Postgres surely expires unless
    # renewed (measured from before the claim or renewal was sent).
    lease_deadline: float
    task: asyncio.Task[None] | None = None
    # Why we cancelled it, if we did: "release" (shutdown), "cancel" (the user
    # asked), "lost" (our lease was taken over).
    stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.task is not None:
            self.task.cancel()


def _text(value: str) -> str:
    # An error message may hold what JSON in Postgres cannot: NUL characters
    # and lone surrogates. Escape them rather than lose the whole error.
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _error_dict(exc: BaseException) -> dict[str, str]:
    tb = "".join(traceback.format_exception(exc))
    if len(tb) > MAX_TRACEBACK_CHARS:
        tb = "...(truncated)...\n" + tb[-MAX_TRACEBACK_CHARS:]
    name = _error_type(type(exc))
    try:
        message = str(exc)
    except Exception as str_error:  # a broken __str__ must not take the worker down
        message = f"<str() of the exception failed: {str_error!r}>"
    return {
        "type": _text(name),
        "message": _text(message)[:MAX_TRACEBACK_CHARS],
        "traceback": _text(tb),
    }


def _error_type(cls: type[BaseException]) -> str:
    """The name stored as an error's type: ``builtins`` bare, taskq's by their public name."""
    if cls.__module__ == "builtins":
        return cls.__qualname__
    if cls.__module__.startswith("taskq._"):
        # A private class (e.g. the embedded server's error): name the public
        # taskq class it is a kind of, as users can catch that one.
        public = next((c for c in cls.__mro__ if c.__module__ == "taskq"), None)
        if public is not None:
            return f"taskq.{public.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


class Worker:
    """Claims and runs jobs of one App. Made by ``App.run_worker/worker/drain``."""

    def __init__(self, app: WorkerHost, config: WorkerConfig) -> None:
        self._database = app.database
        self._store = app.store
        self._registry = app.registry
        self._max_payload_bytes = app.max_payload_bytes
        self._history_retention = app.history_retention
        self.config = config
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.stats = WorkerStats()
        self._running: dict[int, _Running] = {}
        self._outcomes: list[Outcome] = []
        self._wake = _Flag()
        self._outcomes_ready = _Flag()
        self._flushed = _Flag()
        self._flushed.set()
        # Outcomes taken from the buffer by a write that has not returned yet.
        self._writing: dict[int, Outcome] = {}  # by job id
        self._stopping = False
        self._stopped = anyio.Event()
        self._forced = False
        self._threads = anyio.CapacityLimiter(config.concurrency)
        # The claim loop wants a batch: half the slots free (see _claim_loop).
        self._wake_at_running = config.concurrency - max(1, config.concurrency // 2)
        self._full = False  # the claim loop waits for a slot to free up
        self._sleep_until = 0.0  # monotonic end of the claim loop's idle sleep, 0 if awake
        self._queue_filter = None if config.queues is None else set(config.queues)
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
        self._stopping = True
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
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self._stopping:
                    log.warning(
                        "%s received: stopping (running jobs get %.0fs to finish; "
                        "send it again to stop now)",
                        name,
                        self.config.shutdown_timeout,
                    )
                    self._stopping = True
                    self._wake.set()
                else:
                    log.warning("%s received again: cancelling running jobs", name)
                    self._force()
                    self._wake.set()

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
                services.start_soon(self._flush_loop)
                services.start_soon(self._maintenance_loop)
                services.start_soon(self._lease_watchdog)
                services.start_soon(self._prune_loop)
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
                    self._stopping = True
                    with anyio.CancelScope(shield=True):
                        await self._wind_down()
                    services.cancel_scope.cancel()
        finally:
            for undo in unsubscribe:
                undo()
            # Write back what the last jobs produced (released jobs included),
            # even when the worker itself is being cancelled.
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self._flush_all()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    async with self._database.acquire("unregistering a worker") as conn:
                        await store.unregister_worker(conn, self.id)
                except Exception as exc:  # a lost database or a driver fault must not end the loop
                    log.warning("could not unregister worker %s: %s", self.id, exc)
            if self._outcomes:
                log.warning(
                    "worker %s stopped with %d outcome(s) not written back; those jobs "
                    "will be rescued when their leases expire",
                    self.id,
                    len(self._outcomes),
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
        async with self._database.acquire("registering a worker") as conn:
            await self._store.register_worker(
                conn,
                worker_id=self.id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                queues=None if self.config.queues is None else list(self.config.queues),
                tasks=tasks,
                concurrency=self.config.concurrency,
            )
        log.info(
            "worker %s started: concurrency %d, queues %s, %d task(s)",
            self.id,
            self.config.concurrency,
            "all" if self.config.queues is None else ",".join(self.config.queues),
            len(tasks),
        )

    async def _wind_down(self) -> None:
        """After claiming stopped: give running jobs the grace period, then release them."""
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
                "worker %s: cancelling %d job(s) still running; they go back to the queue",
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
        while not self._stopping:
            free = cfg.concurrency - len(self._running)
            if free <= 0 or len(self._outcomes) >= cfg.max_pending_outcomes:
                # Every slot busy: the first job to finish wakes us (then we
                # gather a moment for more, see below).
                self._wake.clear()
                self._full = True
                await self._wake.wait(cfg.poll_interval)
                self._full = False
                continue
            if free < cfg.concurrency // 2 and self._running:
                # Most slots are busy: give running jobs a moment to finish so
                # that one claim fills several slots instead of one (a claim
                # costs a round trip whatever its size).
                deadline = time.monotonic() + CLAIM_GATHER_SECONDS
                while free < cfg.concurrency // 2 and time.monotonic() < deadline:
                    self._wake.clear()
                    await self._wake.wait(max(0.0, deadline - time.monotonic()))
                    free = cfg.concurrency - len(self._running)
                if self._stopping:
                    break
            # Clear before claiming: a notification that lands while the claim
            # runs sets the flag again and we look once more instead of sleeping.
            self._wake.clear()
            limit = min(free, cfg.batch_size)
            sent = time.monotonic()
            carried = self._take_outcomes()
            lost: list[int] | None = None
            try:
                async with self._database.acquire("claiming jobs") as conn:
                    result = await self._store.claim(
                        conn,
                        queues=queues,
                        tasks=tasks,
                        limit=limit,
                        worker_id=self.id,
                        lease_seconds=cfg.lease_seconds,
                        outcomes=carried,
                    )
                claimed, lost = result.jobs, result.lost
            except Exception as exc:  # a lost database or a driver fault must not end the loop
                log.warning(
                    "worker %s cannot claim jobs: %s (retrying in %.1fs)", self.id, exc, backoff
                )
                await self._wake.wait(backoff)
                backoff = min(backoff * 2, cfg.poll_interval * 2)
                continue
            finally:
                if carried:
                    if lost is None:
                        self._outcomes_not_written(carried)
                    else:
                        self._outcomes_written(carried, lost)
            backoff = 0.1
            self.stats.claims += 1
            self.stats.claimed += len(claimed)
            if self._registry.hooks.observers:
                self._observe("claimed", time.monotonic() - sent, len(claimed))
            loop = asyncio.get_running_loop()
            for job in claimed:
                # One plain asyncio task per job (not an anyio task group child):
                # spawning and cancelling are a third of the cost per job, and the
                # worker tracks and winds down these tasks itself.
                running = self._running[job.id] = _Running(job, sent + cfg.lease_seconds)
                running.task = loop.create_task(self._run_job(running))
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
                await self._wait_flushed()
                if result.held_back and not claimed:
                    # Due jobs wait for a limit: look again when it may let them through.
                    await self._wake.wait(
                        min(result.retry_in or cfg.poll_interval, cfg.poll_interval)
                    )
                    continue
                if (
                    not claimed
                    and not self._outcomes
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

    # -- running one job -----------------------------------------------------------

    async def _run_job(self, running: _Running) -> None:
        job = running.job
        task = self._registry.tasks.get(job.task)
        hooks = self._registry.hooks
        started = time.monotonic()
        outcome: Outcome | None = None
        ctx: JobContext | None = None
        value: Any = None
        raised: BaseException | None = None
        try:
            if task is None:  # cannot happen: the claim only takes known tasks
                raise LookupError(f"no task named {job.task!r} in this worker")
            if hooks.around_jobs:
                stored = decode(job.args)
                ctx = JobContext(
                    id=job.id,
                    task=job.task,
                    queue=job.queue,
                    attempt=job.attempts,
                    max_attempts=job.max_attempts,
                    priority=job.priority,
                    args=stored,
                    meta=decode(job.meta) if job.meta else {},
                    worker_id=self.id,
                )
                encoded: list[Any] = []

                async def call() -> Any:
                    # Encode inside the chain, so that a result that is not
                    # JSON fails the attempt where middleware (a tracing
                    # span) sees it.
                    inner = await self._call(task, job, stored)
                    encoded[:] = [inner, self._encode_result(task, inner)]
                    return inner

                value = await hooks.run_job(ctx, call)
                if encoded and encoded[0] is value:
                    result = encoded[1]
                else:  # middleware replaced the value
                    result = self._encode_result(task, value)
            else:
                value = await self._call(task, job)
                result = self._encode_result(task, value)
            outcome = Outcome(job.id, job.token, "succeeded", result=result)
        except asyncio.CancelledError:
            # Only the worker cancels job tasks; the reason says what it meant.
            running.stop_reason = running.stop_reason or "release"
        except Exception as exc:
            raised = exc
            if running.stop_reason is None:
                outcome = self._failure(job, task, exc)
        except BaseException:
            # SystemExit / KeyboardInterrupt raised by the task: the process is
            # going down, the job did not fail.
            running.stop_reason = running.stop_reason or "release"
            raise
        finally:
            if outcome is None:
                outcome = self._stopped_outcome(job, running.stop_reason)
            duration = time.monotonic() - started
            if ctx is not None:
                # Before the slot is freed: a hook's work counts against the
                # worker's concurrency like the job's own.
                await self._after_hooks(ctx, outcome, duration, value, raised)
            del self._running[job.id]
            if outcome is not None:
                self._record(job, outcome, duration)
            else:
                self.stats.lost += 1
            # Wake the claim loop when it waits for a free slot, or once
            # enough slots are free for a worthwhile claim; not on every job.
            if self._full or len(self._running) <= self._wake_at_running or self._stopping:
                self._wake.set()

    def _encode_result(self, task: Task[Any, Any], value: Any) -> str | None:
        if value is None:
            return None
        return encode(
            task.codec.encode_result(value),
            what=f"result of task {task.name!r}",
            max_bytes=self._max_payload_bytes,
        )

    def _uncount(self, kind: str) -> None:
        # WorkerStats counts each outcome under its public name.
        field = OUTCOME_NAMES[kind]
        setattr(self.stats, field, getattr(self.stats, field) - 1)

    def _stopped_outcome(self, job: ClaimedJob, reason: str | None) -> Outcome | None:
        if reason == "cancel":
            err = {
                "type": "taskq.JobCancelled",
                "message": "cancelled while running",
                "traceback": "",
            }
            return Outcome(job.id, job.token, "cancelled", error=_dumps(err))
        if reason == "lost":
            return None  # another worker owns the job now: write nothing
        return Outcome(job.id, job.token, "release")

    def _observe(self, event: str, *args: Any) -> None:
        # Instrumentation must never disturb the worker: a claim whose jobs
        # were not started because a metric failed would leave them stuck.
        for observer in self._registry.hooks.observers:
            try:
                getattr(observer, event)(*args)
            except Exception:
                log.exception("worker observer %r failed on %s", observer, event)

    async def _after_hooks(
        self,
        ctx: JobContext,
        outcome: Outcome | None,
        duration: float,
        value: Any,
        raised: BaseException | None,
    ) -> None:
        # No outcome: the lease was lost and another worker owns the job now.
        kind = "lost" if outcome is None else OUTCOME_NAMES[outcome.kind]
        info = JobOutcome(
            kind=kind,
            duration=duration,
            result=value if kind == "succeeded" else None,
            error=decode(outcome.error) if outcome is not None and outcome.error else None,
            exception=raised,
            retry_in=outcome.delay if outcome is not None and kind == "retried" else None,
        )
        try:
            await self._registry.hooks.after_job(ctx, info)
        except asyncio.CancelledError:
            # Shutdown forced while hooks ran: the outcome is still written
            # back (the caller records it next), and the task ends anyway.
            log.warning("job %s: after-job hooks interrupted by shutdown", ctx.id)

    async def _call(
        self, task: Task[Any, Any], job: ClaimedJob, stored: dict[str, Any] | None = None
    ) -> Any:
        args, kwargs = task.call_arguments(decode(job.args) if stored is None else stored)
        timeout = asyncio.timeout(task.timeout) if task.timeout else nullcontext()
        async with timeout:
            if task.is_async:
                return await task.fn(*args, **kwargs)
            # A sync function runs in a thread, bounded by the same concurrency.
            # A thread cannot be interrupted: on timeout or cancel the job ends
            # here and the thread finishes in the background.
            return await anyio.to_thread.run_sync(
                lambda: task.fn(*args, **kwargs), limiter=self._threads, abandon_on_cancel=True
            )

    def _failure(self, job: ClaimedJob, task: Task[Any, Any] | None, exc: Exception) -> Outcome:
        error = _dumps(_error_dict(exc))
        # A result that is not JSON fails the same way every time; a stored
        # argument that does not decode may decode on a worker running other
        # code (a deploy under way), so that one follows the retry policy.
        retryable = task is not None and (
            not isinstance(exc, SerializationError) or isinstance(exc, DecodeError)
        )
        # The attempt budget is the job's own (set at enqueue); when and on
        # what to retry comes from the task's policy.
        if (
            retryable
            and task is not None
            and task.retry.should_retry(exc, job.attempts, max_attempts=job.max_attempts)
        ):
            delay = task.retry.delay(exc, job.attempts)
            return Outcome(job.id, job.token, "retry", error=error, delay=delay)
        return Outcome(job.id, job.token, "failed", error=error)

    def _record(self, job: ClaimedJob, outcome: Outcome, duration: float) -> None:
        kind = outcome.kind
        extra = {
            "job_id": job.id,
            "task": job.task,
            "queue": job.queue,
            "attempt": job.attempts,
            "duration": duration,
            "outcome": OUTCOME_NAMES[kind],
            "worker_id": self.id,
        }
        if kind == "succeeded":
            self.stats.succeeded += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("job %s %s succeeded in %.3fs", job.id, job.task, duration, extra=extra)
        elif kind == "retry":
            self.stats.retried += 1
            log.info(
                "job %s %s failed (attempt %d), retrying in %.1fs: %s",
                job.id,
                job.task,
                job.attempts,
                outcome.delay,
                _summary(outcome),
                extra=extra,
            )
        elif kind == "failed":
            self.stats.failed += 1
            log.error(
                "job %s %s failed for good after %d attempt(s): %s",
                job.id,
                job.task,
                job.attempts,
                _summary(outcome),
                extra=extra,
            )
        elif kind == "cancelled":
            self.stats.cancelled += 1
            log.info("job %s %s cancelled", job.id, job.task, extra=extra)
        else:
            self.stats.released += 1
            log.info("job %s %s interrupted; back to the queue", job.id, job.task, extra=extra)
        self._outcomes.append(outcome)
        self._flushed.clear()
        self._outcomes_ready.set()

    # -- write-back and upkeep -------------------------------------------------------

    async def _wait_flushed(self) -> None:
        while self._outcomes or self._writing:
            self._outcomes_ready.set()
            await self._flushed.wait(1.0)

    def _take_outcomes(self) -> list[Outcome]:
        """Move the oldest buffered outcomes (up to a batch) to the in-flight list."""
        batch = self._outcomes[: self.config.batch_size]
        del self._outcomes[: len(batch)]
        self._writing.update((o.job_id, o) for o in batch)
        return batch

    def _outcomes_written(self, batch: list[Outcome], lost: list[int]) -> None:
        for outcome in batch:
            self._writing.pop(outcome.job_id, None)
        self.stats.writebacks += 1
        if lost:
            # Counted when recorded; another worker owns these jobs now.
            gone = set(lost)
            for outcome in batch:
                if outcome.job_id in gone:
                    self._uncount(outcome.kind)
                    self.stats.lost += 1
        if not self._outcomes and not self._writing:
            self._flushed.set()
        if any(o.kind == "retry" for o in batch):
            self._wake.set()  # a retry may be due soon: recompute when to wake
        if lost:
            log.warning(
                "worker %s: lease lost for job(s) %s before their outcome was written; "
                "another worker owns them now, outcome dropped",
                self.id,
                lost,
            )

    def _outcomes_not_written(self, batch: list[Outcome]) -> None:
        # Back to the front of the buffer, to be sent again: the lease token
        # makes a repeat of a write that did commit change nothing.
        for outcome in batch:
            self._writing.pop(outcome.job_id, None)
        self._outcomes[:0] = batch

    async def _flush_loop(self) -> None:
        backoff = 0.05
        while True:
            await self._outcomes_ready.wait()
            self._outcomes_ready.clear()
            if not self._stopping:
                # Outcomes normally ride along with the next claim (one round
                # trip for both); this loop writes what no claim picked up.
                await anyio.sleep(FLUSH_DELAY_SECONDS)
            while self._outcomes:
                try:
                    await self._flush_batch()
                except Exception as exc:  # a lost database or a driver fault must not end the loop
                    log.warning(
                        "worker %s cannot write back %d outcome(s): %s",
                        self.id,
                        len(self._outcomes),
                        exc,
                    )
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05

    async def _flush_all(self) -> None:
        """Write back every buffered outcome now, retrying until cancelled."""
        backoff = 0.05
        while self._outcomes:
            try:
                await self._flush_batch()
            except Exception as exc:  # a lost database or a driver fault must not end the loop
                log.warning("worker %s cannot write back outcomes: %s", self.id, exc)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def _flush_batch(self) -> None:
        # Shielded: a write-back cancelled half-way (at shutdown) would commit
        # without the buffer knowing, then be sent again and look like a lost
        # lease. Bounded, so a hung database cannot hold shutdown for ever.
        batch = self._take_outcomes()
        if not batch:
            return
        lost: list[int] | None = None
        try:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(FLUSH_TIMEOUT_SECONDS) as scope,
            ):
                async with self._database.acquire("writing back job outcomes") as conn:
                    lost = await self._store.finish(conn, batch)
        finally:
            if lost is None:
                self._outcomes_not_written(batch)
            else:
                self._outcomes_written(batch, lost)
        if scope.cancelled_caught:
            raise DatabaseError(f"writing back outcomes took over {FLUSH_TIMEOUT_SECONDS:.0f}s")

    async def _maintenance_loop(self) -> None:
        """Heartbeat: renew leases, pick up missed cancels, rescue."""
        cfg = self.config
        interval = min(cfg.lease_seconds / 3, cfg.rescue_interval)
        last_rescue = time.monotonic()
        while True:
            await anyio.sleep(interval)
            # Bounded: a database that hangs must not stop the next heartbeat
            # from trying again (the lease watchdog acts if none gets through).
            with anyio.move_on_after(max(interval, 1.0)):
                try:
                    await self._renew()
                    now = time.monotonic()
                    if now - last_rescue >= cfg.rescue_interval:
                        last_rescue = now
                        await self._rescue()
                except Exception as exc:  # a lost database or a driver fault must not end the loop
                    log.warning("worker %s upkeep failed: %s", self.id, exc)

    async def _prune_loop(self) -> None:
        """Delete history past its retention, in its own loop so it never delays renewals."""
        cfg = self.config
        while True:
            await anyio.sleep(cfg.prune_interval)
            deadline = time.monotonic() + PRUNE_BUDGET_SECONDS
            try:
                while time.monotonic() < deadline:
                    async with self._database.acquire("pruning history") as conn:
                        deleted = await self._store.prune_history(
                            conn,
                            self._history_retention.total_seconds(),
                            batch=PRUNE_BATCH,
                            max_batches=1,
                        )
                    if deleted < PRUNE_BATCH:
                        break  # caught up
            except Exception as exc:  # a lost database or a driver fault must not end the loop
                log.warning("worker %s could not prune history: %s", self.id, exc)

    async def _renew(self) -> None:
        cfg = self.config
        sent = time.monotonic()
        async with self._database.acquire("renewing leases") as conn:
            await self._store.heartbeat(conn, self.id)
            held = [(r.job.id, r.job.token) for r in self._running.values()]
            held += [(o.job_id, o.token) for o in (*self._outcomes, *self._writing.values())]
            if not held:
                return
            renewed = await self._store.renew_leases(conn, held, cfg.lease_seconds)
        for job_id, _ in held:
            running = self._running.get(job_id)
            if running is None or running.stop_reason is not None:
                continue
            if job_id not in renewed:
                log.warning("job %s: this worker lost its lease; cancelling it here", job_id)
                running.stop("lost")
                continue
            running.lease_deadline = sent + cfg.lease_seconds
            if renewed[job_id]:  # a cancel whose notification we missed
                log.info("job %s: cancel requested", job_id)
                running.stop("cancel")

    async def _rescue(self) -> None:
        cfg = self.config
        async with self._database.acquire("rescuing jobs") as conn:
            rescued, ended = await self._store.rescue_expired(conn, cfg.max_rescues)
            await self._store.forget_dead_workers(conn, cfg.lease_seconds * 10)
        if rescued or ended:
            self._observe("rescued", len(rescued), len(ended))
        if rescued:
            log.warning(
                "re-queued %d job(s) whose worker stopped renewing their lease: %s",
                len(rescued),
                rescued[:20],
            )
            self._wake.set()
        if ended:
            log.error(
                "ended %d job(s) whose lease expired and that may not run again "
                "(no attempts left, poison, or being cancelled): %s",
                len(ended),
                ended[:20],
            )

    async def _lease_watchdog(self) -> None:
        """Cancel our own jobs when their leases could not be renewed for most of their time.

        A worker cut off from Postgres keeps running its jobs while, after the
        lease expires, another worker may start them again. Giving up a little
        before expiry keeps the two runs from overlapping.
        """
        cfg = self.config
        margin = cfg.lease_seconds * (1 - LEASE_GIVE_UP_FRACTION)
        while True:
            await anyio.sleep(max(cfg.lease_seconds / 20, 0.02))
            now = time.monotonic()
            doomed = [
                r
                for r in self._running.values()
                if r.stop_reason is None and r.lease_deadline - now < margin
            ]
            if doomed:
                log.warning(
                    "worker %s could not renew its leases for %.1fs; cancelling %d job(s) "
                    "before another worker takes them over: %s",
                    self.id,
                    cfg.lease_seconds - (min(r.lease_deadline for r in doomed) - now),
                    len(doomed),
                    [r.job.id for r in doomed[:20]],
                )
                for running in doomed:
                    running.stop("lost")

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
        running = self._running[job.id] = _Running(job, sent + cfg.lease_seconds)
        running.task = loop.create_task(self._run_job(running))
        keeper = loop.create_task(self._renew_while_running())
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
                    await self._flush_all()
            raise
        finally:
            keeper.cancel()
        outcome = next((o for o in self._outcomes if o.job_id == job.id), None)
        lost = self.stats.lost
        while self._outcomes:
            await self._flush_batch()
        if outcome is None or self.stats.lost > lost:
            return "lost"  # another worker owns the job now; nothing was written
        return OUTCOME_NAMES[outcome.kind]

    async def _renew_while_running(self) -> None:
        """Renew the leases of running jobs every third of a lease (for ``run_one``)."""
        while True:
            await anyio.sleep(self.config.lease_seconds / 3)
            try:
                await self._renew()
            except Exception as exc:  # the next round tries again; the watchdog is not running
                log.warning("worker %s could not renew its leases: %s", self.id, exc)


#: Outcome kinds as written back (see Outcome) -> as hooks, logs and metrics name them.
OUTCOME_NAMES: dict[str, OutcomeKind] = {
    "succeeded": "succeeded",
    "retry": "retried",
    "failed": "failed",
    "cancelled": "cancelled",
    "release": "released",
}


def _dumps(value: Any) -> str:
    return encode(value, what="error", max_bytes=1 << 30)


def _summary(outcome: Outcome) -> str:
    err = decode(outcome.error) if outcome.error else {}
    return f"{err.get('type')}: {err.get('message')}"
