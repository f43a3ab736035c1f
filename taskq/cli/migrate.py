"""``migrate``: create or upgrade the taskq schema, or print the SQL it would run."""

from __future__ import annotations

import argparse
import sys

import asyncpg

from .. import _migrations
from .._database import translate_errors
from .connect import app_for, explained
from .exits import EXIT_OK
from .options import Commands, db_options


def add_parser(commands: Commands) -> None:
    migrate = commands.add_parser("migrate", help="create or upgrade the taskq schema")
    db_options(migrate)
    migrate.add_argument(
        "--dry-run", action="store_true", help="print the SQL instead of running it"
    )
    migrate.set_defaults(handler=cmd_migrate)


async def cmd_migrate(args: argparse.Namespace) -> int:
    app = app_for(args)
    database = app.database
    with explained(app, args):
        database.dsn = await database.resolve_dsn()
        with translate_errors("connecting to Postgres"):
            conn = await asyncpg.connect(database.dsn, **database.connect_args("taskq-migrate"))
    try:
        with translate_errors("migrating"):
            if args.dry_run:
                sys.stdout.write(await _migrations.pending_sql(conn, app.schema))
                return EXIT_OK
            applied = await _migrations.apply_pending(conn, app.schema)
    finally:
        await conn.close()
    if applied.versions:
        versions = ", ".join(map(str, applied.versions))
        print(f"applied migration(s) {versions} to schema {app.schema!r}")
    if applied.objects:
        print(f"created or replaced {', '.join(applied.objects)} in schema {app.schema!r}")
    if not applied.versions and not applied.objects:
        print(f"schema {app.schema!r} is up to date")
    return EXIT_OK
