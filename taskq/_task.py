"""Tasks: plain functions registered on an App, and the ways to enqueue them."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar

from ._codec import TaskCodec, context_parameter
from ._errors import ConfigurationError
from ._limits import RateLimit
from ._names import check_queue, check_task_name, default_task_name
from ._options import (
    EnqueueOptions,
    check_concurrency_key,
    check_priority,
    with_key,
)
from ._retry import Retry, coerce_retry

if TYPE_CHECKING:
    from ._hooks import JobContext
    from ._job import Job

P = ParamSpec("P")
R = TypeVar("R")

#: ``executor=`` values: a sync function in the worker's threads, or in its pool of processes.
EXECUTORS = (None, "thread", "process")


class EnqueueTarget(Protocol):
    """Where a task's jobs are written (the App's enqueue path)."""

    async def enqueue_one(
        self, name: str, stored: dict[str, Any], opts: EnqueueOptions, task: Task[Any, Any] | None
    ) -> Job: ...

    async def enqueue_many(
        self,
        name: str,
        stored: list[dict[str, Any]],
        opts: EnqueueOptions,
        task: Task[Any, Any] | None,
        keys: list[str | None] | None = None,
    ) -> list[Job]: ...


class TaskOwner(Protocol):
    """What a task needs from the App it is registered on."""

    @property
    def enqueuer(self) -> EnqueueTarget: ...


@dataclass(frozen=True)
class TaskSettings:
    """``@app.task``'s settings, checked when the decorator is made."""

    queue: str
    priority: int
    retry: Retry
    timeout: float | None
    rate_limit: RateLimit | None
    #: Where a sync function runs: ``"thread"`` (None: the default) or ``"process"``.
    executor: str | None = None
    #: Its jobs' concurrency key: a text, or a function of the job's arguments.
    concurrency_key: str | Callable[..., str | None] | None = None

    def with_concurrency_key(self, key: str | Callable[..., str | None] | None) -> TaskSettings:
        """These settings with a default concurrency key for the task's jobs."""
        if key is not None and not callable(key):
            check_concurrency_key(key)
        return replace(self, concurrency_key=key)

    def with_executor(self, executor: str | None) -> TaskSettings:
        """These settings with ``executor`` (checked against the function in ``make_task``)."""
        if executor not in EXECUTORS:
            raise ConfigurationError(
                f"executor must be one of {sorted(e for e in EXECUTORS if e)} (or None: "
                f"threads for a plain def), got {executor!r}"
            )
        return replace(self, executor=executor)

    @classmethod
    def make(
        cls,
        *,
        queue: str,
        priority: int,
        retry: Retry | int | bool | None,
        timeout: float | timedelta | None,
        rate_limit: RateLimit | str | tuple[int, Any] | None,
    ) -> TaskSettings:
        check_queue(queue)
        check_priority(priority)
        policy = coerce_retry(retry)
        rate = None if rate_limit is None else RateLimit.parse(rate_limit)
        seconds: float | None
        if timeout is None:
            seconds = None
        elif isinstance(timeout, timedelta):
            seconds = timeout.total_seconds()
        elif isinstance(timeout, int | float) and not isinstance(timeout, bool):
            seconds = float(timeout)
        else:
            raise ConfigurationError(f"timeout must be seconds or a timedelta, got {timeout!r}")
        if seconds is not None and not seconds > 0:
            raise ConfigurationError(f"timeout must be positive, got {timeout!r}")
        return cls(queue, priority, policy, seconds, rate)


def make_task(
    owner: TaskOwner, fn: Callable[..., Any], *, name: str | None, settings: TaskSettings
) -> Task[Any, Any]:
    """A task of ``fn`` named ``name`` (default ``module.qualname``)."""
    if isinstance(fn, Task):
        raise ConfigurationError(f"{fn!r} is already a task")
    if not callable(fn):
        raise ConfigurationError(f"@app.task needs a function, got {fn!r}")
    if settings.executor == "process":
        check_process_function(fn)
    elif settings.executor == "thread" and inspect.iscoroutinefunction(fn):
        raise ConfigurationError(
            f"task {default_task_name(fn)!r}: executor='thread' is for plain def functions; "
            "an async def task runs on the worker's event loop (drop executor=)"
        )
    return Task(
        owner,
        fn,
        # None means "the default"; any other value, "" included, must be a valid name.
        name=check_task_name(default_task_name(fn) if name is None else name),
        queue=settings.queue,
        priority=settings.priority,
        retry=settings.retry,
        timeout=settings.timeout,
        rate_limit=settings.rate_limit,
        executor=settings.executor,
        concurrency_key=settings.concurrency_key,
    )


def check_process_function(fn: Callable[..., Any]) -> None:
    """Refuse what a process of the pool cannot run: it imports the function by its name."""
    what = f"task {getattr(fn, '__qualname__', fn)!r}: executor='process'"
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigurationError(
            f"{what} is for plain def functions (CPU-bound work); an async def task runs on "
            "the worker's event loop: drop executor=, or make the function a plain def"
        )
    qualname = getattr(fn, "__qualname__", "")
    if not inspect.isfunction(fn) or "<" in qualname or not getattr(fn, "__module__", None):
        raise ConfigurationError(
            f"{what} needs a function defined at module level (not nested in a function, "
            "not a lambda or a callable object): each process imports it by "
            "module and name"
        )


class _Signature:
    """Checks arguments against the task function at enqueue time and rebuilds calls.

    ``context``: the parameter that receives the job's context. It is not an
    argument of the job: binding leaves it out (and refuses it), and the
    worker's call passes the context there.
    """

    def __init__(self, fn: Callable[..., Any], context: str | None = None) -> None:
        self.full = inspect.signature(fn)
        self.context = context
        params = [p for p in self.full.parameters.values() if p.name != context]
        self.sig = self.full.replace(parameters=params) if context else self.full
        kinds = {p.kind for p in self.full.parameters.values()}
        # Fast path for the common shape (only named parameters): set
        # arithmetic instead of Signature.bind, which matters for enqueue_many.
        self.simple = not kinds & {
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        }
        self.names = frozenset(p.name for p in params)
        self.required = frozenset(p.name for p in params if p.default is inspect.Parameter.empty)

    def bind(self, task: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if self.simple and not args:
            keys = kwargs.keys()
            if keys <= self.names and self.required <= keys:
                return dict(kwargs)
        if self.context is not None and self.context in kwargs:
            raise TypeError(
                f"task {task!r}: {self.context!r} receives the job's context from the worker; "
                f"it is not an argument of the job (signature: {task}{self.sig})"
            )
        try:
            bound = self.sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"task {task!r}: {exc} (signature: {task}{self.sig})") from None
        return dict(bound.arguments)

    def call_args(
        self, stored: Mapping[str, Any], context: Any = None
    ) -> tuple[list[Any], dict[str, Any]]:
        """Rebuild (args, kwargs) for the function from stored arguments (and the context)."""
        if self.simple:
            kwargs = dict(stored)
            if self.context is not None:
                kwargs[self.context] = context
            return [], kwargs
        args: list[Any] = []
        kwargs = {}
        for name, param in self.full.parameters.items():
            if name == self.context:
                value = context
            elif name in stored:
                value = stored[name]
            else:
                continue
            if param.kind is inspect.Parameter.POSITIONAL_ONLY:
                args.append(value)
            elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                args.extend(value)
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                kwargs.update(value)
            else:
                kwargs[name] = value
        return args, kwargs


class Task(Generic[P, R]):
    """A function registered with ``@app.task``.

    Calling it runs the function inline (tasks stay plain, testable functions);
    ``enqueue()`` records a job for a worker instead. A parameter annotated
    ``taskq.JobContext`` receives the running job's context from the worker;
    it is not an argument of the job (see :class:`taskq.JobContext`).
    """

    def __init__(
        self,
        app: TaskOwner,
        fn: Callable[P, R],
        *,
        name: str,
        queue: str,
        priority: int,
        retry: Retry,
        timeout: float | None,
        rate_limit: RateLimit | None = None,
        executor: str | None = None,
        concurrency_key: str | Callable[..., str | None] | None = None,
    ) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.queue = queue
        self.priority = priority
        self.retry = retry
        self.timeout = timeout
        self.rate_limit = rate_limit
        #: The default concurrency key of its jobs: a text, or a function called
        #: with each job's arguments in the producer (see :meth:`bind_job`).
        self.concurrency_key = concurrency_key
        self.is_async = inspect.iscoroutinefunction(fn)
        #: ``"process"``: the worker runs it in its pool of processes (see
        #: ``taskq.worker.processes``); else sync functions run in threads.
        self.executor = executor or (None if self.is_async else "thread")
        #: The parameter that receives the job's :class:`taskq.JobContext`, if any.
        self.context_parameter = context_parameter(fn)
        self._signature = _Signature(fn, self.context_parameter)
        #: Encodes and decodes arguments and the result by the function's annotations.
        self.codec = TaskCodec(fn, name, context=self.context_parameter)
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<taskq.Task {self.name} queue={self.queue!r}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        connection: Any = None,
        unique_key: str | None = None,
        unique_for: float | timedelta | None = None,
        meta: Mapping[str, Any] | None = None,
        concurrency_key: str | None = None,
    ) -> BoundTask[P, R]:
        """Enqueue with other settings than the task's defaults.

        Args:
            queue: the queue to put the job on.
            priority: among due jobs, higher runs first (default 0); equal priorities
                run in order of ``run_at``.
            delay: seconds (or a timedelta) before the job may start.
            run_at: an aware datetime before which the job may not start.
            connection: an asyncpg connection whose open transaction the job joins:
                it exists if and only if that transaction commits, and workers are
                woken only after the commit.
            unique_key: at most one live (queued or running) job per key and queue:
                if one exists, ``enqueue()`` returns it (``job.duplicate`` is true)
                instead of writing a new one, even under concurrent producers.
            unique_for: seconds (or a timedelta) during which a finished job still
                holds its key, so that the same work is not done twice in that window.
            meta: JSON metadata carried with the job, apart from its arguments:
                hooks see it as ``ctx.meta``, ``job.status()`` as ``meta``
                (tracing adds the trace context to it).
            concurrency_key: the tenant (or other key) the job belongs to, e.g.
                ``"tenant:42"``: in a queue with a ``per_key_limit``, at most that
                many jobs per key run at once and the claim takes turns between
                keys (see the scheduling guide, "Fair sharing between tenants").
        """
        opts = EnqueueOptions.make(
            queue=queue,
            priority=priority,
            delay=delay,
            run_at=run_at,
            connection=connection,
            unique_key=unique_key,
            unique_for=unique_for,
            meta=meta,
            concurrency_key=concurrency_key,
        )
        return BoundTask(self, opts)

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Record a job that runs this task with these arguments; return its handle.

        Raises:
            SerializationError: an argument is not JSON; nothing was written.
            TypeError: the arguments do not fit the function's signature.
            DatabaseError: Postgres could not be reached.
        """
        return await BoundTask(self, EnqueueOptions()).enqueue(*args, **kwargs)

    async def enqueue_many(self, kwargs_list: Iterable[Mapping[str, Any]]) -> list[Job]:
        """Record one job per mapping of keyword arguments, in one round trip."""
        return await BoundTask(self, EnqueueOptions()).enqueue_many(kwargs_list)

    def bind_arguments(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Check a call against the function's signature; return arguments by name.

        Values of annotated types (datetime, UUID, dataclasses...) come back in
        their JSON form, ready to store.
        """
        return self.codec.encode_args(self._signature.bind(self.name, args, kwargs))

    def bind_job(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any], key: str | None
    ) -> tuple[dict[str, Any], str | None]:
        """:meth:`bind_arguments`, and the job's concurrency key: ``key`` when given
        (an ``options(concurrency_key=...)``), else the task's default."""
        bound = self._signature.bind(self.name, args, kwargs)
        if key is None and self.concurrency_key is not None:
            key = self._key_of(bound)
        return self.codec.encode_args(bound), key

    def _key_of(self, bound: dict[str, Any]) -> str | None:
        rule = self.concurrency_key
        if not callable(rule):
            return rule
        try:
            key = rule(**bound)
        except Exception as exc:
            raise ConfigurationError(
                f"the concurrency_key function of task {self.name!r} raised "
                f"{type(exc).__name__}: {exc} (it is called with the job's arguments)"
            ) from exc
        if key is not None:
            try:
                check_concurrency_key(key)
            except ConfigurationError as exc:
                raise ConfigurationError(
                    f"the concurrency_key function of task {self.name!r} returned {key!r}: "
                    f"{exc} (or None: no key)"
                ) from None
        return key

    def bind_template(
        self,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        template: Callable[[Any], Any],
        *,
        skip: frozenset[str] = frozenset(),
        key: str | None = None,
    ) -> tuple[dict[str, Any], str | None]:
        """Like :meth:`bind_job`, for a workflow step whose arguments may hold references.

        ``template(value)`` returns the stored form of a value that holds step
        references (filled in when the step starts, then decoded by the
        annotation), or ``None`` for a plain value, which is encoded now.
        Arguments named in ``skip`` are checked against the signature but not
        stored (a map's item argument, given per item). The task's key
        function needs every argument now: a step whose arguments wait for
        other steps (or a map, whose items share one key) must be given its key.
        """
        bound = self._signature.bind(self.name, args, kwargs)
        templated: dict[str, Any] = {}
        plain: dict[str, Any] = {}
        for name, value in bound.items():
            if name in skip:
                continue
            stored = template(value)
            if stored is None:
                plain[name] = value
            else:
                templated[name] = stored
        if key is None and self.concurrency_key is not None:
            if callable(self.concurrency_key) and (templated or skip):
                raise ConfigurationError(
                    f"task {self.name!r} computes its concurrency key from its arguments, "
                    "and this step's arguments are known only when it runs (or it is a map, "
                    "whose items share one key): give the step "
                    "task.options(concurrency_key=...)"
                )
            key = self._key_of(plain)
        out = self.codec.encode_args(plain)
        out.update(templated)
        return out, key

    def call_arguments(
        self, stored: Mapping[str, Any], context: JobContext | None = None
    ) -> tuple[list[Any], dict[str, Any]]:
        """Rebuild ``(args, kwargs)`` for the function from stored arguments.

        ``context`` goes to the parameter annotated ``JobContext``, if there is one.

        Raises:
            DecodeError: a stored value no longer decodes to its annotated type.
        """
        return self._signature.call_args(self.codec.decode_args(stored), context)


class BoundTask(Generic[P, R]):
    """A task with enqueue options applied (from ``Task.options``)."""

    def __init__(self, task: Task[P, R], opts: EnqueueOptions) -> None:
        self.task = task
        self.opts = opts

    def options(self, **changes: Any) -> BoundTask[P, R]:
        """These options with some changed (same arguments as :meth:`Task.options`)."""
        merged = {
            "queue": self.opts.queue,
            "priority": self.opts.priority,
            "delay": self.opts.delay or None,
            "run_at": self.opts.run_at,
            "connection": self.opts.connection,
            "unique_key": self.opts.unique_key,
            "unique_for": self.opts.unique_for or None,
            "meta": self.opts.meta,
            "concurrency_key": self.opts.concurrency_key,
        }
        merged.update(changes)
        return BoundTask(self.task, EnqueueOptions.make(**merged))

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Like :meth:`Task.enqueue`, with these options."""
        stored, key = self.task.bind_job(args, kwargs, self.opts.concurrency_key)
        return await self.task.app.enqueuer.enqueue_one(
            self.task.name, stored, with_key(self.opts, key), self.task
        )

    async def enqueue_many(self, kwargs_list: Iterable[Mapping[str, Any]]) -> list[Job]:
        """Like :meth:`Task.enqueue_many`, with these options."""
        task = self.task
        stored = []
        keys: list[str | None] = []
        for index, kwargs in enumerate(kwargs_list):
            if not isinstance(kwargs, Mapping):
                raise TypeError(
                    f"enqueue_many() wants mappings of keyword arguments; item {index} is "
                    f"{type(kwargs).__name__}"
                )
            arguments, key = task.bind_job((), kwargs, self.opts.concurrency_key)
            stored.append(arguments)
            keys.append(key)
        return await task.app.enqueuer.enqueue_many(task.name, stored, self.opts, task, keys)
