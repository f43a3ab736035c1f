"""Running one claimed job: hooks and middleware, timeout, arguments, result, the retry decision."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import traceback
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from .._database import Database
from .._errors import DecodeError, SerializationError
from .._hooks import JobContext, JobOutcome
from .._inputs import fill_inputs
from .._registry import Registry
from .._serialization import decode, encode
from .._store import ClaimedJob, Outcome, Store
from .attempt import AttemptControl
from .config import WorkerConfig
from .processes import ProcessPool, default_pool_size, target
from .state import OUTCOME_NAMES, RunningJob, WorkerState
from .threads import SyncThreads, ThreadCall
from .writeback import WriteBack

if TYPE_CHECKING:
    from .._task import Task

log = logging.getLogger("taskq.worker")

#: Longest traceback kept with a failed attempt, in characters.
MAX_TRACEBACK_CHARS = 16_000


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


class JobRunner:
    """Runs claimed jobs, each in its own asyncio task, and records how each attempt ended."""

    def __init__(
        self,
        registry: Registry,
        config: WorkerConfig,
        state: WorkerState,
        writeback: WriteBack,
        max_payload_bytes: int,
        database: Database,
        store: Store,
    ) -> None:
        self._registry = registry
        self._state = state
        self._writeback = writeback
        self._max_payload_bytes = max_payload_bytes
        self._database = database
        self._store = store
        #: Where sync tasks run: daemon threads, at most ``concurrency`` at once.
        self.threads = SyncThreads(config.concurrency)
        self._config = config
        self._processes: ProcessPool | None = None  # made by the first process task
        # The claim loop wants a batch: half the slots free (see Worker._claim_loop).
        self._wake_at_running = config.concurrency - max(1, config.concurrency // 2)

    async def run(self, running: RunningJob) -> None:
        """Run one claimed job to its outcome, then free its slot and record the outcome."""
        job = running.job
        task = self._registry.tasks.get(job.task)
        hooks = self._registry.hooks
        state = self._state
        started = time.monotonic()
        outcome: Outcome | None = None
        ctx: JobContext | None = None
        control: AttemptControl | None = None
        calls: list[ThreadCall] = []  # the sync function's call, once it started
        value: Any = None
        raised: BaseException | None = None
        try:
            if task is None:  # cannot happen: the claim only takes known tasks
                raise LookupError(f"no task named {job.task!r} in this worker")
            if hooks.around_jobs or task.context_parameter is not None:
                # One context for hooks, middleware and the task itself.
                stored = stored_arguments(job)
                control = AttemptControl(
                    self._database, self._store, running, self._max_payload_bytes
                )
                ctx = JobContext(
                    id=job.id,
                    task=job.task,
                    queue=job.queue,
                    attempt=job.attempts,
                    max_attempts=job.max_attempts,
                    priority=job.priority,
                    args=stored,
                    meta=decode(job.meta) if job.meta else {},
                    worker_id=state.worker_id,
                    control=control,
                )
                encoded: list[Any] = []

                async def call() -> Any:
                    # Encode inside the chain, so that a result that is not
                    # JSON fails the attempt where middleware (a tracing
                    # span) sees it.
                    inner = await self._call(task, job, stored, ctx, control, calls)
                    encoded[:] = [inner, self._encode_result(task, inner)]
                    return inner

                value = await hooks.run_job(ctx, call)
                if encoded and encoded[0] is value:
                    result = encoded[1]
                else:  # middleware replaced the value
                    result = self._encode_result(task, value)
            else:
                value = await self._call(task, job, None, None, None, calls)
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
            # ctx.transaction() committed: the job is succeeded already, and
            # nothing else is written for it but its result.
            committed = running.stop_reason == "committed"
            if committed:
                if outcome is None:
                    _log_after_commit(job, raised)
                    outcome = Outcome(job.id, job.token, "succeeded")
            elif outcome is None:
                outcome = self._stopped_outcome(job, running, calls)
            if control is not None:
                if committed and outcome is not None:
                    await control.write_result(outcome.result)
                elif outcome is not None and control.progress_unwritten:
                    await control.flush_progress()
                control.close()
            duration = time.monotonic() - started
            if ctx is not None:
                # Before the slot is freed: a hook's work counts against the
                # worker's concurrency like the job's own.
                await self._after_hooks(ctx, outcome, duration, value, raised)
            del state.running[job.id]
            if committed:
                self._count_committed(job, duration)
            elif outcome is not None:
                self._record(job, outcome, duration)
            else:
                state.stats.lost += 1
            # Wake the claim loop when it waits for a free slot, or once
            # enough slots are free for a worthwhile claim; not on every job.
            if state.full or len(state.running) <= self._wake_at_running or state.stopping:
                state.wake.set()

    def _encode_result(self, task: Task[Any, Any], value: Any) -> str | None:
        if value is None:
            return None
        return encode(
            task.codec.encode_result(value),
            what=f"result of task {task.name!r}",
            max_bytes=self._max_payload_bytes,
        )

    def _stopped_outcome(
        self, job: ClaimedJob, running: RunningJob, calls: list[ThreadCall]
    ) -> Outcome | None:
        reason = running.stop_reason
        if reason == "cancel":
            err = {
                "type": "taskq.JobCancelled",
                "message": "cancelled while running",
                "traceback": "",
            }
            return Outcome(job.id, job.token, "cancelled", error=_dumps(err))
        if reason == "lost":
            return None  # another worker owns the job now: write nothing
        if calls and not calls[0].returned:
            # Its function still runs in a thread, which cannot be
            # interrupted. Back in the queue, the job could be started by
            # another worker while this thread still runs it: so it is not
            # released. Its lease, no longer renewed, expires, and the rescue
            # puts it back then (a worker process that stopped has exited
            # by then, ending the thread).
            log.warning(
                "job %s %s: its sync function is still running in a thread, which cannot be "
                "interrupted: not returned to the queue; its lease is no longer renewed and it "
                "runs again once the lease expires (in about %.0fs)",
                job.id,
                job.task,
                max(0.0, running.lease_deadline - time.monotonic()),
                extra={"job_id": job.id, "task": job.task, "queue": job.queue},
            )
            return None
        return Outcome(job.id, job.token, "release")

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
        self,
        task: Task[Any, Any],
        job: ClaimedJob,
        stored: dict[str, Any] | None,
        ctx: JobContext | None,
        control: AttemptControl | None,
        calls: list[ThreadCall],
    ) -> Any:
        stored = stored_arguments(job) if stored is None else stored
        # Decoded here whatever the executor: a stored value that no longer
        # decodes is a DecodeError in the worker, retried as such.
        args, kwargs = task.call_arguments(stored, ctx)
        if task.executor == "process":
            try:
                # The pool starts the timeout once a process takes the job,
                # and kills the process on timeout or cancel.
                context = ctx if task.context_parameter is not None else None
                return await self.processes.run(task, stored, task.timeout, context)
            except (asyncio.CancelledError, TimeoutError):
                if control is not None:
                    control.stopped = True
                raise
        deadline = asyncio.timeout(task.timeout) if task.timeout else None
        try:
            async with deadline or nullcontext():
                if task.is_async:
                    return await task.fn(*args, **kwargs)
                # A sync function runs in a thread, bounded by the same
                # concurrency. A thread cannot be interrupted: on timeout or
                # cancel the job ends here and the thread runs on (its
                # ctx.cancelled turns true); see _stopped_outcome for shutdown.
                calls.append(ThreadCall(functools.partial(task.fn, *args, **kwargs)))
                return await self.threads.run(calls[0])
        except BaseException as exc:
            if control is not None and (
                isinstance(exc, asyncio.CancelledError)
                or (deadline is not None and deadline.expired())
            ):
                control.stopped = True
            raise

    @property
    def processes(self) -> ProcessPool:
        """The pool for ``executor="process"`` tasks, made when first needed."""
        if self._processes is None:
            config = self._config
            size = config.process_pool_size or default_pool_size(config.concurrency)
            where = [target(t) for t in self._registry.tasks.values() if t.executor == "process"]
            modules = sorted({w["module"] for w in where if w["module"] and not w["path"]})
            self._processes = ProcessPool(size, config.max_jobs_per_process, modules)
        return self._processes

    async def close_processes(self) -> None:
        """End the pool's processes (the worker stops: no job runs in them any more)."""
        pool, self._processes = self._processes, None
        if pool is not None:
            await pool.close()

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

    def _count_committed(self, job: ClaimedJob, duration: float) -> None:
        """A job its ctx.transaction() finished: counted, nothing to write back."""
        self._state.stats.succeeded += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "job %s %s succeeded in %.3fs (its transaction committed)",
                job.id,
                job.task,
                duration,
                extra={"job_id": job.id, "task": job.task, "queue": job.queue},
            )

    def _record(self, job: ClaimedJob, outcome: Outcome, duration: float) -> None:
        kind = outcome.kind
        extra = {
            "job_id": job.id,
            "task": job.task,
            "queue": job.queue,
            "attempt": job.attempts,
            "duration": duration,
            "outcome": OUTCOME_NAMES[kind],
            "worker_id": self._state.worker_id,
        }
        if kind == "succeeded":
            self._state.stats.succeeded += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("job %s %s succeeded in %.3fs", job.id, job.task, duration, extra=extra)
        elif kind == "retry":
            self._state.stats.retried += 1
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
            self._state.stats.failed += 1
            log.error(
                "job %s %s failed for good after %d attempt(s): %s",
                job.id,
                job.task,
                job.attempts,
                _summary(outcome),
                extra=extra,
            )
        elif kind == "cancelled":
            self._state.stats.cancelled += 1
            log.info("job %s %s cancelled", job.id, job.task, extra=extra)
        else:
            self._state.stats.released += 1
            log.info("job %s %s interrupted; back to the queue", job.id, job.task, extra=extra)
        self._writeback.add(outcome)


def _log_after_commit(job: ClaimedJob, raised: BaseException | None) -> None:
    extra = {"job_id": job.id, "task": job.task, "queue": job.queue}
    if raised is None:  # cancelled after the commit (shutdown, a late cancel request)
        log.info(
            "job %s %s: stopped after its transaction committed; it stays succeeded",
            job.id,
            job.task,
            extra=extra,
        )
        return
    log.warning(
        "job %s %s raised after its transaction committed; it stays succeeded, without a "
        "result: %s: %s",
        job.id,
        job.task,
        _error_type(type(raised)),
        raised,
        exc_info=raised,
        extra=extra,
    )


def _dumps(value: Any) -> str:
    return encode(value, what="error", max_bytes=1 << 30)


def _summary(outcome: Outcome) -> str:
    err = decode(outcome.error) if outcome.error else {}
    return f"{err.get('type')}: {err.get('message')}"


def stored_arguments(job: ClaimedJob) -> dict[str, Any]:
    """The job's stored arguments; for a workflow step, with its parents' results in place."""
    stored: dict[str, Any] = decode(job.args)
    if job.inputs is not None:
        stored = fill_inputs(stored, decode(job.inputs))
    return stored
