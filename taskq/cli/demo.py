"""``demo``: sample jobs, with failures and retries, on a worker in this process."""

from __future__ import annotations

import argparse

from .options import Commands


def add_parser(commands: Commands) -> None:
    demo = commands.add_parser(
        "demo", help="run sample jobs (with failures and retries) on a worker"
    )
    demo.add_argument(
        "--dsn", help="Postgres DSN (default: $TASKQ_DSN, else the embedded Postgres)"
    )
    demo.add_argument("--jobs", type=int, default=500, help="how many sample jobs (default 500)")
    demo.add_argument("--concurrency", type=int, default=20)
    demo.set_defaults(handler=cmd_demo)


async def cmd_demo(args: argparse.Namespace) -> int:
    # Imported here: that module makes the demo's App and tasks on import.
    from .demo_jobs import run_demo

    return await run_demo(dsn=args.dsn, jobs=args.jobs, concurrency=args.concurrency)
