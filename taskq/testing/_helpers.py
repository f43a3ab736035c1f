"""Assertions on enqueued jobs, and running jobs from a test: one chosen job, or all."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from .. import App, _admin
from .._errors import ConfigurationError, SerializationError, TaskqError, UnknownTaskError
from .._job import Job, JobState, JobStatus
from .._serialization import decode, encode
from .._task import Task
from ..worker import Worker, WorkerConfig, WorkerStats
from ._isolation import app_of_job, current_app

#: Most queued jobs listed in an assertion's failure message.
MAX_JOBS_SHOWN = 20
#: Most queued jobs one ``enqueued_jobs()`` call reads (the newest ones).
MAX_JOBS_READ = 100_000

TaskRef = Task[Any, Any] | str


def _app_of(task: TaskRef | None, app: App | None, helper: str) -> App:
    if app is None:
        owner = task.app if isinstance(task, Task) else None
        app = owner if isinstance(owner, App) else current_app()
    if not app.is_open:
        # Helpers never open an App themselves: an App outside the fixture
        # points at the application's own database.
        raise ConfigurationError(
            f"{helper}() needs an open App: use the taskq_app fixture, "
            "`async with taskq.testing.isolated_app(app)`, or `async with app:`"
        )
    return app


def _task_name(task: TaskRef | None) -> str | None:
    if task is None or isinstance(task, str):
        return task
    if isinstance(task, Task):
        return task.name
    raise TypeError(f"expected a Task or a task name, got {type(task).__name__}")


def _as_stored(task: TaskRef | None, args: Mapping[str, Any], app: App) -> dict[str, Any]:
    """Expected arguments as a job of ``task`` stores them, to compare with stored ones.

    The one place that knows how arguments are stored: by the task's
    annotations first (a ``datetime`` or a dataclass becomes its JSON form,
    as at ``enqueue()``), then through JSON (a tuple becomes a list). A value
    that cannot be stored is refused with :class:`taskq.SerializationError`.
    A task known only by name (not registered on ``app``) gets plain JSON.
    """
    local = task if isinstance(task, Task) else app.tasks.get(task) if task else None
    expected = dict(args)
    name = _task_name(task)
    what = "expected arguments" if name is None else f"expected arguments of {name!r}"
    if local is not None:
        try:
            # Partial arguments: encoded by name, not bound to the signature.
            expected = local.codec.encode_args(expected)
        except SerializationError as exc:
            raise SerializationError(f"{what}: {exc}", path=exc.path) from exc
    stored = decode(encode(expected, what=what))
    assert isinstance(stored, dict)
    return stored


def _matches(status: JobStatus, expected: Mapping[str, Any]) -> bool:
    return all(key in status.args and status.args[key] == value for key, value in expected.items())


async def _queued(
    app: App, name: str | None, queue: str | None, expected: Mapping[str, Any] | None
) -> list[JobStatus]:
    details = await _admin.list_jobs(
        app.database,
        app.schema,
        states=[str(JobState.QUEUED)],
        queue=queue,
        task=name,
        limit=MAX_JOBS_READ,
    )
    statuses = [d.status for d in reversed(details)]  # oldest first
    if expected:
        statuses = [s for s in statuses if _matches(s, expected)]
    return statuses


async def enqueued_jobs(
    task: TaskRef | None = None,
    *,
    queue: str | None = None,
    args: Mapping[str, Any] | None = None,
    app: App | None = None,
) -> list[JobStatus]:
    """The queued jobs, oldest first, optionally of one task, queue or arguments.

    Queued means waiting to run: due now, delayed, or waiting for a retry.
    Running and finished jobs are not listed.

    Args:
        task: a :class:`taskq.Task` or a task name; ``None``: every task.
        queue: only jobs on this queue.
        args: only jobs whose stored arguments include these (compared as
            :func:`assert_enqueued` compares them).
        app: the App to look in; by default the task's App, else the one the
            ``taskq_app`` fixture (or :func:`isolated_app`) set up.
    """
    name = _task_name(task)
    app = _app_of(task, app, "enqueued_jobs")
    expected = None if args is None else _as_stored(task, args, app)
    return await _queued(app, name, queue, expected)


async def assert_enqueued(task: TaskRef, /, **args: Any) -> JobStatus:
    """Assert that a queued job of ``task`` has (at least) these arguments; return it.

    Arguments are compared after the encoding that ``enqueue()`` applies (a
    tuple matches the list it is stored as); arguments not named here may
    have any value. When several jobs match, the oldest is returned. With a
    task name, the App is the one the ``taskq_app`` fixture set up.

    Raises:
        AssertionError: no queued job matches; the message lists the queued
            jobs of that task with their arguments (or, if it has none, the
            tasks that do have queued jobs).
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    name = _task_name(task)
    if name is None:
        raise TypeError("assert_enqueued needs a Task or a task name")
    app = _app_of(task, None, "assert_enqueued")
    expected = _as_stored(task, args, app)
    queued = await _queued(app, name, None, None)
    for status in queued:
        if _matches(status, expected):
            return status
    wanted = f" with arguments including {expected}" if expected else ""
    if queued:
        raise AssertionError(
            f"no queued job of task {name!r}{wanted}; its queued jobs ({len(queued)}):\n"
            + _listing(queued)
        )
    others = Counter(s.task for s in await _queued(app, None, None, None))
    elsewhere = ", ".join(f"{t!r} ({n})" for t, n in sorted(others.items())) or "none"
    raise AssertionError(
        f"no queued job of task {name!r}{wanted}: it has none queued. "
        f"Tasks with queued jobs: {elsewhere}"
    )


async def assert_not_enqueued(task: TaskRef, /, **args: Any) -> None:
    """Assert that no queued job of ``task`` has (at least) these arguments.

    With no arguments: that no job of ``task`` is queued at all. Arguments
    are compared as :func:`assert_enqueued` compares them.

    Raises:
        AssertionError: some queued jobs match; the message lists them.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    name = _task_name(task)
    if name is None:
        raise TypeError("assert_not_enqueued needs a Task or a task name")
    app = _app_of(task, None, "assert_not_enqueued")
    expected = _as_stored(task, args, app)
    found = await _queued(app, name, None, expected)
    if found:
        wanted = f" with arguments including {expected}" if expected else ""
        raise AssertionError(
            f"expected no queued job of task {name!r}{wanted}, found {len(found)}:\n"
            + _listing(found)
        )


def _listing(statuses: list[JobStatus]) -> str:
    lines = [
        f"  job {s.id} on queue {s.queue!r}, attempts {s.attempts}: {s.args}"
        for s in statuses[:MAX_JOBS_SHOWN]
    ]
    if len(statuses) > MAX_JOBS_SHOWN:
        lines.append(f"  ... and {len(statuses) - MAX_JOBS_SHOWN} more")
    return "\n".join(lines)


async def run_job(job: Job | JobStatus | int, *, app: App | None = None) -> JobStatus:
    """Run one queued job now, in this task, as a worker would; return its status after.

    The job is claimed like a worker claims (a lease, attempts + 1), whatever
    its due time (a delayed job, or one waiting for a retry, runs now), queue
    pause or limits. It runs through the worker's own code: ``before_job``
    hooks and middleware with a real :class:`taskq.JobContext`, the task's
    timeout, its retry policy, result encoding, ``after_job`` and
    ``on_failure`` hooks, and the write-back. Jobs it enqueues stay queued.

    The returned status shows the outcome: ``succeeded`` (``result``),
    ``queued`` with ``error`` set when the attempt failed and will be retried
    (``run_job`` it again to run the retry), ``failed`` (a dead letter), or
    ``cancelled``.

    Args:
        job: a :class:`taskq.Job`, a :class:`taskq.JobStatus` or a job id.
        app: the App of a job given by id or status (by default the one the
            ``taskq_app`` fixture set up).

    Raises:
        JobNotFound: no job with that id.
        UnknownTaskError: the job's task is not registered on the App.
        TaskqError: the job is not queued (it is running or finished).
    """
    if isinstance(job, Job):
        job_id = job.id
        app = app or app_of_job(job)
    elif isinstance(job, JobStatus):
        job_id = job.id
    elif isinstance(job, int) and not isinstance(job, bool):
        job_id = job
    else:
        raise TypeError(f"run_job needs a Job, a JobStatus or a job id, got {job!r}")
    app = _app_of(None, app, "run_job")
    handle = app.get_job(job_id)
    status = await handle.status()
    _check_runnable(app, status)
    worker = Worker(app, WorkerConfig.make(concurrency=1))
    if await worker.run_one(job_id) is None:  # another worker took it meanwhile
        _check_runnable(app, await handle.status())
        raise TaskqError(f"job {job_id} could not be claimed")  # pragma: no cover
    return await handle.status()


def _check_runnable(app: App, status: JobStatus) -> None:
    if status.state is not JobState.QUEUED:
        hint = (
            " (a failed or cancelled job goes back to the queue with `await job.retry()`)"
            if status.state in (JobState.FAILED, JobState.CANCELLED)
            else ""
        )
        raise TaskqError(
            f"job {status.id} ({status.task}) is {status.state}, not queued: "
            f"run_job runs queued jobs only{hint}"
        )
    if status.task not in app.tasks:
        raise UnknownTaskError(
            f"job {status.id}: task {status.task!r} is not registered on {app!r}, "
            "so it cannot run here"
        )


async def drain(
    app: App | None = None, *, queues: list[str] | None = None, **options: Any
) -> WorkerStats:
    """Run jobs until none is due, like ``app.drain()``; return what happened.

    Jobs the drained jobs enqueue run too, if due; delayed jobs and retries
    that are not due yet stay queued (give retry policies ``wait=0`` in
    tests, or run such jobs with :func:`run_job`).

    Args:
        app: the App (by default the one the ``taskq_app`` fixture set up).
        queues: only jobs of these queues (default: all).
        **options: other worker settings, e.g. ``concurrency=1`` to run the
            jobs one at a time in claim order.
    """
    app = _app_of(None, app, "drain")
    return await app.drain(queues=queues, **options)
