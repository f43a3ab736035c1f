"""The App's hook registration methods (``@app.before_job`` and the rest)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ._hooks import EnqueueMiddleware, JobMiddleware
from ._registry import Registry

H = TypeVar("H", bound=Callable[..., Any])


class HookMethods:
    """Registers hooks and middleware on ``self.registry``; part of :class:`taskq.App`."""

    registry: Registry

    def before_job(self, fn: H) -> H:
        """Register ``fn(ctx: JobContext)``, called before each attempt runs its task.

        Plain or async. It runs in the job's own asyncio task, so context
        variables it sets are seen by the task function. Raising fails the
        attempt like the task raising would (the task's retry policy applies).
        """
        self.registry.hooks.add_before(fn)
        return fn

    def after_job(self, fn: H) -> H:
        """Register ``fn(ctx: JobContext, outcome: JobOutcome)``, called after every attempt.

        Plain or async; called for every outcome (succeeded, retried, failed,
        cancelled, released, lost) once it is decided, before it is written
        back, and before the worker frees the job's slot. Its exceptions are
        logged and change nothing; an async one is abandoned after 10 s.
        """
        self.registry.hooks.add_after(fn)
        return fn

    def on_failure(self, fn: H) -> H:
        """Register ``fn(ctx: JobContext, outcome: JobOutcome)``, called when an attempt raises.

        ``outcome.kind`` is ``retried`` (it will run again) or ``failed`` (a
        dead letter); ``outcome.exception`` is what it raised. Plain or async;
        its exceptions are logged and change nothing.
        """
        self.registry.hooks.add_failure(fn)
        return fn

    def middleware(self, fn: JobMiddleware) -> JobMiddleware:
        """Register ``async fn(ctx: JobContext, call_next)`` around each task call.

        ``await call_next()`` runs the rest of the chain and the task, and
        returns the task's value, which the middleware returns (or replaces).
        The first registered is the outermost. Exceptions raised by the
        middleware fail the attempt like the task's own.
        """
        self.registry.hooks.add_middleware(fn)
        return fn

    def enqueue_middleware(self, fn: EnqueueMiddleware) -> EnqueueMiddleware:
        """Register ``async fn(ctx: EnqueueContext, call_next)`` around each enqueue.

        It runs in the producer, after the arguments were checked and before
        the jobs are written; ``await call_next()`` writes them and fills in
        ``ctx.job_ids``. It may add JSON values to ``ctx.meta``, which every
        job of the call carries. Cron jobs do not pass through it.
        """
        self.registry.hooks.add_enqueue(fn)
        return fn
