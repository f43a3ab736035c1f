"""Hooks: user code around each job run and each enqueue.

Registered on the App, in the order they apply::

    @app.before_job          fn(ctx)             before the task; raising fails the attempt
    @app.middleware          fn(ctx, call_next)  wraps the task call (async), in the job's task
    @app.after_job           fn(ctx, outcome)    after every attempt, whatever its outcome
    @app.on_failure          fn(ctx, outcome)    after an attempt that raised (retried or dead)
    @app.enqueue_middleware  fn(ctx, call_next)  wraps the write of enqueued jobs (async)

Hook functions may be plain or async. Middleware and ``before_job`` hooks are
part of the attempt: their exceptions fail it like the task's own would.
``after_job`` and ``on_failure`` hooks run once the outcome is decided; their
exceptions are logged and change nothing. With no hook registered, a job
costs nothing extra. A task that declares a parameter annotated
:class:`JobContext` receives the very context its hooks see.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Generator
from contextlib import AbstractAsyncContextManager
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, overload

log = logging.getLogger("taskq.hooks")

#: Longest that an async after-job (or on-failure) hook may take before it is
#: abandoned: it holds the job's slot in the worker while it runs.
AFTER_HOOK_TIMEOUT_SECONDS = 10.0

#: How an attempt ended. ``retried``: it failed and will run again later;
#: ``failed``: it failed for good (a dead letter); ``released``: shutdown
#: interrupted it and it went back to the queue without using up the attempt;
#: ``lost``: this worker lost the job's lease (it was cut off from Postgres
#: too long), another worker may run it, and nothing was written back; also a
#: sync task whose thread was still running when a forced shutdown stopped it:
#: its job is left to its lease, which expires, and is then run again.
OutcomeKind = Literal["succeeded", "retried", "failed", "cancelled", "released", "lost"]

#: Longest progress message kept, in characters (the rest is cut).
MAX_PROGRESS_MESSAGE_CHARS = 1000

#: Longest name of a recorded step (``ctx.step(name, ...)``), in characters:
#: a name is a key chosen in code ("charge-card"), not data.
MAX_STEP_NAME_CHARS = 200

_P = ParamSpec("_P")
_T = TypeVar("_T")


class JobControl(Protocol):
    """What the worker running an attempt offers its :class:`JobContext`."""

    @property
    def cancelled(self) -> bool:
        """Whether the worker stopped waiting for this attempt."""

    @property
    def lease_deadline(self) -> float:
        """``time.monotonic()`` by which the job's lease runs out unless renewed."""

    def report(self, fraction: float, message: str | None) -> None:
        """Record progress; callable from any thread, never blocks."""

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        """A connection in a transaction that also records the job as succeeded."""

    def step(
        self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Awaitable[Any]:
        """Run ``fn(*args, **kwargs)`` unless an earlier attempt recorded step ``name``."""


class _Reported:
    """What ``ctx.progress()`` returns: already done; awaiting it lets other tasks run."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        # A bare yield is asyncio's sleep(0): a tight loop that reports
        # progress gives the write of that progress a chance to run.
        yield


_REPORTED = _Reported()


@dataclass(slots=True)
class JobContext:
    """The job an attempt runs, as hooks, middleware and the task itself see it.

    A task receives it by declaring a parameter annotated ``taskq.JobContext``
    (any name; ``taskq.JobContext | None`` too). That parameter is not an
    argument of the job: ``enqueue()`` refuses it, and the worker passes the
    same object that its hooks and middleware get. Calling the task directly
    (``charge(7, ctx=None)``) calls the plain function: pass a context, or
    give the parameter a default.

    A context made by hand (in a unit test) has no worker behind it:
    ``progress()`` only checks its arguments, ``cancelled`` stays false,
    ``lease_deadline`` is ``None``, ``transaction()`` raises RuntimeError and
    ``step()`` calls its function every time, recording nothing.

    Attributes:
        id: the job's id.
        task: the task's name.
        queue: the queue it was claimed from.
        attempt: this attempt's number, from 1.
        max_attempts: the job's attempt budget.
        priority: the job's priority.
        args: the job's arguments by name, as stored (JSON forms).
        meta: the metadata enqueued with the job (``options(meta=...)`` and the
            trace context of tracing integrations); empty if none.
        worker_id: the worker running it.
        state: a dict for hooks to share values across one attempt (e.g. a
            start time set in ``before_job`` and read in ``after_job``).
        control: what the worker running the attempt provides (the worker
            passes it; leave it out when making a context by hand).
    """

    id: int
    task: str
    queue: str
    attempt: int
    max_attempts: int
    priority: int
    args: dict[str, Any]
    meta: dict[str, Any]
    worker_id: str
    state: dict[str, Any] = field(default_factory=dict)
    control: InitVar[JobControl | None] = None
    _control: JobControl | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self, control: JobControl | None) -> None:
        self._control = control

    @property
    def cancelled(self) -> bool:
        """True once the worker stopped waiting for this attempt.

        That is: the job's cancellation was requested (``job.cancel()``), the
        worker is shutting down and stopped it, it lost the job's lease, or the
        task's timeout passed. An ``async def`` task is cancelled anyway; a sync
        task runs in a thread that cannot be interrupted, so a long one should
        look at this flag now and then and return early.
        """
        return self._control is not None and self._control.cancelled

    @property
    def lease_deadline(self) -> float | None:
        """When the job's lease runs out unless renewed, on the ``time.monotonic()`` clock.

        The worker renews it every third of ``lease_seconds`` while the job
        runs, so it moves forward; a task that finds it near (an event loop
        blocked for long) may be run again elsewhere. ``None`` for a context
        made by hand.
        """
        return None if self._control is None else self._control.lease_deadline

    def progress(self, fraction: float, message: str | None = None) -> Awaitable[None]:
        """Report how far the task is: ``fraction`` from 0 to 1, and an optional message.

        ``await ctx.progress(0.5, "half way")`` in an ``async def`` task;
        ``ctx.progress(0.5)`` in a sync task (its thread hands the value over
        and goes on). The value is recorded on the job's row, visible as
        ``job.status().progress`` (``{"fraction", "message", "at"}``) and in
        ``python -m taskq jobs show``. Writes are coalesced: at most one per
        second per job, the latest value wins, and the last one is written
        before the attempt's outcome, so a tight loop may report as often as
        it likes. Each write names the job's lease token: a worker that lost
        the job writes nothing. A failed write is logged, never raised.

        Raises:
            ValueError: ``fraction`` is not a number from 0 to 1.
            TypeError: ``message`` is not a string or None.
        """
        if (
            not isinstance(fraction, int | float)
            or isinstance(fraction, bool)
            or math.isnan(fraction)
            or not 0 <= fraction <= 1
        ):
            raise ValueError(
                f"ctx.progress(): fraction must be a number from 0 to 1, got {fraction!r}"
            )
        if message is not None:
            if not isinstance(message, str):
                raise TypeError(
                    "ctx.progress(): message must be a string or None, got "
                    f"{type(message).__name__}"
                )
            # What JSON in Postgres cannot hold (NUL, lone surrogates) is escaped.
            message = (
                message[:MAX_PROGRESS_MESSAGE_CHARS]
                .encode("utf-8", "backslashreplace")
                .decode("utf-8")
                .replace("\x00", "\\x00")
            )
        if self._control is not None:
            self._control.report(float(fraction), message)
        return _REPORTED

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        """A connection whose transaction also records the job as succeeded.

        ``async with ctx.transaction() as conn:`` gives an asyncpg connection
        in a transaction. When the block ends without an error, the job is
        recorded as succeeded in that same transaction (fenced by its lease),
        and it commits: the block's writes and the job's success happen
        together or not at all. If the worker dies before the commit, nothing
        happened and the job runs again; once it committed, the job never runs
        again (see "Exactly-once effects in the same database" in the delivery
        guarantees).

        The job's result is what the task then returns, written once it
        returns; if it raises after the commit, the job stays succeeded
        (without a result) and the error is logged. An error inside the block
        rolls back and fails the attempt as usual. If the lease was lost before
        the commit, the transaction is rolled back and the task is cancelled.
        Once per attempt, in ``async def`` tasks only.

        Raises:
            RuntimeError: a context made by hand, a sync task, a second call.
        """
        if self._control is None:
            raise RuntimeError(
                "ctx.transaction() needs the context a worker gives a running job; this "
                "one was made by hand"
            )
        return self._control.transaction()

    @overload
    def step(
        self,
        name: str,
        fn: Callable[_P, Awaitable[_T]],
        /,
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> Awaitable[_T]: ...

    @overload
    def step(
        self, name: str, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> Awaitable[_T]: ...

    def step(
        self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Awaitable[Any]:
        """Run ``fn(*args, **kwargs)`` once for the job, across its attempts: a recorded step.

        ``await ctx.step("charge-card", charge, order_id)`` calls ``charge``
        (an async function is awaited; a plain one is called, and what it
        returns is awaited if awaitable) and records its result with the job.
        When the job runs again (its retry policy, or a rescue after its
        worker died or lost the lease), a step already recorded is not run:
        its recorded result is returned. So a task made of steps resumes
        after the last one that succeeded:

            @app.task(retry=taskq.Retry(attempts=5))
            async def fulfil(order_id: int, ctx: taskq.JobContext) -> str:
                payment = await ctx.step("charge-card", charge, order_id)
                label = await ctx.step("print-label", print_label, order_id)
                await ctx.step("email", send_mail, order_id, payment.id, label)
                return label

        The one rule: a step's name must say which step it is in every
        attempt (no counters, times or random parts), and no two steps of one
        attempt share a name.

        The result is encoded by ``fn``'s return annotation, as a task's
        result is (a dataclass, ``datetime``, ``UUID``, ``Decimal``, a
        pydantic model...), and decoded by it when replayed, so a replayed step
        returns the same type; without an annotation it must be plain JSON.
        The first call that returns records its result (``None`` included);
        one that raises records nothing and its exception reaches the task
        unchanged (the retry policy applies), as does a cancellation.

        The record is written only while the attempt holds the job's lease;
        if it was lost (another worker may be running the job), nothing is
        recorded and the task is cancelled, as for any lost lease. If
        another attempt of the same job recorded the step first, its result
        is returned. Inside ``ctx.transaction()`` the record is written in
        that transaction: the step's own writes there and its record commit
        together, or roll back together (and the step runs again next time).
        Steps there run one at a time (one connection).

        A plain ``fn`` runs in the event loop: for blocking work use
        ``await ctx.step(name, asyncio.to_thread, blocking_fn, arg)``. In
        ``async def`` tasks only: a sync task runs in a thread, which cannot
        await. After ``ctx.transaction()`` committed, a step just runs (the
        job never runs again). A context made by hand runs ``fn`` every time
        and records nothing.

        Raises:
            TypeError: ``name`` is not a string, or ``fn`` is not callable.
            ValueError: ``name`` is empty, longer than 200 characters, or
                holds a NUL character or a lone surrogate.
            RuntimeError: a step of that name is running or has returned in
                this attempt (a call that raised frees its name); a sync task.
            taskq.SerializationError: the result cannot be encoded (nothing
                was recorded); ``taskq.DecodeError`` when a recorded result
                no longer decodes to the annotation.
        """
        check_step_name(name)
        if not callable(fn):
            raise TypeError(
                f"ctx.step({name!r}, fn): fn must be a function to call, got {type(fn).__name__}"
            )
        if self._control is None:
            return _call_unrecorded(fn, args, kwargs)
        return self._control.step(name, fn, args, kwargs)


def check_step_name(name: object) -> None:
    """Refuse a step name that is not a non-empty string of at most 200 characters, NUL-free.

    Raises:
        TypeError: not a string.
        ValueError: empty, too long, a NUL character or a lone surrogate.
    """
    if not isinstance(name, str):
        raise TypeError(f"ctx.step(): the step name must be a string, got {type(name).__name__}")
    if not name:
        raise ValueError("ctx.step(): the step name is empty; name the step (e.g. 'charge-card')")
    if len(name) > MAX_STEP_NAME_CHARS:
        raise ValueError(
            f"ctx.step(): the step name {name[:40]!r}... has {len(name)} characters; at most "
            f"{MAX_STEP_NAME_CHARS}"
        )
    if "\x00" in name:
        raise ValueError(
            f"ctx.step(): the step name {name!r} contains a NUL character (\\x00), which "
            "Postgres cannot store"
        )
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"ctx.step(): the step name {name!r} is not valid text (a lone surrogate)"
            ) from None


async def _call_unrecorded(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    value = fn(*args, **kwargs)
    if inspect.isawaitable(value):
        value = await value
    return value


@dataclass(slots=True)
class JobOutcome:
    """How an attempt ended, as ``after_job`` and ``on_failure`` hooks see it.

    Attributes:
        kind: ``succeeded``, ``retried``, ``failed``, ``cancelled``, ``released``
            or ``lost``.
        duration: seconds the attempt ran (hooks and middleware included).
        result: the task's return value, for a succeeded attempt.
        error: ``{"type", "message", "traceback"}`` of a failed or cancelled attempt.
        exception: the exception the attempt raised, if it raised one.
        retry_in: for ``retried``, the seconds until the next attempt.
    """

    kind: OutcomeKind
    duration: float
    result: Any = None
    error: dict[str, Any] | None = None
    exception: BaseException | None = None
    retry_in: float | None = None


@dataclass(slots=True)
class EnqueueContext:
    """An enqueue as ``enqueue_middleware`` sees it, before the jobs are written.

    Attributes:
        task: the task's name.
        queue: the queue the jobs go to.
        count: how many jobs this call writes (``enqueue_many`` writes several).
        meta: the metadata written with every job of the call. Middleware may
            add to it (tracing puts the trace context here); it must stay JSON.
        in_transaction: True when the jobs join the caller's transaction
            (``options(connection=...)``).
        job_ids: the new jobs' ids, filled in once ``call_next()`` returns.
        duplicate: set once ``call_next()`` returns: True when a unique
            enqueue found its key taken and wrote nothing (``job_ids`` then
            holds the existing job).
    """

    task: str
    queue: str
    count: int
    meta: dict[str, Any]
    in_transaction: bool
    job_ids: list[int] = field(default_factory=list)
    duplicate: bool = False


CallNext = Callable[[], Awaitable[Any]]
JobMiddleware = Callable[[JobContext, CallNext], Awaitable[Any]]
EnqueueMiddleware = Callable[[EnqueueContext, CallNext], Awaitable[Any]]
BeforeJobHook = Callable[[JobContext], Any]
AfterJobHook = Callable[[JobContext, JobOutcome], Any]


class WorkerObserver(Protocol):
    """What instrumentation (metrics) hears from workers besides job outcomes."""

    def claimed(self, seconds: float, count: int) -> None:
        """A claim statement took ``seconds`` and returned ``count`` jobs."""

    def rescued(self, requeued: int, ended: int) -> None:
        """Jobs with expired leases were put back in the queue, or ended for good."""


def _check_callable(kind: str, fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"{kind} must be a function, got {type(fn).__name__}")


def _check_async(kind: str, fn: object) -> None:
    _check_callable(kind, fn)
    # An instance with an async __call__ is as good as an async function.
    if not (
        inspect.iscoroutinefunction(fn)
        or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004
    ):
        raise TypeError(
            f"{kind} must be an async function taking (ctx, call_next), "
            f"got {getattr(fn, '__name__', fn)!r}"
        )


class Hooks:
    """The hooks registered on one App."""

    def __init__(self) -> None:
        self.before: list[BeforeJobHook] = []
        self.middleware: list[JobMiddleware] = []
        self.after: list[AfterJobHook] = []
        self.failure: list[AfterJobHook] = []
        self.enqueue: list[EnqueueMiddleware] = []
        self.observers: list[WorkerObserver] = []

    @property
    def around_jobs(self) -> bool:
        """True when any hook wants to see jobs run (the worker then builds a context)."""
        return bool(self.before or self.middleware or self.after or self.failure)

    def add_before(self, fn: BeforeJobHook) -> None:
        _check_callable("a before_job hook", fn)
        self.before.append(fn)

    def add_middleware(self, fn: JobMiddleware) -> None:
        _check_async("job middleware", fn)
        self.middleware.append(fn)

    def add_after(self, fn: AfterJobHook) -> None:
        _check_callable("an after_job hook", fn)
        self.after.append(fn)

    def add_failure(self, fn: AfterJobHook) -> None:
        _check_callable("an on_failure hook", fn)
        self.failure.append(fn)

    def add_enqueue(self, fn: EnqueueMiddleware) -> None:
        _check_async("enqueue middleware", fn)
        self.enqueue.append(fn)

    async def run_job(self, ctx: JobContext, call: CallNext) -> Any:
        """Run the before hooks, then the task through the middleware chain."""
        for hook in self.before:
            returned = hook(ctx)
            if inspect.isawaitable(returned):
                await returned
        return await _chain(self.middleware, ctx, call)

    async def after_job(self, ctx: JobContext, outcome: JobOutcome) -> None:
        """Tell the after-job (and, for a failure, on-failure) hooks; never raises."""
        hooks = list(self.after)
        if outcome.kind in ("retried", "failed"):
            hooks += self.failure
        for hook in hooks:
            name = getattr(hook, "__qualname__", hook)
            extra = {"job_id": ctx.id, "task": ctx.task, "queue": ctx.queue}
            # Only async hooks pay for a timeout (a plain one cannot be
            # interrupted anyway).
            deadline: asyncio.Timeout | None = None
            try:
                returned = hook(ctx, outcome)
                if inspect.isawaitable(returned):
                    deadline = asyncio.timeout(AFTER_HOOK_TIMEOUT_SECONDS)
                    async with deadline:
                        await returned
            except Exception:
                if deadline is not None and deadline.expired():
                    log.warning(
                        "hook %s took over %.0fs for job %s; abandoned",
                        name,
                        AFTER_HOOK_TIMEOUT_SECONDS,
                        ctx.id,
                        extra=extra,
                    )
                else:
                    log.exception(
                        "hook %s failed for job %s (the job's outcome stands)",
                        name,
                        ctx.id,
                        extra=extra,
                    )

    async def run_enqueue(self, ctx: EnqueueContext, call: CallNext) -> Any:
        return await _chain(self.enqueue, ctx, call)


async def _chain(middleware: list[Any], ctx: Any, call: CallNext) -> Any:
    """Call ``middleware[0](ctx, next)`` where each ``next`` calls the one after, then ``call``."""
    if not middleware:
        return await call()

    def step(index: int) -> CallNext:
        if index == len(middleware):
            return call

        async def call_next() -> Any:
            return await middleware[index](ctx, step(index + 1))

        return call_next

    return await step(0)()
