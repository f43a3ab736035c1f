"""``queues``: list queues, pause or resume one, set its cluster-wide limits."""

from __future__ import annotations

import argparse
from typing import Any

from .connect import app_for, opened
from .exits import EXIT_OK, UsageError
from .options import KEEP, Commands, db_options, json_option, limit_arg
from .output import print_json, print_table


def add_parser(commands: Commands) -> None:
    queues = commands.add_parser(
        "queues",
        help="list queues, pause or resume one, set its cluster-wide limits",
        description="queues [list] | queues pause NAME | queues resume NAME | "
        "queues set NAME [--concurrency-limit N|none] [--rate-limit 50/second|none] "
        "[--per-key-limit N|none]",
    )
    queues.add_argument(
        "action", nargs="?", default="list", choices=["list", "pause", "resume", "set"]
    )
    queues.add_argument("name", nargs="?", help="the queue (for pause, resume and set)")
    queues.add_argument(
        "--concurrency-limit",
        type=limit_arg,
        default=KEEP,
        metavar="N|none",
        help="most jobs of the queue running at once across all workers",
    )
    queues.add_argument(
        "--rate-limit",
        default=KEEP,
        metavar="RATE|none",
        help="most job starts per period across all workers, e.g. 100/minute",
    )
    queues.add_argument(
        "--per-key-limit",
        type=limit_arg,
        default=KEEP,
        metavar="N|none",
        help="most running jobs per concurrency key across all workers (fair sharing)",
    )
    json_option(queues)
    db_options(queues)
    queues.set_defaults(handler=cmd_queues)


async def cmd_queues(args: argparse.Namespace) -> int:
    if args.action in ("pause", "resume", "set") and not args.name:
        raise UsageError(f"queues {args.action} needs a queue name")
    if args.action == "list" and args.name:
        raise UsageError(f"unknown queues action {args.name!r}")
    changes: dict[str, Any] = {}
    if args.action == "set":
        if args.concurrency_limit is not KEEP:
            changes["concurrency_limit"] = args.concurrency_limit
        if args.rate_limit is not KEEP:
            rate = args.rate_limit
            changes["rate_limit"] = None if rate.lower() == "none" else rate
        if args.per_key_limit is not KEEP:
            changes["per_key_limit"] = args.per_key_limit
        if not changes:
            raise UsageError(
                "queues set needs --concurrency-limit, --rate-limit and/or --per-key-limit"
            )
    app = app_for(args)
    async with opened(app, args):
        if args.action in ("pause", "resume", "set"):
            queue = app.queue(args.name)
            if args.action == "pause":
                await queue.pause()
            elif args.action == "resume":
                await queue.resume()
            else:
                await queue.configure(**changes)
            infos = [await queue.info()]
        else:
            infos = await app.queues()
    if args.json:
        print_json(
            [
                {
                    "name": i.name,
                    "paused": i.paused,
                    "concurrency_limit": i.concurrency_limit,
                    "rate_limit": None if i.rate_limit is None else str(i.rate_limit),
                    "per_key_limit": i.per_key_limit,
                    "queued": i.queued,
                    "running": i.running,
                }
                for i in infos
            ]
        )
        return EXIT_OK
    if not infos:
        print("no queues")
        return EXIT_OK
    print_table(
        ["queue", "state", "queued", "running", "concurrency limit", "rate limit", "per key"],
        [
            [
                i.name,
                "paused" if i.paused else "active",
                str(i.queued),
                str(i.running),
                "-" if i.concurrency_limit is None else str(i.concurrency_limit),
                "-" if i.rate_limit is None else str(i.rate_limit),
                "-" if i.per_key_limit is None else str(i.per_key_limit),
            ]
            for i in infos
        ],
    )
    return EXIT_OK
