"""Numbered SQL migrations, applied once each under a Postgres advisory lock."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from ._errors import SchemaError
from ._names import quote_schema

log = logging.getLogger("taskq.migrations")

_FILE_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    template: str

    def sql(self, schema: str) -> str:
        # The schema name is validated by quote_schema (letters, digits, _),
        # so the channel literals below cannot break out of their quotes.
        quote_schema(schema)
        return (
            self.template.replace("{schema}", quote_schema(schema))
            .replace("{finished_channel}", f"'taskq:{schema}:finished'")
            .replace("{enqueued_channel}", f"'taskq:{schema}:enqueued'")
        )


def all_migrations() -> list[Migration]:
    """The migrations shipped in the package, in order."""
    found = []
    for entry in resources.files("taskq.migrations").iterdir():
        match = _FILE_RE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"taskq migrations are not numbered 1..n: {versions}")
    return found


def latest_version() -> int:
    return all_migrations()[-1].version


def _bootstrap(schema: str) -> str:
    q = quote_schema(schema)
    return (
        f"CREATE SCHEMA IF NOT EXISTS {q};\n"
        f"CREATE TABLE IF NOT EXISTS {q}.migrations (\n"
        "    version    integer PRIMARY KEY,\n"
        "    name       text NOT NULL,\n"
        "    applied_at timestamptz NOT NULL DEFAULT now()\n"
        ");\n"
    )


def _lock_key(schema: str) -> str:
    return f"taskq.migrate:{schema}"


async def current_version(conn: asyncpg.Connection, schema: str) -> int:
    """The schema's applied version, 0 if taskq was never installed there."""
    exists = await conn.fetchval(
        "SELECT to_regclass(format('%I.migrations', $1::text)) IS NOT NULL", schema
    )
    if not exists:
        return 0
    q = quote_schema(schema)
    return int(await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {q}.migrations"))


async def pending_sql(conn: asyncpg.Connection, schema: str) -> str:
    """The SQL that ``migrate`` would run now, for a DBA to read (``--dry-run``)."""
    version = await current_version(conn, schema)
    todo = [m for m in all_migrations() if m.version > version]
    if not todo:
        return f"-- schema {schema!r} is up to date (version {version})\n"
    parts = ["BEGIN;", _bootstrap(schema)]
    q = quote_schema(schema)
    for m in todo:
        parts.append(f"-- migration {m.version:04d}_{m.name}")
        parts.append(m.sql(schema))
        parts.append(
            f"INSERT INTO {q}.migrations (version, name) VALUES ({m.version}, '{m.name}');"
        )
    parts.append("COMMIT;")
    return "\n".join(parts) + "\n"


async def migrate(conn: asyncpg.Connection, schema: str) -> list[int]:
    """Apply every pending migration; return the versions applied.

    The whole run holds a transaction-level advisory lock keyed on the schema,
    so two processes starting at once apply each migration exactly once: the
    second waits, then finds nothing left to do.
    """
    q = quote_schema(schema)
    applied: list[int] = []
    # Up to date already: touch nothing, so that a role without CREATE rights
    # can still start with auto_migrate on.
    if await current_version(conn, schema) >= latest_version():
        return applied
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", _lock_key(schema)
        )
        await conn.execute(_bootstrap(schema))
        version = await current_version(conn, schema)
        for m in all_migrations():
            if m.version <= version:
                continue
            log.info("applying taskq migration %04d_%s to schema %s", m.version, m.name, schema)
            await conn.execute(m.sql(schema))
            await conn.execute(
                f"INSERT INTO {q}.migrations (version, name) VALUES ($1, $2)", m.version, m.name
            )
            applied.append(m.version)
    return applied


async def check_schema(conn: asyncpg.Connection, schema: str) -> int:
    """Raise SchemaError unless the schema has every migration this taskq needs."""
    version = await current_version(conn, schema)
    latest = latest_version()
    if version < latest:
        what = "is not installed" if version == 0 else f"is at version {version}"
        raise SchemaError(
            f"taskq schema {schema!r} {what}; this taskq needs version {latest}. "
            "Run `python -m taskq migrate` (or create the App with auto_migrate=True)."
        )
    if version > latest:
        log.warning(
            "taskq schema %r is at version %d, newer than this taskq knows (%d); "
            "upgrade taskq on this host",
            schema,
            version,
            latest,
        )
    return version
