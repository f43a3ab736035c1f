"""The ``python -m taskq`` command line: worker, migrate, status, queues, cron, demo."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from ._app import App
from ._errors import TaskqError
from ._names import DEFAULT_SCHEMA

log = logging.getLogger("taskq.cli")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

#: Default of options that leave a setting as it is.
_KEEP: Any = object()


def load_app(spec: str) -> App:
    """Import ``module:attribute`` (``module`` alone looks for ``app``) and return the App."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if not module_name:
        raise TaskqError(f"expected MODULE:APP (e.g. myproject.jobs:app), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskqError(f"cannot import {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TaskqError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, App):
        raise TaskqError(f"{spec} is a {type(obj).__name__}, not a taskq.App")
    return obj


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run(coro: Coroutine[Any, Any, int], *, uvloop: bool = True) -> int:
    if uvloop:
        try:
            import uvloop as _uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
            pass
        else:
            return int(_uvloop.run(coro))
    return asyncio.run(coro)


def _app_for(args: argparse.Namespace) -> App:
    if getattr(args, "app", None):
        if args.schema:
            raise TaskqError("give --app or --schema, not both: the App names its own schema")
        app = load_app(args.app)
        if args.dsn:
            app._dsn_arg = args.dsn
        return app
    return App(args.dsn, schema=args.schema)


async def _cmd_worker(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    if args.dsn:
        app._dsn_arg = args.dsn
    settings: dict[str, Any] = {"shutdown_timeout": args.shutdown_timeout}
    if args.lease_seconds is not None:
        settings["lease_seconds"] = args.lease_seconds
    if args.poll_interval is not None:
        settings["poll_interval"] = args.poll_interval
    if args.no_cron:
        settings["cron"] = False
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


async def _cmd_migrate(args: argparse.Namespace) -> int:
    app = _app_for(args)
    app.auto_migrate = False
    from . import _migrations

    dsn = await app._resolve_dsn()
    import asyncpg

    from ._app import translate_errors

    with translate_errors("connecting to Postgres"):
        conn = await asyncpg.connect(dsn, **app._connect_args("taskq-migrate"))
    try:
        with translate_errors("migrating"):
            if args.dry_run:
                sys.stdout.write(await _migrations.pending_sql(conn, app.schema))
                return EXIT_OK
            applied = await _migrations.migrate(conn, app.schema)
    finally:
        await conn.close()
    if applied:
        print(f"applied migration(s) {', '.join(map(str, applied))} to schema {app.schema!r}")
    else:
        print(f"schema {app.schema!r} is up to date")
    return EXIT_OK


async def _cmd_status(args: argparse.Namespace) -> int:
    app = _app_for(args)
    app.auto_migrate = False
    async with app:
        rows = await app.queue_counts()
    if not rows:
        print("no jobs")
        return EXIT_OK
    states = ["queued", "running", "succeeded", "failed", "cancelled"]
    table: dict[str, dict[str, int]] = {}
    for queue, state, count in rows:
        table.setdefault(queue, {})[state] = count
    width = max(5, *(len(q) for q in table))
    print(f"{'queue':<{width}}  " + "  ".join(f"{s:>9}" for s in states))
    for queue in sorted(table):
        print(f"{queue:<{width}}  " + "  ".join(f"{table[queue].get(s, 0):>9}" for s in states))
    return EXIT_OK


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _limit_arg(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'none', got {value!r}"
        ) from None


async def _cmd_queues(args: argparse.Namespace) -> int:
    app = _app_for(args)
    app.auto_migrate = False
    async with app:
        if args.action in ("pause", "resume", "set"):
            if not args.name:
                raise TaskqError(f"queues {args.action} needs a queue name")
            queue = app.queue(args.name)
            if args.action == "pause":
                await queue.pause()
            elif args.action == "resume":
                await queue.resume()
            else:
                changes: dict[str, Any] = {}
                if args.concurrency_limit is not _KEEP:
                    changes["concurrency_limit"] = args.concurrency_limit
                if args.rate_limit is not _KEEP:
                    rate = args.rate_limit
                    changes["rate_limit"] = None if rate.lower() == "none" else rate
                if not changes:
                    raise TaskqError("queues set needs --concurrency-limit and/or --rate-limit")
                await queue.configure(**changes)
            infos = [await queue.info()]
        else:
            if args.name:
                raise TaskqError(f"unknown queues action {args.name!r}")
            infos = await app.queues()
    if args.json:
        print(
            orjson.dumps(
                [
                    {
                        "name": i.name,
                        "paused": i.paused,
                        "concurrency_limit": i.concurrency_limit,
                        "rate_limit": None if i.rate_limit is None else str(i.rate_limit),
                        "queued": i.queued,
                        "running": i.running,
                    }
                    for i in infos
                ]
            ).decode()
        )
        return EXIT_OK
    if not infos:
        print("no queues")
        return EXIT_OK
    _print_table(
        ["queue", "state", "queued", "running", "concurrency limit", "rate limit"],
        [
            [
                i.name,
                "paused" if i.paused else "active",
                str(i.queued),
                str(i.running),
                "-" if i.concurrency_limit is None else str(i.concurrency_limit),
                "-" if i.rate_limit is None else str(i.rate_limit),
            ]
            for i in infos
        ],
    )
    return EXIT_OK


async def _cmd_cron(args: argparse.Namespace) -> int:
    from ._cron import CronEntry
    from ._errors import ConfigurationError

    app = _app_for(args)
    app.auto_migrate = False
    async with app, app._acquire("listing cron entries") as conn:
        rows = await app._store.list_crons(conn)
    now = datetime.now(UTC)
    entries = []
    for r in rows:
        try:
            entry = CronEntry(r["name"], r["expression"], r["task"], timezone=r["timezone"])
            upcoming = entry.next_after(now)
            next_run = None if upcoming is None else upcoming.astimezone(entry.zone)
        except ConfigurationError:
            next_run = None
        entries.append(
            {
                "name": r["name"],
                "expression": r["expression"],
                "timezone": r["timezone"],
                "task": r["task"],
                "queue": r["queue"],
                "missed": r["missed"],
                "last_slot": r["last_slot"].isoformat(),
                "last_job_id": r["last_job_id"],
                "next_run": None if next_run is None else next_run.isoformat(),
                "registered_at": r["registered_at"].isoformat(),
            }
        )
    if args.json:
        print(orjson.dumps(entries).decode())
        return EXIT_OK
    if not entries:
        print("no cron entries (workers record theirs when they start)")
        return EXIT_OK
    _print_table(
        ["name", "schedule", "timezone", "task", "queue", "next run", "last job"],
        [
            [
                e["name"],
                e["expression"],
                e["timezone"],
                e["task"],
                e["queue"],
                e["next_run"] or "never",
                "-" if e["last_job_id"] is None else str(e["last_job_id"]),
            ]
            for e in entries
        ],
    )
    return EXIT_OK


async def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return await run_demo(dsn=args.dsn, jobs=args.jobs, concurrency=args.concurrency)


async def _cmd_embedded(args: argparse.Namespace) -> int:
    from . import _embedded

    data_dir = _embedded._default_data_dir()
    if args.action == "stop":
        if not (data_dir / "PG_VERSION").exists():
            print(f"no embedded Postgres in {data_dir}")
            return EXIT_OK
        server = _embedded.EmbeddedServer(
            dsn="",
            data_dir=data_dir,
            log_file=data_dir / "server.log",
            bin_dir=_embedded._bin_dir_for((data_dir / "PG_VERSION").read_text().strip()),
            started=False,
        )
        server.stop()
        print(f"stopped the embedded Postgres in {data_dir}")
        return EXIT_OK
    server = _embedded.ensure_server(data_dir)
    print(f"embedded Postgres {'started' if server.started else 'running'}")
    print(f"  data: {server.data_dir}")
    print(f"  log:  {server.log_file}")
    print(f"  dsn:  {server.dsn}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m taskq", description="taskq: background jobs on Postgres."
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def db_options(p: argparse.ArgumentParser, *, with_app: bool) -> None:
        p.add_argument(
            "--dsn", help="Postgres DSN (default: $TASKQ_DSN, else the embedded Postgres)"
        )
        if with_app:
            p.add_argument("--app", help="MODULE:APP to take the DSN and schema from")
        p.add_argument(
            "--schema", help=f"taskq schema (default: $TASKQ_SCHEMA, else {DEFAULT_SCHEMA})"
        )

    worker = sub.add_parser("worker", help="run a worker process")
    worker.add_argument(
        "app", metavar="MODULE:APP", help="where your taskq.App lives, e.g. jobs:app"
    )
    worker.add_argument(
        "--queue", "-q", action="append", help="queue to serve (repeatable; default all)"
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
        help="lease of a claimed job, renewed every third of it; a crashed worker's jobs "
        "run again about 1.5 leases later (default 30)",
    )
    worker.add_argument(
        "--poll-interval",
        type=float,
        help="seconds between fallback polls when no notification arrives (default 2)",
    )
    worker.add_argument(
        "--no-cron", action="store_true", help="do not run the App's cron entries in this worker"
    )
    worker.add_argument("--dsn", help="override the App's DSN")
    worker.set_defaults(handler=_cmd_worker)

    migrate = sub.add_parser("migrate", help="create or upgrade the taskq schema")
    db_options(migrate, with_app=True)
    migrate.add_argument(
        "--dry-run", action="store_true", help="print the SQL instead of running it"
    )
    migrate.set_defaults(handler=_cmd_migrate)

    status = sub.add_parser("status", help="job counts by queue and state")
    db_options(status, with_app=True)
    status.set_defaults(handler=_cmd_status)

    queues = sub.add_parser(
        "queues",
        help="list queues, pause or resume one, set its cluster-wide limits",
        description="queues [list] | queues pause NAME | queues resume NAME | "
        "queues set NAME [--concurrency-limit N|none] [--rate-limit 50/second|none]",
    )
    queues.add_argument(
        "action", nargs="?", default="list", choices=["list", "pause", "resume", "set"]
    )
    queues.add_argument("name", nargs="?", help="the queue (for pause, resume and set)")
    queues.add_argument(
        "--concurrency-limit",
        type=_limit_arg,
        default=_KEEP,
        metavar="N|none",
        help="most jobs of the queue running at once across all workers",
    )
    queues.add_argument(
        "--rate-limit",
        default=_KEEP,
        metavar="RATE|none",
        help="most job starts per period across all workers, e.g. 100/minute",
    )
    queues.add_argument("--json", action="store_true", help="print JSON for scripts")
    db_options(queues, with_app=True)
    queues.set_defaults(handler=_cmd_queues)

    cron = sub.add_parser("cron", help="cron entries recorded by workers, with their next run")
    cron.add_argument("--json", action="store_true", help="print JSON for scripts")
    db_options(cron, with_app=True)
    cron.set_defaults(handler=_cmd_cron)

    demo = sub.add_parser("demo", help="run sample jobs (with failures and retries) on a worker")
    demo.add_argument(
        "--dsn", help="Postgres DSN (default: $TASKQ_DSN, else the embedded Postgres)"
    )
    demo.add_argument("--jobs", type=int, default=500, help="how many sample jobs (default 500)")
    demo.add_argument("--concurrency", type=int, default=20)
    demo.set_defaults(handler=_cmd_demo)
    embedded = sub.add_parser(
        "embedded", help="the local Postgres used when no DSN is given: start it, or stop it"
    )
    embedded.add_argument("action", choices=["start", "stop"])
    embedded.set_defaults(handler=_cmd_embedded)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return _run(args.handler(args), uvloop=args.command == "worker" or args.command == "demo")
    except TaskqError as exc:
        print(f"taskq: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
