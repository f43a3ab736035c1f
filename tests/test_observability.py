"""Observability: hooks as the guide shows them, Prometheus metrics, OpenTelemetry traces.

Metrics are read the way Prometheus reads them: over real HTTP (the built-in
server, an aiohttp route, a FastAPI mount under uvicorn), parsed with
prometheus_client's own parser. Traces go to the SDK's in-memory exporter
through a tracer provider passed explicitly (the global one can be set only
once per process).

The code between ``--8<--`` markers is shown in docs/guides/observability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
import uvicorn
from aiohttp import web
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

import taskq
from taskq.contrib.opentelemetry import instrument
from taskq.contrib.prometheus import TaskqMetrics

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# --8<-- [start:hooks]
log = logging.getLogger("myapp.jobs")

#: The id of the web request being served (your web framework's middleware sets it).
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
#: The job being run, for code deep inside a task.
current_job: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "current_job", default=None
)


async def pass_request_id(
    ctx: taskq.EnqueueContext, call_next: Callable[[], Awaitable[Any]]
) -> Any:
    """Enqueue middleware: each job carries the id of the request that enqueued it."""
    rid = request_id.get()
    if rid is not None:
        ctx.meta["request_id"] = rid
    return await call_next()


def set_current_job(ctx: taskq.JobContext) -> None:
    """before_job: runs in the job's own asyncio task, so the task sees the variable."""
    current_job.set(ctx.id)


async def restore_request_id(ctx: taskq.JobContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
    """Job middleware: while the task runs, request_id is that of the enqueuing request."""
    token = request_id.set(ctx.meta.get("request_id"))
    try:
        return await call_next()
    finally:
        request_id.reset(token)


def log_outcome(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
    """after_job: one line per attempt, whatever its outcome."""
    log.info(
        "%s %s: %s in %.3fs",
        ctx.task,
        ctx.id,
        outcome.kind,
        outcome.duration,
        extra={"job_id": ctx.id, "request_id": ctx.meta.get("request_id")},
    )


def alert_on_dead_letter(ctx: taskq.JobContext, outcome: taskq.JobOutcome) -> None:
    """on_failure: called for retried and failed attempts; alert on the last one only."""
    if outcome.kind == "failed":
        log.error(
            "job %s (%s) failed for good: %r",
            ctx.id,
            ctx.task,
            outcome.exception,
            extra={"job_id": ctx.id},
        )


def install_hooks(app: taskq.App) -> None:
    app.enqueue_middleware(pass_request_id)
    app.before_job(set_current_job)
    app.middleware(restore_request_id)
    app.after_job(log_outcome)
    app.on_failure(alert_on_dead_letter)


# --8<-- [end:hooks]


# --8<-- [start:standalone]
async def run_worker_with_metrics(jobs: taskq.App, port: int = 9108) -> None:
    metrics = TaskqMetrics(jobs)  # before the worker starts
    server = metrics.start_http_server(port, addr="0.0.0.0")
    try:
        async with metrics.refreshing():
            await jobs.run_worker(concurrency=20)  # until SIGTERM or SIGINT
    finally:
        server.close()


# --8<-- [end:standalone]


# --8<-- [start:fastapi]
def create_api(jobs: taskq.App, metrics: TaskqMetrics) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        # A worker beside the web app, and the queue depth read every 15 s.
        async with jobs.worker(concurrency=10), metrics.refreshing():
            yield

    api = FastAPI(lifespan=lifespan)
    api.mount("/metrics", metrics.asgi_app())  # scraped at /metrics/
    return api


# --8<-- [end:fastapi]


# --8<-- [start:aiohttp]
def add_metrics_route(web_app: web.Application, metrics: TaskqMetrics) -> None:
    async def serve_metrics(request: web.Request) -> web.Response:
        body, content_type = metrics.render(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    web_app.router.add_get("/metrics", serve_metrics)


# --8<-- [end:aiohttp]


# -- helpers --------------------------------------------------------------------------


def parse(text: str) -> Samples:
    """Every sample of a scrape by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def rendered(metrics: TaskqMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return parse(body.decode())


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient(timeout=20) as client:
        response = await client.get(url, follow_redirects=True)
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def listening_socket() -> socket.socket:
    # Listening before the server starts: a request made meanwhile waits in the
    # backlog instead of being refused, so nobody polls for readiness.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


async def claim(app: taskq.App, *, limit: int, lease_seconds: float, queues: Any = None) -> Any:
    """Claim jobs as a worker named "elsewhere" would (it never finishes them)."""
    async with app.pool.acquire() as c:
        result = await app.store.claim(
            c,
            queues=queues,
            tasks=list(app.tasks),
            limit=limit,
            worker_id="elsewhere",
            lease_seconds=lease_seconds,
        )
    return result.jobs


# -- hooks ----------------------------------------------------------------------------


async def test_hook_examples_of_the_guide(app: taskq.App, caplog: pytest.LogCaptureFixture) -> None:
    install_hooks(app)
    seen: dict[str, tuple[int | None, str | None]] = {}

    @app.task(name="greet")
    async def greet() -> None:
        seen["async"] = (current_job.get(), request_id.get())

    @app.task(name="greet_sync")
    def greet_sync() -> None:
        seen["sync"] = (current_job.get(), request_id.get())

    @app.task(name="crash", retry=taskq.Retry(attempts=2, wait=0))
    async def crash() -> None:
        raise LookupError("gone")

    caplog.set_level(logging.INFO, logger="myapp.jobs")
    async with app:
        token = request_id.set("req-42")
        try:
            a = await greet.enqueue()
            s = await greet_sync.enqueue()
        finally:
            request_id.reset(token)
        c = await crash.enqueue()  # outside any request
        await app.drain()
        assert (await a.status()).meta == {"request_id": "req-42"}
        assert (await c.status()).meta == {}

    # before_job's variable and the middleware's reach the task, in a thread too.
    assert seen == {"async": (a.id, "req-42"), "sync": (s.id, "req-42")}
    records = [r for r in caplog.records if r.name == "myapp.jobs"]
    lines = sorted((r.job_id, r.levelname, r.getMessage().split(" in ")[0]) for r in records)  # type: ignore[attr-defined]
    assert lines == sorted(
        [
            (a.id, "INFO", f"greet {a.id}: succeeded"),
            (s.id, "INFO", f"greet_sync {s.id}: succeeded"),
            (c.id, "INFO", f"crash {c.id}: retried"),
            (c.id, "INFO", f"crash {c.id}: failed"),
            (c.id, "ERROR", f"job {c.id} (crash) failed for good: LookupError('gone')"),
        ]
    )
    assert {r.request_id for r in records if r.levelname == "INFO"} == {"req-42", None}  # type: ignore[attr-defined]


# -- Prometheus -------------------------------------------------------------------------


async def test_metrics_count_every_outcome_and_are_scraped_over_http(app: taskq.App) -> None:
    metrics = TaskqMetrics(app)
    tries = 0
    started = {"victim": anyio.Event(), "sleeper": anyio.Event()}

    @app.task(name="ok", queue="q1")
    async def ok(n: int) -> int:
        return n

    @app.task(name="flaky", retry=taskq.Retry(attempts=3, wait=0))
    async def flaky() -> str:
        nonlocal tries
        tries += 1
        if tries == 1:
            raise RuntimeError("the first attempt fails")
        return "done"

    @app.task(name="doomed", retry=taskq.Retry(attempts=2, wait=0))
    async def doomed() -> None:
        raise ValueError("never works")

    @app.task(name="blocker")
    async def blocker(which: str) -> None:
        started[which].set()
        await anyio.sleep_forever()

    async with app:
        await ok.enqueue_many([{"n": i} for i in range(3)])
        await flaky.enqueue()
        await doomed.enqueue()
        drained = await app.drain()
        assert (drained.succeeded, drained.retried, drained.failed) == (4, 2, 1)

        async with app.worker(shutdown_timeout=0) as worker:
            victim = await blocker.enqueue(which="victim")
            sleeper = await blocker.enqueue(which="sleeper")
            with anyio.fail_after(20):
                await started["victim"].wait()
                await started["sleeper"].wait()
            running = rendered(metrics)
            assert value(running, "taskq_jobs_running", task="blocker", queue="default") == 2
            await victim.cancel()
            with pytest.raises(taskq.JobCancelled):
                await victim.result(timeout=20)
        # shutdown_timeout=0: the sleeper went back to the queue at once.
        assert (await sleeper.status()).state is taskq.JobState.QUEUED

    server = metrics.start_http_server(0)
    try:
        samples = await scrape(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        await anyio.to_thread.run_sync(server.close)

    def jobs(task: str, queue: str = "default") -> dict[str, float | None]:
        return {
            kind: value(samples, "taskq_jobs_total", task=task, queue=queue, outcome=kind)
            for kind in ("succeeded", "retried", "failed", "cancelled", "released")
        }

    zero = dict.fromkeys(("succeeded", "retried", "failed", "cancelled", "released"), 0.0)
    assert jobs("ok", "q1") == {**zero, "succeeded": 3}
    assert jobs("flaky") == {**zero, "retried": 1, "succeeded": 1}
    assert jobs("doomed") == {**zero, "retried": 1, "failed": 1}
    assert jobs("blocker") == {**zero, "cancelled": 1, "released": 1}

    attempts = {("ok", "q1"): 3, ("flaky", "default"): 2, ("doomed", "default"): 2}
    attempts[("blocker", "default")] = 2
    for (task, queue), count in attempts.items():
        labels = {"task": task, "queue": queue}
        assert value(samples, "taskq_job_duration_seconds_count", **labels) == count
        assert value(samples, "taskq_job_duration_seconds_bucket", le="+Inf", **labels) == count
        assert value(samples, "taskq_jobs_running", **labels) == 0

    assert value(samples, "taskq_enqueued_total", task="ok", queue="q1") == 3
    assert value(samples, "taskq_enqueued_total", task="flaky", queue="default") == 1
    assert value(samples, "taskq_enqueued_total", task="blocker", queue="default") == 2

    # Every claim statement is timed, empty ones included; claimed jobs are counted.
    claims = drained.claims + worker.stats.claims
    assert claims > 0
    assert value(samples, "taskq_claim_duration_seconds_count") == claims
    assert value(samples, "taskq_jobs_claimed_total") == 9 == drained.claimed + worker.stats.claimed
    assert value(samples, "taskq_jobs_rescued_total", result="requeued") == 0  # none yet


async def test_queue_depth_by_state_served_from_an_aiohttp_route(app: taskq.App) -> None:
    metrics = TaskqMetrics(app)

    @app.task(name="work", queue="x")
    async def work() -> None:
        return None

    async with app:
        await work.enqueue_many([{}] * 3)
        await work.options(delay=3600).enqueue_many([{}] * 2)
        await work.options(queue="y").enqueue_many([{}] * 2)
        (held,) = await claim(app, limit=1, lease_seconds=600, queues=["y"])
        assert held.queue == "y"
        await work.options(queue="held").enqueue()
        await app.queue("held").pause()
        await app.queue("quiet").configure(concurrency_limit=5)  # settings, no jobs
        # A workflow step waiting for its parent: counted as waiting, not queued.
        wf = taskq.Workflow()
        wf.add(work.options(queue="y"), after=[wf.add(work.options(queue="held"))])
        await wf.enqueue()
        await metrics.refresh()

        web_app = web.Application()
        add_metrics_route(web_app, metrics)
        runner = web.AppRunner(web_app)
        await runner.setup()
        sock = listening_socket()
        try:
            await web.SockSite(runner, sock).start()
            url = "http://{}:{}/metrics".format(*sock.getsockname())
            samples = await scrape(url)

            def depth(queue: str) -> dict[str, float | None]:
                return {
                    state: value(samples, "taskq_queue_jobs", queue=queue, state=state)
                    for state in ("queued", "scheduled", "running", "waiting")
                }

            assert depth("x") == {"queued": 3, "scheduled": 2, "running": 0, "waiting": 0}
            assert depth("y") == {"queued": 1, "scheduled": 0, "running": 1, "waiting": 1}
            assert depth("held") == {"queued": 2, "scheduled": 0, "running": 0, "waiting": 0}
            assert depth("quiet") == {"queued": 0, "scheduled": 0, "running": 0, "waiting": 0}
            paused = {
                q: value(samples, "taskq_queue_paused", queue=q)
                for q in ("x", "y", "held", "quiet")
            }
            assert paused == {"x": 0, "y": 0, "held": 1, "quiet": 0}
            lag_x = value(samples, "taskq_queue_lag_seconds", queue="x")
            assert lag_x is not None and lag_x >= 0
            assert value(samples, "taskq_queue_lag_seconds", queue="quiet") == 0
            assert (value(samples, "taskq_queue_stats_timestamp_seconds") or 0) > 0

            # A queue that empties is still reported, at 0, after the next refresh.
            await app.drain(queues=["x"])
            await metrics.refresh()
            samples = await scrape(url)
            assert depth("x") == {"queued": 0, "scheduled": 2, "running": 0, "waiting": 0}
            assert value(samples, "taskq_queue_lag_seconds", queue="x") == 0
        finally:
            await runner.cleanup()
            sock.close()


async def test_refresher_runs_in_the_background_and_leaks_nothing(
    app: taskq.App, conn: asyncpg.Connection
) -> None:
    metrics = TaskqMetrics(app, refresh_interval=0.05)

    @app.task(name="work")
    async def work() -> None:
        return None

    async def connections() -> int:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                f"taskq ({app.schema})",
            )
        )

    async with app:
        tasks_before = len(asyncio.all_tasks())
        connections_before = await connections()

        async with metrics.refreshing():
            await work.enqueue_many([{}] * 4)
            # The background task picks the new jobs up by itself.
            with anyio.fail_after(20):
                while (
                    value(rendered(metrics), "taskq_queue_jobs", queue="default", state="queued")
                    != 4
                ):
                    await anyio.sleep(0.01)

        for i in range(100):
            async with metrics.refreshing():
                if i % 10 == 0:
                    # Let the background task read once more before stopping it.
                    first = value(rendered(metrics), "taskq_queue_stats_timestamp_seconds")
                    with anyio.fail_after(20):
                        while (
                            value(rendered(metrics), "taskq_queue_stats_timestamp_seconds") == first
                        ):
                            await anyio.sleep(0.005)
        await metrics.start()
        with pytest.raises(taskq.ConfigurationError):
            await metrics.start()
        await metrics.stop()
        await metrics.stop()  # stopping twice is harmless

        assert len(asyncio.all_tasks()) == tasks_before
        assert await connections() == connections_before
        assert app.is_open  # the refresher's own opens were all closed again
    assert not app.is_open


async def test_rescued_jobs_are_counted(app: taskq.App) -> None:
    metrics = TaskqMetrics(app)

    @app.task(name="again", retry=taskq.Retry(attempts=3, wait=0))
    async def again() -> str:
        return "done"

    @app.task(name="once", retry=False)
    async def once() -> None:
        return None

    async with app:
        requeued = await again.enqueue()
        ended = await once.enqueue()
        # Claimed by a worker that vanished: their leases have run out already.
        assert len(await claim(app, limit=2, lease_seconds=-1)) == 2
        async with app.worker(lease_seconds=1.0):
            assert await requeued.result(timeout=20) == "done"
            with pytest.raises(taskq.JobFailed) as failed:
                await ended.result(timeout=20)
        assert failed.value.error_type == "taskq.LeaseExpired"

    samples = rendered(metrics)
    assert value(samples, "taskq_jobs_rescued_total", result="requeued") == 1
    assert value(samples, "taskq_jobs_rescued_total", result="ended") == 1
    # The requeued job then ran here; the ended one never did.
    assert (
        value(samples, "taskq_jobs_total", task="again", queue="default", outcome="succeeded") == 1
    )
    assert value(samples, "taskq_job_duration_seconds_count", task="once", queue="default") is None


async def test_metrics_mounted_in_fastapi_under_uvicorn(app: taskq.App) -> None:
    metrics = TaskqMetrics(app)

    @app.task(name="hello")
    async def hello(name: str) -> str:
        return f"hello {name}"

    config = uvicorn.Config(create_api(app, metrics), lifespan="on", log_level="warning")
    server = uvicorn.Server(config)
    sock = listening_socket()
    async with app:
        job = await hello.enqueue(name="web")
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            assert await job.result(timeout=20) == "hello web"  # run by the lifespan's worker
            samples = await scrape("http://{}:{}/metrics".format(*sock.getsockname()))
        finally:
            server.should_exit = True
            await serving
            sock.close()
    assert (
        value(samples, "taskq_jobs_total", task="hello", queue="default", outcome="succeeded") == 1
    )
    assert value(samples, "taskq_enqueued_total", task="hello", queue="default") == 1
    # The lifespan's refresher read the depth before the app started serving.
    assert (value(samples, "taskq_queue_stats_timestamp_seconds") or 0) > 0


async def test_a_standalone_worker_serves_its_metrics(app: taskq.App) -> None:
    @app.task(name="hello")
    async def hello(name: str) -> str:
        return f"hello {name}"

    with socket.socket() as probe:  # a free port for the example's own server
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    async with app:
        job = await hello.enqueue(name="worker")
        running = asyncio.create_task(run_worker_with_metrics(app, port=port))
        try:
            # The server starts before the worker, so it is up once the job is done.
            assert await job.result(timeout=20) == "hello worker"
            samples = await scrape(f"http://127.0.0.1:{port}/metrics")
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    assert (
        value(samples, "taskq_jobs_total", task="hello", queue="default", outcome="succeeded") == 1
    )
    assert (value(samples, "taskq_queue_stats_timestamp_seconds") or 0) > 0


async def test_metrics_are_per_app_and_once_per_app(app: taskq.App, pg_dsn: str) -> None:
    other = taskq.App(pg_dsn, schema="other_app")
    first, second = TaskqMetrics(app), TaskqMetrics(other)  # separate registries: no clash
    assert first.registry is not second.registry
    with pytest.raises(taskq.ConfigurationError, match="already has a TaskqMetrics"):
        TaskqMetrics(app)
    with pytest.raises(taskq.ConfigurationError, match="refresh_interval"):
        TaskqMetrics(taskq.App(pg_dsn), refresh_interval=0)
    custom = TaskqMetrics(taskq.App(pg_dsn), namespace="jobs")
    names = {name for name, _ in rendered(custom)}
    assert "jobs_claim_duration_seconds_count" in names
    body, content_type = custom.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


# -- OpenTelemetry ---------------------------------------------------------------------


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{len(found)} spans named {name!r}: {[s.name for s in spans]}"
    return found[0]


def attr(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {})[key]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_a_job_run_joins_the_trace_of_the_request_that_enqueued_it(
    app: taskq.App, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    instrument(app, tracer_provider=provider)
    tracer = provider.get_tracer("test")
    tries = 0

    @app.task(name="notify", queue="mail")
    async def notify(user: int) -> int:
        with tracer.start_as_current_span("send mail"):
            return user

    @app.task(name="resize")
    def resize(width: int) -> int:  # sync: runs in a worker thread
        with tracer.start_as_current_span("resize image"):
            return width

    @app.task(name="wobbly", retry=taskq.Retry(attempts=2, wait=0))
    async def wobbly() -> None:
        nonlocal tries
        tries += 1
        if tries == 1:
            raise ConnectionError("try again")

    @app.task(name="broken", retry=False)
    async def broken() -> None:
        raise RuntimeError("boom")

    async with app:
        with tracer.start_as_current_span("POST /signup") as request:
            mail = await notify.enqueue(user=7)
            image = await resize.enqueue(width=64)
            retried = await wobbly.enqueue()
            failed = await broken.enqueue()
        # The worker runs outside the request: the runs find their trace in meta.
        assert trace.get_current_span() is trace.INVALID_SPAN
        await app.drain()
        meta = (await mail.status()).meta

    spans = list(exporter.get_finished_spans())
    trace_id = request.get_span_context().trace_id
    assert {s.context.trace_id for s in spans if s.name != "POST /signup"} == {trace_id}

    enqueue = one(spans, "enqueue notify")
    assert enqueue.kind is SpanKind.PRODUCER
    assert parent_id(enqueue) == request.get_span_context().span_id
    assert dict(enqueue.attributes or {}) == {
        "messaging.system": "taskq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "enqueue",
        "messaging.destination.name": "mail",
        "messaging.message.id": str(mail.id),
        "taskq.task": "notify",
        "taskq.in_transaction": False,
    }
    # The trace context travels in the job's meta as a W3C traceparent.
    flags = int(enqueue.context.trace_flags)
    assert flags & 1  # sampled
    assert meta["traceparent"] == f"00-{trace_id:032x}-{enqueue.context.span_id:016x}-{flags:02x}"

    run = one(spans, "run notify")
    assert run.kind is SpanKind.CONSUMER
    assert parent_id(run) == enqueue.context.span_id
    attributes = dict(run.attributes or {})
    assert attributes["messaging.destination.name"] == "mail"
    assert attributes["messaging.message.id"] == str(mail.id)
    assert attributes["taskq.job.attempt"] == 1
    assert run.status.status_code is StatusCode.UNSET
    # Spans the task makes nest under the run, in async and in thread-run tasks.
    assert parent_id(one(spans, "send mail")) == run.context.span_id
    assert parent_id(one(spans, "resize image")) == one(spans, "run resize").context.span_id
    assert parent_id(one(spans, "run resize")) == one(spans, "enqueue resize").context.span_id

    # Each attempt is a run span of its own under the same enqueue.
    wobbly_runs = sorted(
        (s for s in spans if s.name == "run wobbly"),
        key=lambda s: str(attr(s, "taskq.job.attempt")),
    )
    assert [(s.attributes or {})["taskq.job.attempt"] for s in wobbly_runs] == [1, 2]
    assert {parent_id(s) for s in wobbly_runs} == {one(spans, "enqueue wobbly").context.span_id}
    assert [s.status.status_code for s in wobbly_runs] == [StatusCode.ERROR, StatusCode.UNSET]
    assert str(retried.id) == (wobbly_runs[0].attributes or {})["messaging.message.id"]

    broken_run = one(spans, "run broken")
    assert broken_run.status.status_code is StatusCode.ERROR
    assert broken_run.status.description == "RuntimeError: boom"
    (event,) = broken_run.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.type"] == "RuntimeError"
    assert (event.attributes or {})["exception.message"] == "boom"
    assert str(failed.id) == (broken_run.attributes or {})["messaging.message.id"]
    assert str(image.id) == (one(spans, "run resize").attributes or {})["messaging.message.id"]


async def test_batches_untraced_enqueues_and_uninstrument(
    app: taskq.App, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracing = instrument(app, tracer_provider=provider)
    with pytest.raises(taskq.ConfigurationError, match="traced already"):
        instrument(app, tracer_provider=provider)

    @app.task(name="item")
    async def item(n: int) -> int:
        return n

    async with app:
        batch = await item.enqueue_many([{"n": i} for i in range(3)])  # no span around it
        await app.drain()
        spans = list(exporter.get_finished_spans())
        enqueue = one(spans, "enqueue item")
        assert enqueue.parent is None  # a trace of its own
        assert (enqueue.attributes or {})["messaging.batch.message_count"] == 3
        assert attr(enqueue, "taskq.job.ids") == tuple(j.id for j in batch)
        runs = [s for s in spans if s.name == "run item"]
        assert len(runs) == 3
        assert {parent_id(s) for s in runs} == {enqueue.context.span_id}
        assert {s.context.trace_id for s in runs} == {enqueue.context.trace_id}

        tracing.uninstrument()
        exporter.clear()
        job = await item.enqueue(n=9)
        await app.drain()
        assert exporter.get_finished_spans() == ()
        assert (await job.status()).meta == {}


async def test_the_worker_command_serves_metrics_on_a_port(pg_dsn: str, schema: str) -> None:
    import signal
    import subprocess

    from .conftest import PYTHON, subprocess_env

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    app = taskq.App(pg_dsn, schema=schema)
    app.task(name="cli.add", queue="math")(lambda a, b: a + b)
    async with app:
        worker = subprocess.Popen(
            [PYTHON, "-m", "taskq", "worker", "workerapp:app", "--metrics-port", str(port)],
            env=subprocess_env(pg_dsn, TASKQ_SCHEMA=schema),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            jobs = [await app.enqueue("cli.add", {"a": i, "b": 1}) for i in range(3)]
            assert [await j.result(timeout=60) for j in jobs] == [1, 2, 3]
            samples = await scrape(f"http://127.0.0.1:{port}/metrics")
            succeeded = value(
                samples, "taskq_jobs_total", task="cli.add", queue="math", outcome="succeeded"
            )
            assert succeeded == 3
            # The queue depth is read once before the worker starts.
            assert (value(samples, "taskq_queue_stats_timestamp_seconds") or 0) > 0
            # A second worker on the same port fails at once with one clear line.
            clash = subprocess.run(
                [PYTHON, "-m", "taskq", "worker", "workerapp:app", "--metrics-port", str(port)],
                env=subprocess_env(pg_dsn, TASKQ_SCHEMA=schema),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert clash.returncode == 1
            assert f"taskq: error: cannot serve metrics on 127.0.0.1:{port}" in clash.stderr
            assert "Traceback" not in clash.stderr
        finally:
            worker.send_signal(signal.SIGTERM)
            _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert f"serving metrics on http://127.0.0.1:{port}/metrics" in err
