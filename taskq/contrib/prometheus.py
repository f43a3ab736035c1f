"""Prometheus metrics for taskq: job outcomes and durations, claims, rescues, queue depth.

```python
from taskq.contrib.prometheus import TaskqMetrics

metrics = TaskqMetrics(app)              # before workers start
metrics.start_http_server(9108)          # standalone worker: its own /metrics endpoint
async with metrics.refreshing():         # queue depth, read from Postgres every 15 s
    await app.run_worker()
```

Job metrics come from hooks registered on the App, so they describe the jobs
that this process runs or enqueues; scrape every process. Queue depth comes
from one query over the live jobs table per refresh, so it describes the
whole cluster and needs the refresher in one process (or in each, it is cheap).

Needs the ``metrics`` extra (``pip install 'taskq-pg[metrics]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_asgi_app,
)
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from .. import _admin
from .._app import App
from .._errors import ConfigurationError
from .._hooks import CallNext, EnqueueContext, JobContext, JobOutcome, OutcomeKind

__all__ = [
    "CLAIM_BUCKETS",
    "DEFAULT_REFRESH_INTERVAL",
    "JOB_DURATION_BUCKETS",
    "MetricsServer",
    "TaskqMetrics",
]

log = logging.getLogger("taskq.metrics")

#: Seconds between two reads of the queue depth from Postgres.
DEFAULT_REFRESH_INTERVAL = 15.0
#: Bucket bounds (seconds) of the job duration histogram: background jobs run
#: from a millisecond (a no-op) to many minutes (a report).
JOB_DURATION_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)
#: Bucket bounds (seconds) of the claim histogram: one claim statement takes
#: well under a millisecond on an idle database; slow ones mean contention.
CLAIM_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
#: Every outcome an attempt can have; each (task, queue) series starts with all
#: of them at 0, so that ``rate()`` sees the first increment of each.
#: Key in ``JobContext.state`` marking an attempt counted as running.
_RUNNING_KEY = "taskq.metrics.running"

OUTCOMES: tuple[OutcomeKind, ...] = typing.get_args(OutcomeKind)
#: Longest one queue-depth read may take before it is abandoned.
REFRESH_TIMEOUT_SECONDS = 10.0


class _JobSeries:
    """The children of the labelled metrics of one (task, queue): label lookups, done once."""

    __slots__ = ("duration", "outcomes", "running")

    def __init__(self, metrics: TaskqMetrics, task: str, queue: str) -> None:
        self.duration = metrics._duration.labels(task, queue)
        self.running = metrics._running.labels(task, queue)
        self.outcomes = {kind: metrics._jobs.labels(task, queue, kind) for kind in OUTCOMES}


@dataclass(frozen=True, slots=True)
class _QueueRow:
    queued: int
    scheduled: int
    running: int
    paused: bool
    lag: float
    waiting: int = 0


class _QueueCollector:
    """Reports the last queue-depth snapshot; the refresher replaces it."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self.rows: dict[str, _QueueRow] = {}
        self.updated: float | None = None
        # Queues seen once keep being reported (at 0 when they have no live
        # job), so that their series do not vanish from graphs and alerts.
        self._known: set[str] = set()

    def replace(self, rows: dict[str, _QueueRow], when: float) -> None:
        self._known.update(rows)
        self.rows = rows
        self.updated = when

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        p = self._prefix
        return (
            GaugeMetricFamily(
                f"{p}queue_jobs",
                "Live jobs per queue and state: queued (due now), scheduled (due later: "
                "delayed jobs and retries waiting for their backoff), running, waiting "
                "(workflow steps waiting for their parents) (cluster-wide).",
                labels=["queue", "state"],
            ),
            GaugeMetricFamily(
                f"{p}queue_lag_seconds",
                "Seconds the oldest due job of the queue has waited to start (0 if none waits).",
                labels=["queue"],
            ),
            GaugeMetricFamily(
                f"{p}queue_paused", "1 if the queue is paused, else 0.", labels=["queue"]
            ),
            GaugeMetricFamily(
                f"{p}queue_stats_timestamp_seconds",
                "Unix time of the last successful read of the queue depth.",
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        jobs, lag, paused, stamp = self._families()
        rows = self.rows
        empty = _QueueRow(0, 0, 0, False, 0.0)
        for queue in sorted(self._known):
            row = rows.get(queue, empty)
            jobs.add_metric([queue, "queued"], row.queued)
            jobs.add_metric([queue, "scheduled"], row.scheduled)
            jobs.add_metric([queue, "running"], row.running)
            jobs.add_metric([queue, "waiting"], row.waiting)
            lag.add_metric([queue], row.lag)
            paused.add_metric([queue], 1.0 if row.paused else 0.0)
        if self.updated is not None:
            stamp.add_metric([], self.updated)
        return (jobs, lag, paused, stamp)


class _Observer:
    """What the workers report besides job outcomes (see ``taskq._hooks.WorkerObserver``)."""

    def __init__(self, metrics: TaskqMetrics) -> None:
        self.owner = metrics
        self._claim_seconds = metrics._claim_duration.observe
        self._claimed = metrics._claimed.inc
        self._requeued = metrics._rescued.labels("requeued").inc
        self._ended = metrics._rescued.labels("ended").inc

    def claimed(self, seconds: float, count: int) -> None:
        self._claim_seconds(seconds)
        if count:
            self._claimed(count)

    def rescued(self, requeued: int, ended: int) -> None:
        if requeued:
            self._requeued(requeued)
        if ended:
            self._ended(ended)


class MetricsServer:
    """The HTTP server of :meth:`TaskqMetrics.start_http_server`, running in a thread.

    Attributes:
        host: the address it listens on.
        port: the port it listens on (the one the system chose, if 0 was asked).
    """

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host: str = str(server.server_address[0])
        self.port: int = int(server.server_address[1])

    def __repr__(self) -> str:
        return f"<taskq MetricsServer http://{self.host}:{self.port}/metrics>"

    def close(self) -> None:
        """Stop serving and free the port (blocks up to half a second)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TaskqMetrics:
    """Prometheus metrics of one taskq App.

    Creating it registers hooks on the App (create it before its workers
    start): a ``before_job`` and an ``after_job`` hook track running jobs,
    count outcomes and observe durations, an enqueue middleware counts
    enqueued jobs, and a worker observer times claims and counts rescues. Label lookups
    are cached per (task, queue), so a job costs a few dictionary lookups and
    four metric updates.

    Queue depth needs the database: run :meth:`refreshing` (or
    :meth:`start` / :meth:`stop`) for it, in a web app's lifespan or beside a
    worker.

    Args:
        app: the App to observe. One ``TaskqMetrics`` per App.
        registry: the ``CollectorRegistry`` to register in. By default a new
            one of its own, so that several Apps in one process never clash;
            pass ``prometheus_client.REGISTRY`` to serve taskq's metrics with
            the process's other ones.
        namespace: prefix of every metric name (``taskq_jobs_total``...); ``""``
            for none.
        refresh_interval: seconds between two reads of the queue depth.
        duration_buckets: bucket bounds of ``taskq_job_duration_seconds``
            (default :data:`JOB_DURATION_BUCKETS`, 1 ms to 30 minutes).

    Attributes:
        app: the App observed.
        registry: the registry holding the metrics (serve it, or read it in tests).
    """

    def __init__(
        self,
        app: App,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = "taskq",
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        duration_buckets: Sequence[float] = JOB_DURATION_BUCKETS,
    ) -> None:
        if not isinstance(app, App):
            raise ConfigurationError(f"TaskqMetrics needs a taskq.App, got {app!r}")
        if any(isinstance(o, _Observer) for o in app.registry.hooks.observers):
            raise ConfigurationError(
                f"{app!r} already has a TaskqMetrics; create one per App (its jobs would "
                "be counted twice)"
            )
        if (
            not isinstance(refresh_interval, int | float)
            or isinstance(refresh_interval, bool)
            or not refresh_interval > 0
        ):
            raise ConfigurationError(
                f"refresh_interval must be a positive number of seconds, got {refresh_interval!r}"
            )
        self.app = app
        self.registry = CollectorRegistry() if registry is None else registry
        self.refresh_interval = float(refresh_interval)
        ns = namespace
        reg = self.registry
        self._jobs = Counter(
            "jobs",
            "Job attempts that ended in this process, by outcome: succeeded, retried (failed, "
            "will run again), failed (failed for good: a dead letter), cancelled, released "
            "(interrupted by shutdown, back in the queue).",
            ["task", "queue", "outcome"],
            namespace=ns,
            registry=reg,
        )
        self._duration = Histogram(
            "job_duration_seconds",
            "Seconds each job attempt ran in this process (hooks included), whatever its outcome.",
            ["task", "queue"],
            namespace=ns,
            registry=reg,
            buckets=tuple(duration_buckets),
        )
        self._running = Gauge(
            "jobs_running",
            "Jobs running their task in this process now.",
            ["task", "queue"],
            namespace=ns,
            registry=reg,
        )
        self._enqueued = Counter(
            "enqueued",
            "Jobs enqueued from this process (cron jobs excepted).",
            ["task", "queue"],
            namespace=ns,
            registry=reg,
        )
        self._claim_duration = Histogram(
            "claim_duration_seconds",
            "Seconds each claim statement of this process's workers took (empty claims "
            "included; a claim also writes back the outcomes finished since the last one).",
            namespace=ns,
            registry=reg,
            buckets=CLAIM_BUCKETS,
        )
        self._claimed = Counter(
            "jobs_claimed",
            "Jobs claimed by this process's workers.",
            namespace=ns,
            registry=reg,
        )
        self._rescued = Counter(
            "jobs_rescued",
            "Jobs whose lease expired (their worker died or was cut off), found by this "
            "process's workers: requeued to run again, or ended (no attempt left, poison, "
            "or being cancelled).",
            ["result"],
            namespace=ns,
            registry=reg,
        )
        self._queues = _QueueCollector(f"{ns}_" if ns else "")
        reg.register(self._queues)

        self._series: dict[tuple[str, str], _JobSeries] = {}
        self._enqueue_series: dict[tuple[str, str], Any] = {}
        self._query = _admin.statements(app.schema).queue_depth
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._failing = False
        self._started = False

        app.before_job(self._before_job)
        app.after_job(self._after_job)
        app.enqueue_middleware(self._count_enqueued)
        app.registry.hooks.observers.append(_Observer(self))

    def __repr__(self) -> str:
        return f"<taskq.contrib.prometheus.TaskqMetrics {self.app!r}>"

    # -- hooks: the per-job path -------------------------------------------------

    def _job_series(self, task: str, queue: str) -> _JobSeries:
        series = self._series.get((task, queue))
        if series is None:
            series = self._series[task, queue] = _JobSeries(self, task, queue)
        return series

    def _before_job(self, ctx: JobContext) -> None:
        self._job_series(ctx.task, ctx.queue).running.inc()
        # After-job hooks run for every attempt, even one whose earlier
        # before-job hook raised: only what was counted is taken back.
        ctx.state[_RUNNING_KEY] = True

    def _after_job(self, ctx: JobContext, outcome: JobOutcome) -> None:
        series = self._job_series(ctx.task, ctx.queue)
        if ctx.state.pop(_RUNNING_KEY, False):
            series.running.dec()
        series.duration.observe(outcome.duration)
        series.outcomes[outcome.kind].inc()

    async def _count_enqueued(self, ctx: EnqueueContext, call_next: CallNext) -> Any:
        result = await call_next()
        if ctx.duplicate:  # a unique enqueue whose key was taken wrote nothing
            return result
        counter = self._enqueue_series.get((ctx.task, ctx.queue))
        if counter is None:
            counter = self._enqueue_series[ctx.task, ctx.queue] = self._enqueued.labels(
                ctx.task, ctx.queue
            )
        counter.inc(ctx.count)
        return result

    # -- queue depth ---------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the queue depth from Postgres now (the App must be open).

        One query over the live jobs table and the queue settings; history is
        not read. :meth:`refreshing` calls it every ``refresh_interval``.

        Raises:
            taskq.DatabaseError: Postgres could not be read.
            taskq.ConfigurationError: the App is not open.
        """
        async with self.app.database.acquire("reading queue depth") as conn:
            records = await conn.fetch(self._query)
        rows = {
            r["queue"]: _QueueRow(
                queued=int(r["queued"]),
                scheduled=int(r["scheduled"]),
                running=int(r["running"]),
                paused=bool(r["paused"]),
                lag=max(0.0, float(r["lag"] or 0.0)),
                waiting=int(r["waiting"]),
            )
            for r in records
        }
        self._queues.replace(rows, time.time())

    @contextlib.asynccontextmanager
    async def refreshing(self) -> AsyncIterator[TaskqMetrics]:
        """Keep the queue depth fresh while the block runs.

        Opens the App for the block's duration (one more user if it is open
        already) and reads the queue depth once before the block starts, then
        every ``refresh_interval`` seconds in a background task. A failed read
        is logged and tried again at the next interval;
        ``taskq_queue_stats_timestamp_seconds`` tells how old the numbers are.
        On exit the task ends and the App is closed again, so the block can be
        entered any number of times::

            async with app.worker(), metrics.refreshing():
                ...
        """
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    async def start(self) -> None:
        """Start refreshing the queue depth in the background (see :meth:`refreshing`).

        For frameworks with separate startup and shutdown callbacks; each
        ``start()`` needs its :meth:`stop`.

        Raises:
            taskq.ConfigurationError: it is refreshing already.
        """
        if self._started:
            raise ConfigurationError("these metrics are refreshing already; stop() them first")
        self._started = True
        try:
            await self.app.open()
        except BaseException:
            self._started = False
            raise
        try:
            # The first read before returning: a scrape right after sees numbers.
            await self._refresh_logged()
        except BaseException:  # cancelled meanwhile
            self._started = False
            await self.app.close()
            raise
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._refresh_loop(self._stop), name=f"taskq metrics refresher ({self.app.schema})"
        )

    async def stop(self) -> None:
        """Stop refreshing the queue depth and close the App opened by :meth:`start`.

        A read under way is let finish (it is bounded) rather than cancelled,
        which would close its connection. The last numbers read stay
        reported. Does nothing if not started.
        """
        task, self._task = self._task, None
        if task is None:
            return
        self._started = False
        self._stop.set()
        try:
            await asyncio.wait({task}, timeout=REFRESH_TIMEOUT_SECONDS)
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        finally:
            if not task.done():  # we were cancelled while waiting
                task.cancel()
            await self.app.close()

    async def _refresh_logged(self) -> None:
        """Read the queue depth; log a failure (once per run of failures) instead of raising."""
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT_SECONDS):
                await self.refresh()
        except Exception as exc:  # the host app must not suffer from a metrics failure
            if not self._failing:
                log.warning(
                    "cannot read the queue depth for metrics: %s (trying again every %.0fs)",
                    exc,
                    self.refresh_interval,
                )
            self._failing = True
        else:
            if self._failing:
                log.info("reading the queue depth for metrics works again")
            self._failing = False

    async def _refresh_loop(self, stop: asyncio.Event) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_interval):
                    await stop.wait()
            if stop.is_set():
                return
            await self._refresh_logged()

    # -- serving -------------------------------------------------------------------

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The metrics in the Prometheus text format, for any web framework.

        Args:
            accept: the request's ``Accept`` header; OpenMetrics is returned when
                it asks for it, the Prometheus text format otherwise.

        Returns:
            ``(body, content_type)``, to send as the response.
        """
        if accept:
            encoder, content_type = choose_encoder(accept)
            return encoder(self.registry), content_type
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def asgi_app(self) -> Callable[..., Any]:
        """An ASGI app serving the metrics, to mount in FastAPI or Starlette.

        ``api.mount("/metrics", metrics.asgi_app())``
        """
        app: Callable[..., Any] = make_asgi_app(registry=self.registry)
        return app

    def start_http_server(self, port: int, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve the metrics over HTTP from a thread, for a standalone worker.

        Args:
            port: the port to listen on; 0 lets the system choose (see
                :attr:`MetricsServer.port`).
            addr: the address to listen on; ``"0.0.0.0"`` for every interface.

        Returns:
            The running server; :meth:`MetricsServer.close` stops it.
        """
        server, thread = _start_http_server(port, addr, registry=self.registry)
        return MetricsServer(server, thread)
