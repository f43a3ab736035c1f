"""OpenTelemetry tracing for taskq: a job's run joins the trace that enqueued it.

```python
from taskq.contrib.opentelemetry import instrument

instrument(app)     # before workers start; uses the global tracer provider
```

Each enqueue makes a PRODUCER span ``enqueue {task}`` and writes the trace
context (W3C ``traceparent``, plus ``tracestate`` and ``baggage`` when set) into
the job's ``meta``. Each attempt runs under a CONSUMER span ``run {task}``
whose parent is that context, so the run shows up in the request's trace,
however long after and on whichever host it runs. The span is current while
the task runs: spans the task starts (HTTP clients, database drivers, your
own) nest under it, in sync tasks run in threads too.

Needs the ``otel`` extra (``pip install 'taskq-pg[otel]'``) and, to export spans,
the OpenTelemetry SDK or a distribution that sets it up.
"""

from __future__ import annotations

import asyncio
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from .. import __version__
from .._app import App
from .._errors import ConfigurationError
from .._hooks import CallNext, EnqueueContext, JobContext

__all__ = ["MAX_ID_ATTRIBUTES", "TaskqInstrumentation", "instrument"]

#: ``messaging.system`` of every span.
MESSAGING_SYSTEM = "taskq"
#: An enqueue of more jobs than this (``enqueue_many``) records their count,
#: not their ids, so that a bulk enqueue does not make a huge span.
MAX_ID_ATTRIBUTES = 100


class TaskqInstrumentation:
    """Tracing hooks registered on one App, made by :func:`instrument`.

    Attributes:
        app: the instrumented App.
        tracer: the tracer that makes taskq's spans.
    """

    def __init__(
        self,
        app: App,
        tracer: trace.Tracer,
        propagator: TextMapPropagator | None,
    ) -> None:
        self.app = app
        self.tracer = tracer
        self._propagator = propagator
        self._installed = False

    def __repr__(self) -> str:
        state = "installed" if self._installed else "removed"
        return f"<taskq.contrib.opentelemetry.TaskqInstrumentation {self.app!r} {state}>"

    def _install(self) -> None:
        self.app.enqueue_middleware(self._trace_enqueue)
        self.app.middleware(self._trace_run)
        self._installed = True

    def uninstrument(self) -> None:
        """Remove the tracing hooks: jobs enqueued or started from now on are not traced."""
        hooks = self.app.registry.hooks
        # Bound methods compare equal, not identical, to themselves.
        hooks.enqueue[:] = [m for m in hooks.enqueue if m != self._trace_enqueue]
        hooks.middleware[:] = [m for m in hooks.middleware if m != self._trace_run]
        self._installed = False

    def _inject(self, carrier: dict[str, Any]) -> None:
        if self._propagator is None:
            propagate.inject(carrier)
        else:
            self._propagator.inject(carrier)

    def _extract(self, carrier: dict[str, Any]) -> Any:
        if self._propagator is None:
            return propagate.extract(carrier)
        return self._propagator.extract(carrier)

    async def _trace_enqueue(self, ctx: EnqueueContext, call_next: CallNext) -> Any:
        attributes: dict[str, Any] = {
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "send",
            "messaging.operation.name": "enqueue",
            "messaging.destination.name": ctx.queue,
            "taskq.task": ctx.task,
            "taskq.in_transaction": ctx.in_transaction,
        }
        if ctx.count != 1:
            attributes["messaging.batch.message_count"] = ctx.count
        with self.tracer.start_as_current_span(
            f"enqueue {ctx.task}", kind=SpanKind.PRODUCER, attributes=attributes
        ) as span:
            # The producer span is current: the jobs' runs become its children.
            self._inject(ctx.meta)
            result = await call_next()
            ids = ctx.job_ids
            if len(ids) == 1:
                span.set_attribute("messaging.message.id", str(ids[0]))
            elif len(ids) <= MAX_ID_ATTRIBUTES:
                span.set_attribute("taskq.job.ids", ids)
            return result

    async def _trace_run(self, ctx: JobContext, call_next: CallNext) -> Any:
        parent = self._extract(ctx.meta) if ctx.meta else None
        span = self.tracer.start_span(
            f"run {ctx.task}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": MESSAGING_SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "run",
                "messaging.destination.name": ctx.queue,
                "messaging.message.id": str(ctx.id),
                "messaging.client.id": ctx.worker_id,
                "taskq.task": ctx.task,
                "taskq.job.attempt": ctx.attempt,
                "taskq.job.max_attempts": ctx.max_attempts,
            },
        )
        # Exceptions are handled here rather than by use_span: a cancelled job
        # (shutdown, job.cancel()) is not an error of the task.
        with trace.use_span(
            span, end_on_exit=True, record_exception=False, set_status_on_exception=False
        ):
            try:
                return await call_next()
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                raise
            except asyncio.CancelledError:
                span.set_attribute("taskq.job.interrupted", True)
                raise


def instrument(
    app: App,
    *,
    tracer_provider: TracerProvider | None = None,
    propagator: TextMapPropagator | None = None,
) -> TaskqInstrumentation:
    """Trace the App's enqueues and job runs with OpenTelemetry.

    Call it once per App, before its workers start and before the code that
    enqueues runs (jobs enqueued untraced run as traces of their own).

    Args:
        app: the App to trace.
        tracer_provider: where spans go; ``None`` uses the global provider
            (``opentelemetry.trace.set_tracer_provider``), even one set later.
        propagator: how the trace context is written into a job's ``meta`` and
            read back; ``None`` uses the global propagator (W3C trace context
            and baggage unless configured otherwise).

    Returns:
        The installed instrumentation; its ``uninstrument()`` removes it.

    Raises:
        taskq.ConfigurationError: the App is instrumented already.
    """
    if not isinstance(app, App):
        raise ConfigurationError(f"instrument() needs a taskq.App, got {app!r}")
    hooks = app.registry.hooks
    for fn in (*hooks.enqueue, *hooks.middleware):
        if isinstance(getattr(fn, "__self__", None), TaskqInstrumentation):
            raise ConfigurationError(f"{app!r} is traced already; instrument it once")
    tracer = trace.get_tracer("taskq", __version__, tracer_provider=tracer_provider)
    instrumentation = TaskqInstrumentation(app, tracer, propagator)
    instrumentation._install()
    return instrumentation
