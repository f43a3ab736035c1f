"""Migrations proven: every released schema version upgrades to what a fresh install is.

A schema is built at exactly a released version (only the numbered files up to
it), filled with live and finished jobs, upgraded by the current ``migrate``,
and then compared, catalog entry by catalog entry, with a fresh install. The
repeatable objects (``taskq/objects/``) are re-created when their text
changes, dropped first when their signature does, and left alone on a schema
that is up to date (no DDL) or newer than this taskq.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

import taskq
from taskq import _migrations
from taskq._migrations import SchemaObject

from .conftest import PYTHON, new_schema_name, subprocess_env

pytestmark = pytest.mark.anyio

RELEASED_VERSIONS = [1, 2, 3]

# Objects whose text changed on purpose since schema version 3, where every
# function was last written in a numbered migration. Add an object here when
# you change its file; until then the test below proves that moving the
# functions into taskq/objects/ changed none of them.
CHANGED_SINCE_VERSION_3: set[str] = {
    "finish",  # version 5: errors, progress, requeued_by and lease_token; 6: workflow steps
    # 8: a per-key limit's freed slot is announced; 9: the committed kind, result_pending
    # 10: a limited queue's start time taken after the running counts
    # 11: asynchronous commit without outcomes; generic plans; 13: a filled limit said
    "claim",  # version 6: a step's inputs, workflow and name; 8: per-key limits
    "prune",  # version 6: recorded job steps; history of running workflows kept
    # 12: the DEFAULT partition of history only (time partitions are dropped whole)
    "enqueue_unique",  # version 10: a concurrency key
}
# Objects that version 3 did not have.
ADDED_SINCE_VERSION_3: set[str] = {
    "append_error",  # version 5: one attempt's error added to a job's errors
    # version 6: workflows
    "steps_ended",
    "steps_ready",
    "workflow_enqueue",
    "cancel_steps",
    "workflow_retry",
    "rescue",  # the rescue statement, now a function that also calls steps_ended()
    "claim_keyed",  # version 8: the claim of a queue with a per_key_limit
    # version 12: history's time partitions, made ahead and dropped past the retention
    "history_partitions",
    "history_partition_add",
    "history_extend",
    "history_detach",
    "history_drop",
}

NewSchema = Callable[[], str]


@pytest.fixture
async def new_schema(pg_dsn: str) -> AsyncIterator[NewSchema]:
    """Names of extra schemas, dropped at the end of the test."""
    names: list[str] = []

    def make() -> str:
        names.append(new_schema_name())
        return names[-1]

    yield make
    conn = await asyncpg.connect(pg_dsn)
    try:
        for name in names:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


async def install_version(conn: asyncpg.Connection, schema: str, version: int) -> None:
    """The schema exactly as the release with that version left it: numbered files only."""
    async with conn.transaction():
        await conn.execute(_migrations._bootstrap(schema))
        for m in _migrations.all_migrations()[:version]:
            await conn.execute(m.sql(schema))
            await conn.execute(
                f'INSERT INTO "{schema}".migrations (version, name) VALUES ($1, $2)',
                m.version,
                m.name,
            )


async def fresh_install(conn: asyncpg.Connection, schema: str) -> None:
    applied = await _migrations.apply_pending(conn, schema)
    assert applied.versions == list(range(1, _migrations.latest_version() + 1))
    assert applied.objects == [o.name for o in _migrations.all_objects()]


# -- the catalog of a schema, as comparable data ------------------------------------

_TABLES = """
SELECT c.relname, c.relkind::text, c.reloptions, c.relacl::text[],
       array(SELECT row(a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                        pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated)::text
             FROM pg_attribute AS a
             LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum) AS columns
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
"""
_SEQUENCES = """
SELECT c.relname, row(format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmax,
                      s.seqmin, s.seqcache, s.seqcycle)::text
FROM pg_sequence AS s JOIN pg_class AS c ON c.oid = s.seqrelid
JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE n.nspname = $1
"""
_CONSTRAINTS = """
SELECT cl.relname || '.' || c.conname, c.contype::text || ' ' || pg_get_constraintdef(c.oid)
FROM pg_constraint AS c JOIN pg_class AS cl ON cl.oid = c.conrelid
JOIN pg_namespace AS n ON n.oid = c.connamespace WHERE n.nspname = $1
"""
_INDEXES = "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1"
_FUNCTIONS = """
SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
       pg_get_functiondef(p.oid), p.proconfig, p.proacl::text[]
FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace WHERE n.nspname = $1
"""
_TRIGGERS = """
SELECT c.relname || '.' || t.tgname, pg_get_triggerdef(t.oid)
FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND NOT t.tgisinternal
"""
_VIEWS = "SELECT viewname, definition FROM pg_views WHERE schemaname = $1"
# History's time partitions (and the tables history_detach() left for
# history_drop()) are data: the upkeep makes them, named after their times. A
# schema upgraded with rows in history also has history_v11. The DEFAULT
# partition is the migrations' own.
_TIME_PARTITIONS = r"""
SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind = 'r' AND c.relname ~ '^history_(v11|\d{8}_\d{6})$'
"""


async def snapshot(conn: asyncpg.Connection, schema: str) -> dict[str, dict[str, Any]]:
    """Everything the schema defines, with its own name replaced by ``{schema}``."""

    def norm(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(f'"{schema}"', "{schema}").replace(schema, "{schema}")
        if isinstance(value, (list, tuple)):
            return tuple(norm(v) for v in value)
        return value

    partitions = {r[0] for r in await conn.fetch(_TIME_PARTITIONS, schema)}

    def data(name: str) -> bool:  # a time partition, or one of its indexes or constraints
        return any(name == p or name.startswith((f"{p}.", f"{p}_")) for p in partitions)

    async def rows(query: str) -> dict[str, Any]:
        found = await conn.fetch(query, schema)
        return {r[0]: norm(tuple(r)[1:]) for r in found if not data(r[0])}

    return {
        "tables": await rows(_TABLES),
        "sequences": await rows(_SEQUENCES),
        "constraints": await rows(_CONSTRAINTS),
        "indexes": await rows(_INDEXES),
        "functions": await rows(_FUNCTIONS),
        "triggers": await rows(_TRIGGERS),
        "views": await rows(_VIEWS),
        "migrations": {
            str(r[0]): r[1]
            for r in await conn.fetch(f'SELECT version, name FROM "{schema}".migrations')
        },
    }


def differences(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> list[str]:
    """``section: name`` of every entry that is not the same in both snapshots."""
    return sorted(
        f"{section}: {name}"
        for section in a.keys() | b.keys()
        for name in a.get(section, {}).keys() | b.get(section, {}).keys()
        if a.get(section, {}).get(name) != b.get(section, {}).get(name)
    )


# -- jobs written by a released version -----------------------------------------------


async def seed_jobs(conn: asyncpg.Connection, schema: str, version: int) -> dict[str, int]:
    """Live and finished jobs, written with the columns that version had."""
    s = f'"{schema}"'
    ids = {
        "queued": await conn.fetchval(
            f"INSERT INTO {s}.jobs (queue, task, args, priority) "
            """VALUES ('default', 'up.add', '{"a": 1, "b": 2}', 5) RETURNING id"""
        ),
        "late": await conn.fetchval(
            f"INSERT INTO {s}.jobs (queue, task, args, run_at) "
            """VALUES ('default', 'up.add', '{"a": 3, "b": 4}', now() - interval '1 hour') """
            "RETURNING id"
        ),
    }
    if version >= 2:
        ids["unique"] = await conn.fetchval(
            f"INSERT INTO {s}.jobs (queue, task, args, unique_key) "
            """VALUES ('default', 'up.add', '{"a": 10, "b": 20}', 'only-one') RETURNING id"""
        )
    if version >= 3:
        ids["meta"] = await conn.fetchval(
            f"INSERT INTO {s}.jobs (queue, task, args, meta) "
            """VALUES ('default', 'up.add', '{"a": 100, "b": 200}', '{"from": "v3"}') """
            "RETURNING id"
        )
    await conn.execute(
        f"INSERT INTO {s}.history (id, queue, task, args, state, priority, attempts, "
        "max_attempts, enqueued_at, started_at, finished_at, result, error) VALUES "
        """(1000, 'default', 'up.add', '{"a": 5, "b": 5}', 'failed', 0, 1, 1, now(), now(), """
        """now(), NULL, '{"type": "RuntimeError", "message": "boom", "traceback": ""}'), """
        """(1001, 'default', 'up.add', '{"a": 6, "b": 6}', 'succeeded', 0, 1, 1, now(), now(), """
        "now(), '12', NULL)"
    )
    ids["dead"], ids["done"] = 1000, 1001
    return ids


@pytest.mark.parametrize("version", RELEASED_VERSIONS)
async def test_upgrade_from_each_released_version_keeps_jobs_and_equals_a_fresh_install(
    pg_dsn: str, schema: str, new_schema: NewSchema, version: int
) -> None:
    fresh = new_schema()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await install_version(conn, schema, version)
        ids = await seed_jobs(conn, schema, version)
        await fresh_install(conn, fresh)
    finally:
        await conn.close()

    app = taskq.App(pg_dsn, schema=schema)

    @app.task(name="up.add")
    async def add(a: int, b: int) -> int:
        return a + b

    async with app:  # applies the newer numbered files, then every object
        if "unique" in ids:  # the live holder of the key still holds it
            again = await add.options(unique_key="only-one").enqueue(a=0, b=0)
            assert again.id == ids["unique"]
        stats = await app.drain()
        assert stats.succeeded == len(ids) - 2
        assert await app.get_job(ids["queued"]).result(timeout=5) == 3
        assert await app.get_job(ids["late"]).result(timeout=5) == 7
        if "unique" in ids:
            assert await app.get_job(ids["unique"]).result(timeout=5) == 30
        if "meta" in ids:
            assert (await app.get_job(ids["meta"]).status()).meta == {"from": "v3"}
            assert await app.get_job(ids["meta"]).result(timeout=5) == 300
        assert await app.get_job(ids["done"]).result(timeout=5) == 12
        dead = app.get_job(ids["dead"])
        assert (await dead.status()).state is taskq.JobState.FAILED
        assert await dead.retry()
        await app.drain()
        assert await dead.result(timeout=5) == 10
        # Written by the new objects: a unique job with metadata.
        job = await add.options(unique_key="after", meta={"k": "v"}).enqueue(a=2, b=3)
        await app.drain()
        assert await job.result(timeout=5) == 5
        assert (await job.status()).meta == {"k": "v"}

    conn = await asyncpg.connect(pg_dsn)
    try:
        assert differences(await snapshot(conn, schema), await snapshot(conn, fresh)) == []
        recorded = await conn.fetch(f'SELECT name, checksum FROM "{schema}".objects')
        assert dict(recorded) == {o.name: o.checksum(schema) for o in _migrations.all_objects()}
        assert await _migrations.schema_state(conn, schema) == _migrations.SchemaState(
            _migrations.latest_version(), ()
        )
    finally:
        await conn.close()


# A change of each kind that the snapshot must see, as (section, SQL).
ALTERATIONS = [
    (
        "functions",
        "CREATE OR REPLACE FUNCTION {s}.prune(p_retention double precision, p_limit integer) "
        "RETURNS integer LANGUAGE plpgsql SET enable_seqscan = off AS $$ BEGIN RETURN 0; END $$",
    ),
    ("functions", "ALTER FUNCTION {s}.prune(double precision, integer) SET work_mem = '1MB'"),
    ("functions", "REVOKE EXECUTE ON FUNCTION {s}.prune(double precision, integer) FROM PUBLIC"),
    (
        "functions",
        "CREATE FUNCTION {s}.prune(p integer) RETURNS integer LANGUAGE sql AS 'SELECT 1'",
    ),
    ("tables", "ALTER TABLE {s}.jobs ALTER COLUMN priority SET DEFAULT 1"),
    ("tables", "ALTER TABLE {s}.jobs ALTER COLUMN started_at SET NOT NULL"),
    ("tables", "ALTER TABLE {s}.workers ALTER COLUMN hostname TYPE varchar(200)"),
    ("tables", "ALTER TABLE {s}.tasks ADD COLUMN extra text"),
    ("tables", "ALTER TABLE {s}.history_default SET (fillfactor = 90)"),
    ("tables", "GRANT SELECT ON {s}.jobs TO PUBLIC"),
    ("constraints", "ALTER TABLE {s}.jobs ADD CONSTRAINT positive CHECK (attempts >= 0)"),
    ("indexes", "CREATE INDEX jobs_task ON {s}.jobs (task)"),
    ("indexes", "DROP INDEX {s}.history_dead"),
    ("sequences", "ALTER TABLE {s}.jobs ALTER COLUMN id SET INCREMENT BY 2"),
    (
        "triggers",
        "CREATE TRIGGER t BEFORE INSERT ON {s}.jobs FOR EACH ROW "
        "EXECUTE FUNCTION suppress_redundant_updates_trigger()",
    ),
    ("views", "CREATE VIEW {s}.live AS SELECT id FROM {s}.jobs"),
]


async def test_the_snapshot_sees_every_kind_of_difference(
    conn: asyncpg.Connection, schema: str
) -> None:
    await fresh_install(conn, schema)
    base = await snapshot(conn, schema)
    assert base == await snapshot(conn, schema)
    assert {"jobs", "history", "workers", "tasks", "queues", "crons", "objects"} <= set(
        base["tables"]
    )
    assert len(base["functions"]) == len(_migrations.all_objects())
    for section, sql in ALTERATIONS:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(sql.format(s=f'"{schema}"'))
            changed = differences(base, await snapshot(conn, schema))
        finally:
            await tx.rollback()
        assert any(c.startswith(f"{section}: ") for c in changed), (sql, changed)
    assert await snapshot(conn, schema) == base


async def test_objects_keep_the_functions_that_version_3_defined(
    conn: asyncpg.Connection, schema: str, new_schema: NewSchema
) -> None:
    """Moving the functions out of the numbered files changed none of them."""
    at_3 = new_schema()
    await install_version(conn, at_3, 3)
    await fresh_install(conn, schema)
    # By name: a function whose arguments changed is one changed function (migrate
    # drops the old signature), not one removed and one added.
    before = {k.split("(")[0]: (k, v) for k, v in (await snapshot(conn, at_3))["functions"].items()}
    after = {
        k.split("(")[0]: (k, v) for k, v in (await snapshot(conn, schema))["functions"].items()
    }
    assert after.keys() - before.keys() == ADDED_SINCE_VERSION_3
    assert before.keys() <= after.keys()
    changed = {name for name in before if before[name] != after[name]}
    assert changed == CHANGED_SINCE_VERSION_3


async def test_every_object_file_names_what_it_creates_in_a_working_order(
    conn: asyncpg.Connection, schema: str
) -> None:
    await fresh_install(conn, schema)
    objects = _migrations.all_objects()
    for obj in objects:
        found = await conn.fetchval(
            "SELECT to_regprocedure(format('%I.%s', $1::text, $2::text))", schema, obj.identity
        )
        assert found is not None, obj.identity
    names = [o.name for o in objects]
    assert all(names.index(r) < names.index(o.name) for o in objects for r in o.requires)
    assert set(next(o for o in objects if o.name == "claim").requires) == {
        "finish",
        "rate_budget",
        "rate_log_add",
        "claim_keyed",
    }

    def obj(name: str, requires: str = "") -> SchemaObject:
        head = f"-- object: view {name}\n" + (f"-- requires: {requires}\n" if requires else "")
        return _migrations.parse_object(name, head + "SELECT 1;\n")

    ordered = _migrations.in_dependency_order([obj("a", "c"), obj("b"), obj("c", "b")])
    assert [o.name for o in ordered] == ["b", "c", "a"]
    with pytest.raises(RuntimeError, match="cycle"):
        _migrations.in_dependency_order([obj("a", "b"), obj("b", "a")])
    with pytest.raises(RuntimeError, match="unknown"):
        _migrations.in_dependency_order([obj("a", "zz")])
    for bad in ["-- object: function x(int)\n", "-- object: function y\n", "SELECT 1;\n"]:
        with pytest.raises(RuntimeError, match=r"y\.sql"):
            _migrations.parse_object("y", bad)


# -- repeatable objects ---------------------------------------------------------------


def with_object(
    monkeypatch: pytest.MonkeyPatch, name: str, template: str
) -> Callable[[], list[SchemaObject]]:
    """Make ``all_objects`` return ``template`` as object ``name`` (added or replacing)."""
    shipped = _migrations.all_objects
    new = _migrations.parse_object(name, template)

    def objects() -> list[SchemaObject]:
        return _migrations.in_dependency_order([o for o in shipped() if o.name != name] + [new])

    monkeypatch.setattr(_migrations, "all_objects", objects)
    return objects


PRUNE = "-- object: function prune({args})\n" + (
    "CREATE OR REPLACE FUNCTION {{schema}}.prune({params}) RETURNS {result}\n"
    "LANGUAGE sql AS $$ SELECT {value} $$;\n"
)


async def prune_functions(conn: asyncpg.Connection, schema: str) -> list[tuple[str, str]]:
    rows = await conn.fetch(
        "SELECT pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid) "
        "FROM pg_proc AS p WHERE p.pronamespace = $1::regnamespace AND p.proname = 'prune'",
        schema,
    )
    return [(r[0], r[1]) for r in rows]


async def test_a_changed_object_is_created_again_by_the_next_migrate(
    conn: asyncpg.Connection, schema: str, new_schema: NewSchema, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = new_schema()
    await fresh_install(conn, schema)
    await fresh_install(conn, fresh)
    # Someone broke finish() by hand; the recorded checksum says so.
    await conn.execute(
        f'CREATE OR REPLACE FUNCTION "{schema}".finish(p_ids bigint[], p_tokens uuid[], '
        "p_kinds text[], p_results text[], p_errors text[], p_delays double precision[]) "
        "RETURNS bigint[] LANGUAGE sql AS 'SELECT p_ids'"
    )
    await conn.execute(f"UPDATE \"{schema}\".objects SET checksum = 'x' WHERE name = 'finish'")
    assert (await _migrations.schema_state(conn, schema)).stale == ("finish",)
    assert await _migrations.apply_pending(conn, schema) == _migrations.Applied([], ["finish"])
    assert differences(await snapshot(conn, schema), await snapshot(conn, fresh)) == []
    assert await _migrations.apply_pending(conn, schema) == _migrations.Applied([], [])

    # A new text in the file: only its checksum tells, and CREATE OR REPLACE
    # keeps the function itself (its oid, so its grants).
    oid = await conn.fetchval(
        f"SELECT '\"{schema}\".prune(double precision, integer)'::regprocedure::oid"
    )
    await conn.execute(
        f'REVOKE EXECUTE ON FUNCTION "{schema}".prune(double precision, integer) FROM PUBLIC'
    )
    args = "double precision, integer"
    params = "p_retention double precision, p_limit integer"
    with_object(
        monkeypatch, "prune", PRUNE.format(args=args, params=params, result="integer", value=7)
    )
    assert (await _migrations.schema_state(conn, schema)).stale == ("prune",)
    assert await _migrations.apply_pending(conn, schema) == _migrations.Applied([], ["prune"])
    assert await conn.fetchval(f'SELECT "{schema}".prune(1, 1)') == 7
    row = await conn.fetchrow(
        "SELECT oid, proacl::text[] FROM pg_proc WHERE oid = $1::regprocedure",
        f'"{schema}".prune(double precision, integer)',
    )
    assert row["oid"] == oid and not any(a.startswith("=") for a in row["proacl"])


async def test_a_signature_change_drops_the_old_function_first(
    conn: asyncpg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fresh_install(conn, schema)
    shipped = _migrations.all_objects
    # New argument types: the old signature would otherwise stay beside the new.
    with_object(
        monkeypatch,
        "prune",
        PRUNE.format(
            args="double precision, integer, boolean",
            params="p_retention double precision, p_limit integer, p_dry boolean DEFAULT false",
            result="integer",
            value=1,
        ),
    )
    assert await _migrations.apply_pending(conn, schema) == _migrations.Applied([], ["prune"])
    assert await prune_functions(conn, schema) == [
        ("p_retention double precision, p_limit integer, p_dry boolean", "integer")
    ]
    # A new result type: CREATE OR REPLACE refuses, so the function is dropped first.
    with_object(
        monkeypatch,
        "prune",
        PRUNE.format(
            args="double precision, integer, boolean",
            params="p_retention double precision, p_limit integer, p_dry boolean DEFAULT false",
            result="bigint",
            value=2,
        ),
    )
    assert await _migrations.apply_pending(conn, schema) == _migrations.Applied([], ["prune"])
    assert await prune_functions(conn, schema) == [
        ("p_retention double precision, p_limit integer, p_dry boolean", "bigint")
    ]
    # And back to the shipped file.
    monkeypatch.setattr(_migrations, "all_objects", shipped)
    assert await _migrations.apply_pending(conn, schema) == _migrations.Applied([], ["prune"])
    assert await prune_functions(conn, schema) == [
        ("p_retention double precision, p_limit integer", "integer")
    ]

    # A view whose columns change is dropped and created again too.
    view = (
        "-- object: view queue_sizes\n-- requires: prune\n"
        "CREATE OR REPLACE VIEW {{schema}}.queue_sizes AS SELECT queue{more} FROM {{schema}}.jobs "
        "GROUP BY queue;\n"
    )
    with_object(monkeypatch, "queue_sizes", view.format(more=", count(*) AS n"))
    assert await _migrations.apply_pending(conn, schema) == _migrations.Applied([], ["queue_sizes"])
    with_object(monkeypatch, "queue_sizes", view.format(more=""))
    assert await _migrations.apply_pending(conn, schema) == _migrations.Applied([], ["queue_sizes"])
    columns = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0",
        f'"{schema}".queue_sizes',
    )
    assert [c[0] for c in columns] == ["queue"]


async def test_dry_run_lists_what_migrate_would_do_and_runs_to_the_same_schema(
    conn: asyncpg.Connection, schema: str, new_schema: NewSchema
) -> None:
    fresh = new_schema()
    await fresh_install(conn, fresh)
    await install_version(conn, schema, 2)
    script = await _migrations.pending_sql(conn, schema)
    assert "-- migration 0001" not in script and "-- migration 0003_job_meta" in script
    assert all(f"-- object {o.name}\n" in script for o in _migrations.all_objects())
    await conn.execute(script)  # what a DBA would run with psql
    assert differences(await snapshot(conn, schema), await snapshot(conn, fresh)) == []
    assert await _migrations.apply_pending(conn, schema) == _migrations.Applied([], [])
    assert "up to date" in await _migrations.pending_sql(conn, schema)

    await conn.execute(f"UPDATE \"{schema}\".objects SET checksum = 'x' WHERE name = 'claim'")
    script = await _migrations.pending_sql(conn, schema)
    assert "-- migration" not in script
    assert [line for line in script.splitlines() if line.startswith("-- object ")] == [
        "-- object claim"
    ]
    await conn.execute(script)
    assert (await _migrations.schema_state(conn, schema)).stale == ()


async def test_up_to_date_schema_needs_no_ddl_and_stale_objects_need_migrate(
    pg_dsn: str, conn: asyncpg.Connection, schema: str
) -> None:
    await fresh_install(conn, schema)
    role = f"{schema}_reader"
    await conn.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER')
    try:
        # USAGE only: the objects table is readable by everyone, the rest is not needed.
        await conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        await conn.execute(f'GRANT SELECT ON "{schema}".migrations TO "{role}"')
        reader = await asyncpg.connect(pg_dsn.replace("postgres@", f"{role}@", 1))
        try:
            assert await _migrations.apply_pending(reader, schema) == _migrations.Applied([], [])
            assert await _migrations.check_schema(reader, schema) == _migrations.latest_version()
            await conn.execute(
                f"UPDATE \"{schema}\".objects SET checksum = 'x' WHERE name IN ('finish', 'claim')"
            )
            with pytest.raises(taskq.SchemaError, match=r"finish\(\), claim\(\)") as caught:
                await _migrations.check_schema(reader, schema)
            assert "python -m taskq migrate" in str(caught.value)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # it tries: DDL is needed
                await _migrations.apply_pending(reader, schema)
        finally:
            await reader.close()
        app = taskq.App(pg_dsn, schema=schema, auto_migrate=False)
        with pytest.raises(taskq.SchemaError, match="python -m taskq migrate"):
            await app.open()
        assert not app.is_open
    finally:
        await conn.execute(f'DROP OWNED BY "{role}"')
        await conn.execute(f'DROP ROLE "{role}"')


async def test_a_newer_schema_keeps_its_objects(
    conn: asyncpg.Connection, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Processes of an older release never put their objects back (rolling deploys)."""
    await fresh_install(conn, schema)
    newer = _migrations.latest_version() + 1
    await conn.execute(f"INSERT INTO \"{schema}\".migrations VALUES ({newer}, 'future', now())")
    await conn.execute(f"UPDATE \"{schema}\".objects SET checksum = 'newer' WHERE name = 'claim'")
    assert await _migrations.apply_pending(conn, schema) == _migrations.Applied([], [])
    assert "up to date" in await _migrations.pending_sql(conn, schema)
    assert await _migrations.check_schema(conn, schema) == newer
    assert "newer than this taskq knows" in caplog.text
    checksum = await conn.fetchval(
        f"SELECT checksum FROM \"{schema}\".objects WHERE name = 'claim'"
    )
    assert checksum == "newer"


async def test_migrations_run_as_a_non_superuser_owner(
    pg_dsn: str,
    conn: asyncpg.Connection,
    schema: str,
    new_schema: NewSchema,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    owner = f"owner_{secrets.token_hex(5)}"  # not named after the schema: snapshots rename that
    fresh = new_schema()
    await conn.execute(f'CREATE ROLE "{owner}" LOGIN NOSUPERUSER')
    try:
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'GRANT CREATE ON DATABASE "{database}" TO "{owner}"')
        as_owner = await asyncpg.connect(pg_dsn.replace("postgres@", f"{owner}@", 1))
        try:
            await install_version(as_owner, schema, 1)
            await seed_jobs(as_owner, schema, 1)
            applied = await _migrations.apply_pending(as_owner, schema)
            assert applied.versions == list(range(2, _migrations.latest_version() + 1))
            await fresh_install(as_owner, fresh)
            upgraded, installed = await snapshot(as_owner, schema), await snapshot(as_owner, fresh)
            assert differences(upgraded, installed) == []
            # Dropping and re-creating a function needs nothing more than owning it.
            with_object(
                monkeypatch,
                "prune",
                PRUNE.format(args="integer", params="p_limit integer", result="bigint", value=0),
            )
            assert await _migrations.apply_pending(as_owner, schema) == _migrations.Applied(
                [], ["prune"]
            )
            assert await prune_functions(as_owner, schema) == [("p_limit integer", "bigint")]
        finally:
            await as_owner.close()
        owners = await conn.fetch(
            "SELECT DISTINCT proowner::regrole::text FROM pg_proc "
            "WHERE pronamespace = $1::regnamespace",
            schema,
        )
        assert [o[0].strip('"') for o in owners] == [owner]
    finally:
        for name in (schema, fresh):
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.execute(f'DROP OWNED BY "{owner}"')
        await conn.execute(f'DROP ROLE "{owner}"')


MIGRATE_SCRIPT = """
import asyncio, json, sys
import asyncpg
from taskq import _migrations

async def main():
    conn = await asyncpg.connect(sys.argv[1])
    try:
        applied = await _migrations.apply_pending(conn, sys.argv[2])
    finally:
        await conn.close()
    print(json.dumps({"versions": applied.versions, "objects": applied.objects}))

asyncio.run(main())
"""


async def test_two_processes_migrating_at_once_apply_each_migration_and_object_once(
    pg_dsn: str, conn: asyncpg.Connection, schema: str
) -> None:
    await install_version(conn, schema, 3)
    key = _migrations._lock_key(schema)
    tx = conn.transaction()
    await tx.start()
    await conn.execute(_migrations._LOCK, key)  # both processes will queue behind us
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", MIGRATE_SCRIPT, pg_dsn, schema],
            env=subprocess_env(pg_dsn),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        waiting = 0
        for _ in range(1200):
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            if waiting == 2 or any(p.poll() is not None for p in procs):
                break
            await asyncio.sleep(0.05)
        assert waiting == 2
    finally:
        await tx.rollback()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = sorted((json.loads(out) for out, _ in outputs), key=lambda r: -len(r["objects"]))
    assert results == [
        {
            "versions": list(range(4, _migrations.latest_version() + 1)),
            "objects": [o.name for o in _migrations.all_objects()],
        },
        {"versions": [], "objects": []},
    ]
