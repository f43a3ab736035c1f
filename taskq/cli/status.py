"""``status``: job counts by queue and state and the live workers, once or ``--watch``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import anyio

from .._admin import StatusReport, status
from .._app import App
from .connect import app_for, opened
from .exits import EXIT_OK
from .options import (
    KEEP,
    Commands,
    db_options,
    describe_seconds,
    json_option,
    positive_float,
    window_arg,
)
from .output import age, plural, print_json, table, when

#: Seconds between frames of ``status --watch`` when no value is given.
DEFAULT_WATCH_SECONDS = 2.0
#: ``status --watch`` counts finished jobs of this recent window by default:
#: counting all of a large history on every frame would be a full scan.
DEFAULT_WATCH_WINDOW = 60.0

_COLUMNS = ["queued", "scheduled", "running", "succeeded", "failed", "cancelled"]
#: Shown first, and only when some queue has workflow steps waiting for
#: their parents (most deployments never have any).
_WAITING = "waiting"


def add_parser(commands: Commands) -> None:
    parser = commands.add_parser(
        "status", help="job counts by queue and state, and the live workers"
    )
    parser.add_argument(
        "--watch",
        nargs="?",
        type=positive_float,
        const=DEFAULT_WATCH_SECONDS,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C",
    )
    parser.add_argument(
        "--window",
        type=window_arg,
        default=KEEP,
        metavar="DURATION|all",
        help="count finished jobs of this recent window only, e.g. 15m "
        "(default: all of history; with --watch: 1m)",
    )
    json_option(parser)
    db_options(parser)
    parser.set_defaults(handler=cmd_status)


async def cmd_status(args: argparse.Namespace) -> int:
    app = app_for(args)
    window = args.window
    if window is KEEP:
        window = None if args.watch is None else DEFAULT_WATCH_WINDOW
    async with opened(app, args):
        if args.watch is None:
            report = await status(app.database, app.schema, window=window)
            if args.json:
                print_json(report.to_dict())
                return EXIT_OK
            if window is not None:
                print(_header(report))
            print("\n".join(_lines(report)))
            return EXIT_OK
        return await _watch(app, args.watch, window, as_json=args.json)


async def _watch(app: App, interval: float, window: float | None, *, as_json: bool) -> int:
    """Print a status frame every ``interval`` seconds until SIGINT or SIGTERM (exit 0)."""
    loop = asyncio.get_running_loop()
    tty = sys.stdout.isatty() and not as_json
    stops = (signal.SIGINT, signal.SIGTERM)
    with anyio.CancelScope() as scope:
        # Ctrl-C or SIGTERM is how a watch ends: stop at once, even in the
        # middle of a query, and exit 0.
        for sig in stops:
            loop.add_signal_handler(sig, scope.cancel)
        try:
            if tty:
                sys.stdout.write("\x1b[2J")
            while True:
                report = await status(app.database, app.schema, window=window)
                if as_json:
                    print_json(report.to_dict())
                elif tty:
                    # Redraw in place: home, each line cleared to its end, then
                    # the rest of the screen cleared (no flicker).
                    lines = [
                        f"{_header(report)}  (every {interval:g}s, Ctrl-C to stop)",
                        "",
                        *_lines(report),
                    ]
                    sys.stdout.write("\x1b[H" + "".join(f"{ln}\x1b[K\n" for ln in lines) + "\x1b[J")
                    sys.stdout.flush()
                else:
                    print(_header(report))
                    print("\n".join(_lines(report)) + "\n", flush=True)
                await anyio.sleep(interval)
        finally:
            for sig in stops:
                loop.remove_signal_handler(sig)
    return EXIT_OK


def _lines(report: StatusReport) -> list[str]:
    lines: list[str] = []
    if report.queues:
        columns = ([_WAITING] if any(q.waiting for q in report.queues) else []) + _COLUMNS
        lines += table(
            ["queue", "state", *columns],
            [
                [q.name, "paused" if q.paused else "active"]
                + [f"{getattr(q, c):,}" for c in columns]
                for q in report.queues
            ],
            right=range(2, 2 + len(columns)),
        )
    else:
        lines.append("no jobs")
    lines.append("")
    if report.workers:
        lines.append(f"{plural(len(report.workers), 'worker')}:")
        lines += table(
            ["worker", "host", "pid", "concurrency", "running", "queues", "heartbeat"],
            [
                [
                    w.id,
                    w.hostname,
                    str(w.pid),
                    str(w.concurrency),
                    str(w.running),
                    "all" if w.queues is None else ",".join(w.queues),
                    f"{age(w.heartbeat_age)} ago",
                ]
                for w in report.workers
            ],
            right=(2, 3, 4),
        )
    else:
        lines.append("no live workers")
    return lines


def _header(report: StatusReport) -> str:
    window = (
        "finished: all history"
        if report.window is None
        else f"finished: last {describe_seconds(report.window)}"
    )
    return f"taskq status  schema {report.schema!r}  {when(report.time)} UTC  {window}"
