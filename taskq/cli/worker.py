"""``worker``: run a worker process for an App, with Prometheus metrics if asked."""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Any

from .._errors import TaskqError
from .connect import load_app, opened, set_connect_timeout
from .exits import EXIT_OK
from .options import (
    Commands,
    connect_timeout_option,
    non_negative_float,
    positive_int,
    queue_name,
)
from .supervise import add_options as add_process_options
from .supervise import supervise

log = logging.getLogger("taskq.cli")

#: How long a worker process keeps trying to reach Postgres (at start, and
#: for each connection it needs) before it gives up: long enough that a fleet
#: started or restarted together with its database comes up by itself.
WORKER_CONNECT_RETRY_SECONDS = 60.0


def add_parser(commands: Commands) -> None:
    worker = commands.add_parser("worker", help="run a worker process")
    worker.add_argument(
        "app", metavar="MODULE:APP", help="where your taskq.App lives, e.g. jobs:app"
    )
    worker.add_argument(
        "--queue",
        "-q",
        action="append",
        type=queue_name,
        help="queue to serve (repeatable; default all)",
    )
    worker.add_argument(
        "--concurrency", "-c", type=int, default=10, help="jobs at once (default 10)"
    )
    worker.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds running jobs get to finish on SIGTERM (default 30)",
    )
    worker.add_argument(
        "--lease-seconds",
        type=float,
        help="lease of a claimed job, renewed every third of it; a killed worker's jobs "
        "are queued again at most 1.5 leases after its last renewal (default 30)",
    )
    worker.add_argument(
        "--poll-interval",
        type=float,
        help="seconds between fallback polls when no notification arrives (default 2)",
    )
    worker.add_argument(
        "--no-cron", action="store_true", help="do not run the App's cron entries in this worker"
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port at /metrics (needs taskq-pg[metrics])",
    )
    worker.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        metavar="ADDR",
        help="address the metrics server listens on (default 127.0.0.1; 0.0.0.0 for all)",
    )
    worker.add_argument(
        "--process-pool-size",
        type=positive_int,
        metavar="N",
        help='processes for executor="process" tasks (default: the smaller of '
        "--concurrency and the number of cores)",
    )
    worker.add_argument(
        "--max-jobs-per-process",
        type=positive_int,
        metavar="N",
        help='jobs after which a process of executor="process" tasks is replaced by a fresh '
        "one (default 1000)",
    )
    worker.add_argument("--dsn", help="override the App's DSN")
    connect_timeout_option(worker)
    worker.add_argument(
        "--connect-retry",
        type=non_negative_float,
        metavar="SECONDS",
        help="keep trying to reach Postgres this long, at start and for each connection, "
        "while it is down or restarting; 0 gives up at once "
        f"(default {WORKER_CONNECT_RETRY_SECONDS:g}, or the App's connect_retry if longer)",
    )
    add_process_options(worker)
    worker.set_defaults(handler=cmd_worker)


async def cmd_worker(args: argparse.Namespace) -> int:
    if args.processes not in (None, 1) or args.autoscale is not None:
        return await supervise(args)
    app = load_app(args.app)
    if args.dsn:
        app.database.dsn_arg = args.dsn
    set_connect_timeout(app, args)
    if args.connect_retry is not None:
        app.database.connect_retry = args.connect_retry
    else:
        app.database.connect_retry = max(app.connect_retry, WORKER_CONNECT_RETRY_SECONDS)
    settings: dict[str, Any] = {"shutdown_timeout": args.shutdown_timeout}
    if args.lease_seconds is not None:
        settings["lease_seconds"] = args.lease_seconds
    if args.poll_interval is not None:
        settings["poll_interval"] = args.poll_interval
    if args.no_cron:
        settings["cron"] = False
    if args.process_pool_size is not None:
        settings["process_pool_size"] = args.process_pool_size
    if args.max_jobs_per_process is not None:
        settings["max_jobs_per_process"] = args.max_jobs_per_process
    async with contextlib.AsyncExitStack() as stack:
        metrics = None
        if args.metrics_port is not None:
            try:
                from ..contrib.prometheus import TaskqMetrics
            except ImportError as exc:
                raise TaskqError(
                    "--metrics-port needs prometheus-client: "
                    f"pip install 'taskq-pg[metrics]' ({exc})"
                ) from None
            metrics = TaskqMetrics(app)
            try:
                server = metrics.start_http_server(args.metrics_port, args.metrics_addr)
            except OSError as exc:
                raise TaskqError(
                    f"cannot serve metrics on {args.metrics_addr}:{args.metrics_port}: {exc}"
                ) from None
            stack.callback(server.close)
            log.info("serving metrics on http://%s:%d/metrics", args.metrics_addr, server.port)
        # Opened here (the worker's own open() then counts one more user) so
        # that a database that cannot be reached is named in the error.
        await stack.enter_async_context(opened(app, args))
        if metrics is not None:
            await stack.enter_async_context(metrics.refreshing())
        stats = await app.run_worker(
            concurrency=args.concurrency, queues=args.queue or None, **settings
        )
    log.info(
        "worker stopped: %d succeeded, %d failed, %d retried, %d cancelled, "
        "%d returned to the queue",
        stats.succeeded,
        stats.failed,
        stats.retried,
        stats.cancelled,
        stats.released,
    )
    return EXIT_OK
