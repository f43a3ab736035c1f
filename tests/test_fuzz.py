"""Fuzzed names and payloads through the public API and the CLI.

Bad input gets a typed taskq error before any SQL runs: the App's database is
watched (taking a connection raises), the tables are counted before and after,
and a transaction the caller passed with ``connection=`` is still usable.
Good input comes back exactly, types included, from ``job.status()`` and, once
a worker ran the job, from ``job.result()``.

The CLI gets a handful of hostile command lines as real subprocesses, pointed
at a DSN where nothing listens: a bad name or id must be refused before the
command tries to connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import math
import string
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import taskq
from taskq.worker import WorkerConfig

from .conftest import PYTHON, ROOT, subprocess_env

MAX_PAYLOAD = 64 * 1024  # the fuzzed App's limit, so that "too big" is cheap to build

# -- the rules for names, written out again (not imported) ----------------------------

_LD = string.ascii_letters + string.digits


def valid_queue(name: object) -> bool:
    return (
        isinstance(name, str)
        and 1 <= len(name) <= 128
        and set(name) <= set(_LD + "_.:-")
        and name[0] in _LD + "_"
    )


def valid_task(name: object) -> bool:
    return (
        isinstance(name, str)
        and 1 <= len(name) <= 200
        and set(name) <= set(_LD + "_.:-<>")
        and name[0] in _LD + "_"
    )


def valid_schema(name: object) -> bool:
    return (
        isinstance(name, str)
        and 1 <= len(name) <= 40
        and set(name) <= set(string.ascii_lowercase + string.digits + "_")
        and not name[0].isdigit()
        and not name.startswith("pg_")
    )


# -- strategies ------------------------------------------------------------------------

#: Text that JSON, Postgres and every layer between must carry unchanged.
TRICKY_TEXT = [
    "'; DROP TABLE jobs; --",
    '"; DROP TABLE jobs; --',
    "Robert'); DELETE FROM history;--",
    "$1",
    "%s%s%n",
    "{schema}",
    "\\",
    "\\u0000",
    "\u202eevil\u202c",  # right-to-left override
    "שלום עולם",
    "مرحبا",
    "😀👩‍👩‍👧‍👦🏳️‍🌈",
    "\u2028\u2029",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "e\u0301",
    "\t\r\n",
    " ",
    "",
]
#: Names that must be refused, beside whatever Hypothesis makes up.
HOSTILE_NAMES = [
    *TRICKY_TEXT,
    "\x00",
    "q\x00",
    "\ud800",
    "a\udfffb",
    "a b",
    "-lead",
    ".lead",
    "Ⅻ",
    "١٢٣",
    "K",  # Kelvin sign: a letter to str.isalpha(), not to taskq
    "x" * 129,
    "x" * 201,
    "pg_catalog",
    "public; DROP SCHEMA public",
]

any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates too
json_text = st.one_of(
    st.sampled_from(TRICKY_TEXT),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=30),
)
names = st.one_of(
    st.sampled_from(HOSTILE_NAMES),
    any_text,
    st.text(st.sampled_from(_LD + "_.:-<> '\";\x00"), max_size=210),
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,30}", fullmatch=True),
    st.from_regex(r"[a-z_][a-z0-9_]{0,39}", fullmatch=True),
    st.builds(
        lambda a, b, c: a + b + c,
        st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
        st.sampled_from(HOSTILE_NAMES),
        st.from_regex(r"[a-z0-9_]{0,8}", fullmatch=True),
    ),
    st.integers(min_value=1),
    st.binary(min_size=1, max_size=8),
    st.lists(st.just("q"), min_size=1, max_size=2),
)

# Floats that jsonb would turn into integers (integral, 1e16 <= |x| < 2**64)
# are refused at enqueue (test_a_large_integral_float_is_refused_before_sql):
# kept out of the good payloads.
json_floats = st.floats(allow_nan=False, allow_infinity=False).filter(
    lambda f: not (f.is_integer() and 1e16 <= abs(f) < 2**64)
)
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, -1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
    json_floats,
    json_text,
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(json_text, inner, max_size=4)
    ),
    max_leaves=25,
)


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


class _Opaque:
    pass


bad_leaves = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.integers(min_value=2**64),
    st.integers(max_value=-(2**63) - 1),
    st.builds(lambda a, b: a + "\x00" + b, json_text, json_text),
    st.sampled_from(["\ud800", "a\udfffb", "\udc80\udc80"]),
    st.sampled_from(
        [
            b"bytes",
            bytearray(b"x"),
            {1, 2},
            frozenset(),
            complex(1, 2),
            decimal.Decimal("1.5"),
            dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
            dt.date(2024, 1, 1),
            uuid.UUID(int=1),
            range(3),
            _Opaque(),
            print,
            ...,
        ]
    ),
    st.integers(260, 600).map(_nested),  # deeper than JSON encoders go
    st.just("x" * (MAX_PAYLOAD + 1)),
)
#: Keys that JSON objects cannot have, or that Postgres cannot store.
bad_keys = st.one_of(
    st.builds(lambda a: a + "\x00", json_text),
    st.sampled_from(["\ud800", 1, 2.5, None, (1, 2), b"k", True]),
)


@st.composite
def bad_payloads(draw: st.DrawFn) -> Any:
    """A good JSON tree with exactly one bad leaf or key somewhere inside it."""
    value = draw(bad_leaves) if draw(st.booleans()) else {draw(bad_keys): draw(json_values)}
    for _ in range(draw(st.integers(0, 3))):
        shape = draw(st.integers(0, 3))
        other = draw(json_values)
        if shape == 0:
            value = [value]
        elif shape == 1:
            value = [other, value]
        elif shape == 2:
            value = {"k": value}
        else:
            value = {"other": other, draw(json_text.filter(lambda k: k != "other")): value}
    return value


# -- comparison ----------------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (1 is not 1.0, True is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


# -- the App under fuzzing ----------------------------------------------------------------


class SQLAttempted(AssertionError):
    """Raised when a bad input reached for a database connection."""


class Fuzzed:
    """One opened App on its own event loop, shared by all examples of a test."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.loop = asyncio.new_event_loop()
        self.app = taskq.App(dsn, schema=schema, max_payload_bytes=MAX_PAYLOAD)
        self.s = f'"{schema}"'

        @self.app.task(name="fz.echo", retry=False)
        async def echo(value: Any) -> Any:
            return value

        @self.app.task(name="fz.kw", retry=False)
        async def kw(**kwargs: Any) -> Any:
            return kwargs

        self.echo, self.kw = echo, kw
        self.run(self.app.open())
        # A task only a worker elsewhere knows: enqueued by name, never imported.
        self.run(
            self.execute(
                f"INSERT INTO {self.s}.tasks (name, queue, max_attempts) "
                "VALUES ('remote.echo', 'default', 1)"
            )
        )
        self.registered: set[str] = set()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def execute(self, sql: str) -> None:
        async with self.app.pool.acquire() as c:
            await c.execute(sql)

    async def rows(self) -> int:
        async with self.app.pool.acquire() as c:
            return int(
                await c.fetchval(
                    f"SELECT (SELECT count(*) FROM {self.s}.jobs) "
                    f"+ (SELECT count(*) FROM {self.s}.history)"
                )
            )

    @contextlib.contextmanager
    def no_sql(self) -> Iterator[None]:
        """Inside: any attempt to take one of the App's connections raises SQLAttempted."""
        database = self.app.database

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise SQLAttempted(f"a connection was asked for: {args}")

        database.acquire = refuse  # type: ignore[method-assign]
        try:
            yield
        finally:
            del database.acquire

    def close(self) -> None:
        self.run(self.app.close())
        self.loop.close()


@pytest.fixture
def fz(pg_dsn: str, schema: str) -> Iterator[Fuzzed]:
    f = Fuzzed(pg_dsn, schema)
    try:
        yield f
    finally:
        f.close()


FUZZ = settings(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def refused(kind: type[BaseException], call: Callable[[], Any]) -> BaseException:
    """Run ``call`` and return the error of type ``kind`` it raised."""
    try:
        call()
    except kind as exc:
        return exc
    raise AssertionError(f"{call} accepted a bad input")


# -- names -------------------------------------------------------------------------------


def test_fuzzed_names_are_refused_before_sql_or_round_trip(fz: Fuzzed) -> None:
    echo = fz.echo

    async def enqueue_on(queue: Any) -> taskq.Job:
        return await echo.options(queue=queue).enqueue(value=1)

    @settings(FUZZ, max_examples=300)
    @given(name=names)
    def check(name: Any) -> None:
        before = fz.run(fz.rows())
        if valid_queue(name):
            job = fz.run(enqueue_on(name))
            assert fz.run(job.status()).queue == name
            assert fz.app.queue(name).name == name
            assert WorkerConfig.make(queues=[name]).queues == (name,)
        else:
            with fz.no_sql():
                for call in (
                    lambda: echo.options(queue=name),
                    lambda: fz.app.queue(name),
                    lambda: WorkerConfig.make(queues=[name]),
                    lambda: fz.run(enqueue_on(name)),
                ):
                    exc = refused(taskq.ConfigurationError, call)
                    if isinstance(name, str):
                        assert repr(name) in str(exc), exc
            assert fz.run(fz.rows()) == before
        before = fz.run(fz.rows())
        if name == "fz.echo":
            pass  # the fixture's own task, which takes no argument x
        elif valid_task(name):
            if name not in fz.app.tasks:
                fz.app.task(name=name)(lambda x: x)
            job = fz.run(fz.app.enqueue(name, {"x": name}))
            status = fz.run(job.status())
            assert (status.task, status.args) == (name, {"x": name})
        else:
            with fz.no_sql():
                refused(taskq.ConfigurationError, lambda: fz.run(fz.app.enqueue(name, {})))
                if name:  # see test_an_empty_task_name_is_refused
                    refused(taskq.ConfigurationError, lambda: fz.app.task(name=name)(lambda: None))
            assert fz.run(fz.rows()) == before
        if valid_schema(name):
            assert taskq.App(fz.dsn, schema=name).schema == name
        else:
            refused(taskq.ConfigurationError, lambda: taskq.App(fz.dsn, schema=name))

    check()


@pytest.mark.parametrize("name", ["", 0, b""])
def test_an_empty_task_name_is_refused(fz: Fuzzed, name: Any) -> None:
    with pytest.raises(taskq.ConfigurationError):
        fz.app.task(name=name)(lambda: None)


def test_a_valid_but_unknown_task_name_is_refused_and_writes_nothing(fz: Fuzzed) -> None:
    before = fz.run(fz.rows())
    with pytest.raises(taskq.UnknownTaskError, match="no_such"):
        fz.run(fz.app.enqueue("fz.no_such", {"value": 1}))
    assert fz.run(fz.rows()) == before


# -- payloads ----------------------------------------------------------------------------


def test_bad_payloads_are_refused_before_sql_and_write_nothing(fz: Fuzzed) -> None:
    echo, kw, app = fz.echo, fz.kw, fz.app
    conn: asyncpg.Connection = fz.run(asyncpg.connect(fz.dsn))

    async def in_callers_transaction(payload: Any) -> None:
        async with conn.transaction():
            with pytest.raises(taskq.SerializationError):
                await echo.options(connection=conn).enqueue(value=payload)
            # The bad payload never reached Postgres: the caller's
            # transaction is not aborted.
            assert await conn.fetchval("SELECT 1") == 1

    @settings(FUZZ, max_examples=250)
    @given(payload=bad_payloads())
    def check(payload: Any) -> None:
        before = fz.run(fz.rows())
        attempts: list[Callable[[], Any]] = [
            lambda: echo.enqueue(value=payload),
            lambda: echo.enqueue_many([{"value": 1}, {"value": payload}]),
            lambda: app.enqueue("fz.echo", {"value": payload}),
            lambda: app.enqueue("remote.echo", {"value": payload}),
            lambda: kw.enqueue(arg=payload),
            lambda: echo.options(meta={"m": payload}).enqueue(value=1),
        ]
        with fz.no_sql():
            for attempt in attempts:
                # A SerializationError, which is also a TypeError as documented.
                with pytest.raises(taskq.SerializationError, match=r"\w"):
                    fz.run(attempt())
        fz.run(in_callers_transaction(payload))
        assert fz.run(fz.rows()) == before

    try:
        check()
    finally:
        fz.run(conn.close())


@pytest.mark.parametrize("key", ["a\x00b", "\x00"])
def test_a_nul_in_an_argument_name_is_refused_before_sql(fz: Fuzzed, key: str) -> None:
    """``**kwargs`` tasks and ``app.enqueue(name, args)`` take argument names from the caller."""
    with fz.no_sql():
        for call in (
            lambda: fz.kw.enqueue(**{key: 1}),
            lambda: fz.app.enqueue("remote.echo", {key: 1}),
            lambda: fz.kw.enqueue_many([{key: 1}]),
            lambda: fz.echo.options(meta={key: 1}).enqueue(value=1),
        ):
            with pytest.raises(taskq.SerializationError):
                fz.run(call())
    assert fz.run(fz.rows()) == 0


def test_nesting_deeper_than_the_stack_is_a_serialization_error(fz: Fuzzed) -> None:
    deep = _nested(50_000)
    with fz.no_sql():
        with pytest.raises(taskq.SerializationError):
            fz.run(fz.echo.enqueue(value=deep))
        with pytest.raises(taskq.SerializationError):
            fz.run(fz.echo.enqueue_many([{"value": deep}]))
    assert fz.run(fz.rows()) == 0


@pytest.mark.parametrize("key", ["k\x00", "\ud800"])
def test_a_unique_key_postgres_cannot_store_is_refused_before_sql(fz: Fuzzed, key: str) -> None:
    with fz.no_sql(), pytest.raises(taskq.ConfigurationError):
        fz.run(fz.echo.options(unique_key=key).enqueue(value=1))
    assert fz.run(fz.rows()) == 0


def test_good_payloads_round_trip_exactly(fz: Fuzzed) -> None:
    echo, app = fz.echo, fz.app
    sent: list[tuple[taskq.Job, Any]] = []

    @settings(FUZZ, max_examples=150)
    @given(payload=json_values, meta=st.dictionaries(json_text, json_values, max_size=3))
    def check(payload: Any, meta: dict[str, Any]) -> None:
        jobs = [
            fz.run(echo.enqueue(value=payload)),
            fz.run(app.enqueue("fz.echo", {"value": payload})),
            *fz.run(echo.enqueue_many([{"value": payload}, {"value": 0}]))[:1],
            fz.run(echo.options(meta=meta or None).enqueue(value=payload)),
        ]
        for job in jobs:
            args = fz.run(job.status()).args
            assert same(args, {"value": payload}), (args, payload)
        if meta:
            stored = fz.run(jobs[-1].status()).meta
            assert same(stored, meta), (stored, meta)
        sent.append((jobs[0], payload))

    check()
    # The result path (encoded by the worker, stored in history, decoded by
    # job.result()) for every example's first job.
    stats = fz.run(asyncio.wait_for(app.drain(concurrency=20), 120))
    assert stats.failed == 0
    for job, payload in sent:
        value = fz.run(job.result(timeout=10))
        assert same(value, payload), (value, payload)


def test_payloads_at_the_size_limit(fz: Fuzzed) -> None:
    overhead = len(orjson.dumps({"value": ""}))
    fits = "é" * ((MAX_PAYLOAD - overhead) // 2)  # two bytes each in UTF-8
    job = fz.run(fz.echo.enqueue(value=fits))
    assert fz.run(job.status()).args == {"value": fits}
    with fz.no_sql(), pytest.raises(taskq.SerializationError, match="limit"):
        fz.run(fz.echo.enqueue(value=fits + "xx"))
    assert fz.run(fz.rows()) == 1


@pytest.mark.parametrize("value", [1e16, -2.5e17, float(2**64 - 2**11)])
def test_a_large_integral_float_is_refused_before_sql(fz: Fuzzed, value: float) -> None:
    # jsonb keeps the number, not its spelling: 1e16 would come back as the
    # int 10000000000000000.
    with fz.no_sql(), pytest.raises(taskq.SerializationError, match="integral float"):
        fz.run(fz.echo.enqueue(value={"x": [value]}))
    assert fz.run(fz.rows()) == 0
    # Below 1e16 orjson writes integral floats with a ".0", which jsonb keeps;
    # from 2**64 on, the integer Postgres returns reads back as a float.
    for fine in (9007199254740992.0, 1e15, 123.0, 0.1, float(2**64), 1e300):
        job = fz.run(fz.echo.enqueue(value=fine))
        assert same(fz.run(job.status()).args, {"value": fine})


# -- the CLI -----------------------------------------------------------------------------

#: Nothing listens here: a command that tries to connect fails with a
#: connection error instead of the usage error these inputs deserve.
NOWHERE = "postgresql://nobody@127.0.0.1:1/nowhere"

BAD_COMMAND_LINES = [
    ["jobs", "list", "--queue", "'; DROP TABLE jobs; --"],
    # Not UTF-8: Python sees a lone surrogate.
    ["jobs", "list", "--queue", b"q\xff\xfe"],
    ["jobs", "list", "--task", "t\u202e😀"],
    ["cancel", "--queue", "a b"],
    ["retry", "--task", "x;y", "--dry-run"],
    ["retry", "99999999999999999999999"],
    ["cancel", str(2**63)],
    ["jobs", "show", "1e3"],
    ["jobs", "show", "0x10"],
    ["cancel", "--", "-7"],
    ["retry", "1", "--state", "succeeded"],
    ["jobs", "list", "--schema", "x'; DROP SCHEMA public; --"],
    ["jobs", "list", "--schema", "Upper"],
]


def run_cli(args: list[str | bytes], dsn: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "taskq", *args, "--dsn", dsn],
        env=subprocess_env(dsn, **env),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "args", BAD_COMMAND_LINES, ids=lambda a: " ".join(map(str, a))[:40].replace(" ", "_")
)
def test_hostile_command_lines_are_refused_before_connecting(args: list[str | bytes]) -> None:
    done = run_cli(args, NOWHERE, TASKQ_SCHEMA="fuzz")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode in (1, 2), (done.returncode, done.stdout, done.stderr)
    assert "127.0.0.1" not in done.stderr and "connect" not in done.stderr.lower(), done.stderr
    if "--schema" not in args:
        assert done.returncode == 2, done.stderr


def test_exotic_but_valid_names_and_ids_through_the_cli(fz: Fuzzed) -> None:
    queue = "Q.:-_9z"
    job = fz.run(fz.echo.options(queue=queue).enqueue(value="'; DROP TABLE jobs; --"))
    schema = fz.app.schema
    listed = run_cli(["jobs", "list", "--queue", queue, "--json", "--schema", schema], fz.dsn)
    assert listed.returncode == 0, listed.stderr
    (row,) = orjson.loads(listed.stdout)
    assert (row["id"], row["queue"], row["args"]) == (
        job.id,
        queue,
        {"value": "'; DROP TABLE jobs; --"},
    )
    cancelled = run_cli(["cancel", "--queue", queue, "--schema", schema], fz.dsn)
    assert cancelled.returncode == 0, cancelled.stderr
    assert fz.run(job.status()).state is taskq.JobState.CANCELLED
    retried = run_cli(["retry", str(job.id), "--schema", schema], fz.dsn)
    assert retried.returncode == 0, retried.stderr
    assert fz.run(job.status()).state is taskq.JobState.QUEUED
    largest = run_cli(["retry", str(2**63 - 1), "--schema", schema], fz.dsn)
    assert largest.returncode == 3, largest.stderr  # no such job
    assert fz.run(fz.rows()) == 1
