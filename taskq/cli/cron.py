"""``cron``: the cron entries workers recorded, with their next run."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from .._cron import CronEntry
from .._errors import ConfigurationError
from .connect import app_for, opened
from .exits import EXIT_OK
from .options import Commands, db_options, json_option
from .output import print_json, print_table


def add_parser(commands: Commands) -> None:
    cron = commands.add_parser("cron", help="cron entries recorded by workers, with their next run")
    json_option(cron)
    db_options(cron)
    cron.set_defaults(handler=cmd_cron)


async def cmd_cron(args: argparse.Namespace) -> int:
    app = app_for(args)
    async with opened(app, args), app.database.acquire("listing cron entries") as conn:
        rows = await app.store.list_crons(conn)
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
        print_json(entries)
        return EXIT_OK
    if not entries:
        print("no cron entries (workers record theirs when they start)")
        return EXIT_OK
    print_table(
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
