"""The taskq schema: numbered migrations applied once each, then repeatable objects.

Tables change through ``migrations/NNNN_name.sql``, applied in order and
recorded in the ``migrations`` table. Functions (and views) live in
``objects/NAME.sql``, one file per object holding its newest text; each is
created again whenever the checksum of that text differs from the one
recorded in the ``objects`` table (the rules for changing them are in
``taskq/objects/__init__.py``). Both steps run in one transaction under an
advisory lock keyed on the schema. A schema that is up to date costs two
small queries and no DDL, so a role without ``CREATE`` rights can open an App
with ``auto_migrate=True``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

import asyncpg

from ._errors import SchemaError
from ._names import quote_schema

log = logging.getLogger("taskq.migrations")

_FILE_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_OBJECT_FILE_RE = re.compile(r"([a-z_][a-z0-9_]*)\.sql")
# The header of an object file: what it is (and so what DROP needs), and what
# must exist before it.
_OBJECT_LINE_RE = re.compile(r"-- object: (function|view) ([a-z_][a-z0-9_]*)(\(.*\))?")
_REQUIRES_LINE_RE = re.compile(r"-- requires: (.*)")

# CREATE OR REPLACE refuses to change a function's result type, OUT
# parameters, parameter names or defaults (42P13), a function into a procedure
# (42809), or a view's existing columns (42P16): the old object is dropped first.
_REPLACE_REFUSED = (
    asyncpg.InvalidFunctionDefinitionError,
    asyncpg.WrongObjectTypeError,
    asyncpg.InvalidTableDefinitionError,
)


def render(template: str, schema: str) -> str:
    """Fill the placeholders of a migration or object file for ``schema``."""
    # The schema name is validated by quote_schema (letters, digits, _), so the
    # channel literals below cannot break out of their quotes.
    quoted = quote_schema(schema)
    return (
        template.replace("{schema}", quoted)
        .replace("{finished_channel}", f"'taskq:{schema}:finished'")
        .replace("{enqueued_channel}", f"'taskq:{schema}:enqueued'")
        .replace("{cancel_channel}", f"'taskq:{schema}:cancel'")
        .replace("{workflow_channel}", f"'taskq:{schema}:workflow'")
    )


@dataclass(frozen=True)
class Migration:
    """One numbered file of ``taskq/migrations/``, applied once."""

    version: int
    name: str
    template: str

    def sql(self, schema: str) -> str:
        """The file's SQL for ``schema``."""
        return render(self.template, schema)


@dataclass(frozen=True)
class SchemaObject:
    """One file of ``taskq/objects/``: a function or view, re-created when its text changes."""

    name: str
    kind: str  # "function" or "view"
    identity: str  # what DROP names: "claim(text[], ...)" for a function, the name for a view
    requires: tuple[str, ...]
    template: str

    def sql(self, schema: str) -> str:
        """The file's SQL for ``schema``."""
        return render(self.template, schema)

    def checksum(self, schema: str) -> str:
        """sha256 (hex) of the SQL for ``schema``: what the ``objects`` table records."""
        return hashlib.sha256(self.sql(schema).encode()).hexdigest()

    def drop_sql(self, schema: str) -> str:
        """``DROP`` of the object as its header names it (never cascading)."""
        return f"DROP {self.kind.upper()} IF EXISTS {quote_schema(schema)}.{self.identity}"

    @property
    def label(self) -> str:
        """How messages name the object: ``claim()`` or ``view NAME``."""
        return f"{self.name}()" if self.kind == "function" else f"view {self.name}"


@dataclass(frozen=True)
class SchemaState:
    """Where a schema stands against this taskq."""

    version: int  # the newest applied migration; 0 when taskq was never installed
    stale: tuple[str, ...]  # objects whose recorded checksum is not this taskq's


@dataclass(frozen=True)
class Applied:
    """What one ``apply_pending`` changed."""

    versions: list[int]  # numbered migrations applied, in order
    objects: list[str]  # objects created or re-created, in the order they were


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
    """The newest migration this taskq ships."""
    return all_migrations()[-1].version


def all_objects() -> list[SchemaObject]:
    """The objects shipped in the package, each after the objects it requires."""
    found: dict[str, SchemaObject] = {}
    for entry in resources.files("taskq.objects").iterdir():
        match = _OBJECT_FILE_RE.fullmatch(entry.name)
        if match:
            found[match[1]] = parse_object(match[1], entry.read_text(encoding="utf-8"))
    return in_dependency_order(found.values())


def parse_object(name: str, template: str) -> SchemaObject:
    """Read an object file's header (see ``taskq/objects/__init__.py``)."""
    kind = identity = None
    requires: tuple[str, ...] = ()
    for line in template.splitlines():
        if not line.startswith("--"):
            break
        if match := _OBJECT_LINE_RE.fullmatch(line.rstrip()):
            kind, identity = match[1], match[2] + (match[3] or "")
            if match[2] != name or (kind == "function") != bool(match[3]):
                raise RuntimeError(
                    f"taskq object {name}.sql: the header must say 'function {name}(TYPES)' "
                    f"or 'view {name}', not {line[len('-- object: ') :]!r}"
                )
        elif match := _REQUIRES_LINE_RE.fullmatch(line.rstrip()):
            requires = tuple(r.strip() for r in match[1].split(",") if r.strip())
    if kind is None or identity is None:
        raise RuntimeError(f"taskq object {name}.sql has no '-- object: ...' header line")
    return SchemaObject(name, kind, identity, requires, template)


def in_dependency_order(objects: Iterable[SchemaObject]) -> list[SchemaObject]:
    """Objects sorted so that each comes after those it requires (else by name)."""
    by_name = {o.name: o for o in objects}
    for o in by_name.values():
        unknown = sorted(set(o.requires) - set(by_name))
        if unknown:
            raise RuntimeError(f"taskq object {o.name} requires unknown object(s) {unknown}")
    ordered: list[SchemaObject] = []
    placed: set[str] = set()
    waiting = sorted(by_name)
    while waiting:
        ready = [n for n in waiting if placed.issuperset(by_name[n].requires)]
        if not ready:
            raise RuntimeError(f"taskq objects require each other in a cycle: {waiting}")
        ordered.extend(by_name[n] for n in ready)
        placed.update(ready)
        waiting = [n for n in waiting if n not in placed]
    return ordered


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


_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"


async def current_version(conn: asyncpg.Connection, schema: str) -> int:
    """The schema's applied version, 0 if taskq was never installed there."""
    exists = await conn.fetchval(
        "SELECT to_regclass(format('%I.migrations', $1::text)) IS NOT NULL", schema
    )
    if not exists:
        return 0
    q = quote_schema(schema)
    return int(await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {q}.migrations"))


async def schema_state(conn: asyncpg.Connection, schema: str) -> SchemaState:
    """The schema's version and stale objects: two small queries, no DDL, no lock."""
    objects = all_objects()
    names = [o.name for o in objects]
    found = await conn.fetchrow(
        "SELECT to_regclass(format('%I.migrations', $1::text)) IS NOT NULL,"
        " to_regclass(format('%I.objects', $1::text)) IS NOT NULL",
        schema,
    )
    assert found is not None
    installed, tracked = found[0], found[1]
    if not installed:
        return SchemaState(0, tuple(names))
    q = quote_schema(schema)
    if not tracked:  # before version 4 no checksum was recorded: every object is stale
        version = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {q}.migrations")
        return SchemaState(int(version), tuple(names))
    row = await conn.fetchrow(
        f"""
        SELECT (SELECT coalesce(max(version), 0) FROM {q}.migrations),
               array(SELECT f.name
                     FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS f(name, checksum, n)
                     LEFT JOIN {q}.objects AS o ON o.name = f.name
                     WHERE o.checksum IS DISTINCT FROM f.checksum
                     ORDER BY f.n)
        """,
        names,
        [o.checksum(schema) for o in objects],
    )
    assert row is not None
    return SchemaState(int(row[0]), tuple(row[1]))


def _has_work(state: SchemaState) -> bool:
    # A schema newer than this taskq is left alone, objects included: its
    # objects are a newer release's, and putting ours back would undo them
    # under the processes of that release (rolling deploys).
    latest = latest_version()
    return state.version < latest or (state.version == latest and bool(state.stale))


# Functions of the object's name in the schema other than the one its header
# names: the signature it had before its argument types changed.
_STRAYS = """
SELECT pg_get_function_identity_arguments(p.oid)
FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
WHERE n.nspname = $1 AND p.proname = $2
    AND p.oid IS DISTINCT FROM to_regprocedure(format('%I.%s', $1::text, $3::text))
ORDER BY p.oid
"""


async def _strays(conn: asyncpg.Connection, schema: str, obj: SchemaObject) -> list[str]:
    if obj.kind != "function":
        return []
    rows = await conn.fetch(_STRAYS, schema, obj.name, obj.identity)
    return [f"{quote_schema(schema)}.{obj.name}({r[0]})" for r in rows]


def _drop_strays_sql(schema: str, obj: SchemaObject) -> str:
    """A script's drop of the object's other signatures, found when it runs: the
    numbered migrations before it in the script may create the one to drop."""
    literal = "'" + schema.replace("'", "''") + "'"
    return (
        "DO $strays$ DECLARE f regprocedure; BEGIN\n"
        "    FOR f IN SELECT p.oid::regprocedure FROM pg_proc AS p\n"
        "        JOIN pg_namespace AS n ON n.oid = p.pronamespace\n"
        f"        WHERE n.nspname = {literal} AND p.proname = '{obj.name}'\n"
        f"            AND p.oid IS DISTINCT FROM to_regprocedure(format('%I.%s', {literal}::text, "
        f"'{obj.identity}'))\n"
        "    LOOP EXECUTE format('DROP FUNCTION %s', f); END LOOP;\n"
        "END $strays$;"
    )


def _record_sql(schema: str) -> str:
    return (
        f"INSERT INTO {quote_schema(schema)}.objects (name, checksum) VALUES ($1, $2) "
        "ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, applied_at = now()"
    )


async def _create(conn: asyncpg.Connection, schema: str, obj: SchemaObject) -> None:
    """(Re-)create one object inside the caller's transaction and record its checksum."""
    log.info("creating taskq %s %s in schema %s", obj.kind, obj.name, schema)
    for stray in await _strays(conn, schema, obj):
        # Left in place, the old signature would stay callable (and make calls
        # that rely on defaults ambiguous).
        log.info("dropping taskq function %s: its argument types changed", stray)
        await conn.execute(f"DROP FUNCTION {stray}")
    try:
        async with conn.transaction():  # a savepoint: the refusal leaves the rest intact
            await conn.execute(obj.sql(schema))
    except _REPLACE_REFUSED as exc:
        log.info("dropping taskq %s %s first: %s", obj.kind, obj.identity, exc)
        await conn.execute(obj.drop_sql(schema))
        await conn.execute(obj.sql(schema))
    await conn.execute(_record_sql(schema), obj.name, obj.checksum(schema))


async def _replace_refused(conn: asyncpg.Connection, obj: SchemaObject, schema: str) -> bool:
    """Whether CREATE OR REPLACE of ``obj`` would be refused (its result type changed).

    Found out by trying, in a transaction that is always rolled back.
    """
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute(obj.sql(schema))
    except _REPLACE_REFUSED:
        return True
    except asyncpg.PostgresError:
        return False  # anything else (rights, a table not there yet) is for migrate to tell
    finally:
        await tx.rollback()
    return False


async def pending_sql(conn: asyncpg.Connection, schema: str) -> str:
    """The SQL that ``migrate`` would run now, for a DBA to read (``--dry-run``)."""
    state = await schema_state(conn, schema)
    if not _has_work(state):
        return f"-- schema {schema!r} is up to date (version {state.version})\n"
    q = quote_schema(schema)
    parts = [
        "BEGIN;",
        f"SELECT pg_advisory_xact_lock(hashtextextended('{_lock_key(schema)}', 0));",
        _bootstrap(schema),
    ]
    for m in all_migrations():
        if m.version > state.version:
            parts.append(f"-- migration {m.version:04d}_{m.name}")
            parts.append(m.sql(schema))
            parts.append(
                f"INSERT INTO {q}.migrations (version, name) VALUES ({m.version}, '{m.name}');"
            )
    stale = [o for o in all_objects() if o.name in state.stale]
    if stale:
        parts.append(
            "-- functions and views (taskq/objects/), in dependency order. Where CREATE OR\n"
            "-- REPLACE is refused because a result type or a parameter changed, migrate\n"
            "-- drops the old object first (DROP FUNCTION or DROP VIEW as the file's header\n"
            "-- names it)."
        )
    for obj in stale:
        parts.append(f"-- object {obj.name}")
        if obj.kind == "function":
            parts.append(_drop_strays_sql(schema, obj))
        if await _replace_refused(conn, obj, schema):
            parts.append(f"{obj.drop_sql(schema)};")
        parts.append(obj.sql(schema))
        parts.append(
            f"INSERT INTO {q}.objects (name, checksum) "
            f"VALUES ('{obj.name}', '{obj.checksum(schema)}')\n"
            "    ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, "
            "applied_at = now();"
        )
    parts.append("COMMIT;")
    return "\n".join(parts) + "\n"


async def apply_pending(conn: asyncpg.Connection, schema: str) -> Applied:
    """Apply every pending migration, then re-create every stale object.

    The whole run holds a transaction-level advisory lock keyed on the schema,
    so two processes starting at once apply each migration and each object
    exactly once: the second waits, then finds nothing left to do.
    """
    # Up to date already: touch nothing, so that a role without CREATE rights
    # can still start with auto_migrate on.
    if not _has_work(await schema_state(conn, schema)):
        return Applied([], [])
    q = quote_schema(schema)
    applied = Applied([], [])
    async with conn.transaction():
        await conn.execute(_LOCK, _lock_key(schema))
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
            applied.versions.append(m.version)
        # Read again under the lock: another process may have done it all.
        state = await schema_state(conn, schema)
        if _has_work(state):
            for obj in all_objects():
                if obj.name in state.stale:
                    await _create(conn, schema, obj)
                    applied.objects.append(obj.name)
    return applied


async def migrate(conn: asyncpg.Connection, schema: str) -> list[int]:
    """Apply every pending migration and stale object; return the versions applied."""
    return (await apply_pending(conn, schema)).versions


async def check_schema(conn: asyncpg.Connection, schema: str) -> int:
    """Raise SchemaError unless the schema has every migration and object this taskq needs."""
    state = await schema_state(conn, schema)
    version, latest = state.version, latest_version()
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
    elif state.stale:
        labels = {o.name: o.label for o in all_objects()}
        differ = ", ".join(labels[name] for name in state.stale)
        raise SchemaError(
            f"taskq schema {schema!r} is at version {version}, but these objects in it are "
            f"not the ones this taskq installs: {differ}. "
            "Run `python -m taskq migrate` (or create the App with auto_migrate=True)."
        )
    return version
