"""Typed arguments and results: encoded by the task's annotations, decoded in a real worker.

One worker process (``python -m taskq worker typedapp:app``) serves the whole
module; each type family is a test that enqueues from this process and checks
what the task received (the tasks check it themselves) and what
``job.result()`` returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pydantic
import pytest

import taskq

from . import typedapp
from .conftest import PYTHON, new_schema_name, subprocess_env
from .typedapp import Address, Color, Invoice, Level, Line, Order

pytestmark = pytest.mark.anyio

TASKS = ("times", "ids", "enums", "order", "address", "invoice")


@pytest.fixture(scope="module")
def typed_worker(pg_dsn: str) -> Iterator[str]:
    """A schema with one real worker process running typedapp; yields the schema."""
    schema = new_schema_name()
    proc = subprocess.Popen(
        [PYTHON, "-m", "taskq", "worker", "typedapp:app", "--concurrency", "4"],
        env=subprocess_env(pg_dsn, TASKQ_SCHEMA=schema),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield schema
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out

        async def drop() -> None:
            conn = await asyncpg.connect(pg_dsn)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())


@pytest.fixture
async def producer(pg_dsn: str, typed_worker: str) -> AsyncIterator[taskq.App]:
    """An App in this process with the same task functions as the worker's."""
    app = taskq.App(pg_dsn, schema=typed_worker)
    for name in TASKS:
        task = getattr(typedapp, name)
        app.task(name=task.name)(task.fn)
    async with app:
        yield app


async def run(app: taskq.App, name: str, **kwargs: Any) -> Any:
    return await app.tasks[f"typed.{name}"].enqueue(**kwargs)


async def test_datetime_date_time_timedelta(producer: taskq.App) -> None:
    when = dt.datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    span = dt.timedelta(days=3, seconds=7, microseconds=9)
    job = await run(
        producer, "times", when=when, day=dt.date(2026, 2, 28), at=dt.time(23, 59, 1), span=span
    )
    value = await job.result(timeout=30)
    assert value == when + span
    assert isinstance(value, dt.datetime)
    assert value.utcoffset() == dt.timedelta(hours=2)  # the offset survives
    # Stored as readable JSON, which status() shows as it is.
    args = (await job.status()).args
    assert args["when"] == "2026-03-29T01:30:15.123456+02:00"
    assert args["day"] == "2026-02-28"
    assert args["at"] == "23:59:01"
    assert args["span"] == span.total_seconds()


async def test_uuid_decimal_and_optional(producer: taskq.App) -> None:
    key, other = uuid.uuid4(), uuid.uuid4()
    amount = Decimal("12345678901234567890.123456789")  # more digits than a float holds
    assert await (await run(producer, "ids", key=key, amount=amount)).result(timeout=30) == [key]
    job = await run(producer, "ids", key=key, amount=amount, maybe=other)
    value = await job.result(timeout=30)
    assert value == [key, other]
    assert all(isinstance(v, uuid.UUID) for v in value)
    assert (await job.status()).args["amount"] == "12345678901234567890.123456789"


async def test_enums_as_values_and_as_dict_keys(producer: taskq.App) -> None:
    job = await run(
        producer,
        "enums",
        color=Color.GREEN,
        level=Level.HIGH,
        by_level={Level.LOW: Color.RED, Level.HIGH: Color.GREEN},
    )
    value = await job.result(timeout=30)
    assert value == (Color.GREEN, Level.HIGH)
    assert type(value) is tuple and type(value[0]) is Color and type(value[1]) is Level
    assert (await job.status()).args == {
        "color": "green",
        "level": 2,
        "by_level": {"1": "red", "2": "green"},
    }


async def test_dataclasses_nested_with_containers(producer: taskq.App) -> None:
    placed = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC)
    the_order = Order(
        id=uuid.uuid4(),
        placed=placed,
        lines=[Line("a-1", Decimal("9.99"), dt.date(2026, 12, 2)), Line("b-2", Decimal("0.10"))],
        tags=frozenset({"gift", "express"}),
    )
    extra = [Line("c-3", Decimal("100"))]
    job = await run(producer, "order", order=the_order, extra=extra)
    value = await job.result(timeout=30)
    assert value == dataclasses.replace(the_order, lines=[*the_order.lines, *extra])
    assert isinstance(value, Order) and isinstance(value.lines[2], Line)


async def test_typeddict(producer: taskq.App) -> None:
    home: Address = {"city": "Lyon", "since": dt.date(2020, 5, 1), "color": Color.RED}
    job = await run(producer, "address", home=home)
    assert await job.result(timeout=30) == home
    with pytest.raises(taskq.SerializationError, match=r"argument 'home' has key\(s\) 'zip'"):
        await run(producer, "address", home={**home, "zip": "69001"})
    with pytest.raises(taskq.SerializationError, match=r"argument 'home' lacks key\(s\) 'since'"):
        await run(producer, "address", home={"city": "Lyon", "color": Color.RED})


async def test_pydantic_model(producer: taskq.App) -> None:
    bill = Invoice(
        number=7,
        due=dt.datetime(2027, 1, 31, tzinfo=dt.UTC),
        amount=Decimal("19.90"),
        lines=["a"],
    )
    value = await (await run(producer, "invoice", invoice=bill)).result(timeout=30)
    assert value == bill.model_copy(update={"number": 8})
    assert isinstance(value, Invoice)


async def test_enqueue_by_name_with_plain_json_from_a_producer_without_the_functions(
    pg_dsn: str, typed_worker: str, producer: taskq.App
) -> None:
    bare = taskq.App(pg_dsn, schema=typed_worker)  # registers nothing
    async with bare:
        job = await bare.enqueue(
            "typed.times",
            {
                "when": "2026-01-01T00:00:00+00:00",
                "day": "2026-01-01",
                "at": "12:00:00",
                "span": 60,
            },
        )
        # This process has no annotation to decode by: the result is JSON.
        assert await job.result(timeout=30) == "2026-01-01T00:01:00+00:00"
        # The producer that has the task decodes the same job's result.
        again = await producer.get_job(job.id).result(timeout=30)
        assert again == dt.datetime(2026, 1, 1, 0, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("name", "kwargs", "pattern"),
    [
        (
            "times",
            {"when": "yesterday", "day": dt.date.today(), "at": dt.time(), "span": 1},
            r"argument 'when' is 'yesterday', not a valid datetime\.datetime",
        ),
        (
            "times",
            {"when": dt.datetime.now(), "day": dt.datetime.now(), "at": dt.time(), "span": 1},
            r"argument 'day' must be datetime\.date, got datetime\.datetime",
        ),
        (
            "ids",
            {"key": 42, "amount": Decimal(1)},
            r"argument 'key' must be uuid\.UUID, got int",
        ),
        (
            "ids",
            {"key": uuid.uuid4(), "amount": Decimal("NaN")},
            r"argument 'amount' NaN is not a finite number",
        ),
        (
            "enums",
            {"color": "blue", "level": Level.LOW, "by_level": {}},
            r"argument 'color' is 'blue', not a value of (tests\.)?typedapp\.Color "
            r"\('red', 'green'\)",
        ),
        (
            "order",
            {
                "order": Order(uuid.uuid4(), dt.datetime.now(), [Line("x", "cheap")]),  # type: ignore[arg-type]
                "extra": [],
            },
            r"argument 'order\.lines\[0\]\.price' is 'cheap', not a valid decimal\.Decimal",
        ),
        (
            "invoice",
            {"invoice": {"number": "seven", "due": "2027-01-01T00:00:00Z", "amount": "1"}},
            r"argument 'invoice' does not validate as (tests\.)?typedapp\.Invoice",
        ),
    ],
)
async def test_values_that_do_not_fit_are_refused_at_enqueue_and_nothing_is_written(
    pg_dsn: str, schema: str, name: str, kwargs: dict[str, Any], pattern: str
) -> None:
    app = taskq.App(pg_dsn, schema=schema)
    task = getattr(typedapp, name)
    app.task(name=task.name)(task.fn)
    async with app:
        with pytest.raises(taskq.SerializationError, match=pattern):
            await app.tasks[task.name].enqueue(**kwargs)
        with pytest.raises(taskq.SerializationError, match=pattern):
            await app.tasks[task.name].enqueue_many([kwargs])
        async with app.pool.acquire() as conn:
            assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".jobs') == 0


async def test_values_without_a_known_encoding_are_refused(app: taskq.App) -> None:
    @app.task
    async def untyped(
        when: Any, tags: set[str], pair: int | uuid.UUID | dt.date | None = None
    ) -> None:
        return None

    async with app:
        # A datetime where no annotation says so: refused, with the fix.
        with pytest.raises(taskq.SerializationError) as info:
            await untyped.enqueue(when=dt.datetime.now(), tags=set())
        assert info.value.path == "when"
        assert "annotate the task's parameter as datetime.datetime" in str(info.value)
        # An object of a class taskq knows nothing of.
        with pytest.raises(taskq.SerializationError, match="argument 'when' is of type"):
            await untyped.enqueue(when=object(), tags=set())
        # A union of two types that need encoding cannot be told apart in JSON.
        with pytest.raises(taskq.SerializationError, match="cannot be told apart"):
            await untyped.enqueue(when=1, tags=set(), pair=uuid.uuid4())
        async with app.pool.acquire() as conn:
            assert await conn.fetchval(f'SELECT count(*) FROM "{app.schema}".jobs') == 0


@dataclasses.dataclass
class Shipment:
    id: uuid.UUID
    weight_kg: Decimal


async def test_a_value_that_no_longer_decodes_fails_the_attempt_naming_argument_and_type(
    app: taskq.App,
) -> None:
    # The job was written by older code (here: by name, as plain JSON) and the
    # dataclass changed since: the worker refuses it clearly, retries per the
    # policy, then keeps it as a dead letter that can be re-run.
    @app.task(name="ship", retry=taskq.Retry(attempts=2, wait=0))
    async def ship(shipment: Shipment) -> None:
        raise AssertionError("must not run")

    async with app:
        job = await app.enqueue("ship", {"shipment": {"id": str(uuid.uuid4()), "weight_kg": "1.5"}})
        # Change what the stored arguments say behind the App's back: a field renamed.
        async with app.pool.acquire() as conn:
            await conn.execute(
                f'UPDATE "{app.schema}".jobs SET args = $1::jsonb WHERE id = $2',
                orjson.dumps({"shipment": {"id": str(uuid.uuid4()), "weight": "1.5"}}).decode(),
                job.id,
            )
        stats = await app.drain()
        assert (stats.retried, stats.failed) == (1, 1)
        with pytest.raises(taskq.JobFailed) as info:
            await job.result(timeout=5)
    failed = info.value
    assert failed.attempts == 2
    assert failed.error_type == "taskq.DecodeError"
    assert "argument 'shipment' does not decode to" in failed.error_message
    assert "Shipment" in failed.error_message
    assert "field(s) 'weight'" in failed.error_message


async def test_result_that_no_longer_decodes_raises_decode_error(app: taskq.App) -> None:
    @app.task(name="when")
    async def when() -> dt.date:
        return dt.date(2026, 1, 2)

    async with app:
        job = await when.enqueue()
        await app.drain()
        assert await job.result(timeout=5) == dt.date(2026, 1, 2)
        async with app.pool.acquire() as conn:
            await conn.execute(
                f'UPDATE "{app.schema}".history SET result = \'"soon"\' WHERE id = $1', job.id
            )
        with pytest.raises(taskq.DecodeError, match=r"result of task 'when' does not decode"):
            await job.result(timeout=5)


async def test_a_result_that_does_not_fit_its_annotation_fails_the_job(app: taskq.App) -> None:
    @app.task(name="liar", retry=taskq.Retry(attempts=3, wait=0))
    async def liar() -> uuid.UUID:
        return "not-a-uuid"  # type: ignore[return-value]

    async with app:
        job = await liar.enqueue()
        stats = await app.drain()
        assert stats.failed == 1 and stats.retried == 0  # the same every time: no retry
        with pytest.raises(taskq.JobFailed, match="result of task 'liar'") as info:
            await job.result(timeout=5)
        assert info.value.error_type == "taskq.SerializationError"


@dataclasses.dataclass
class Later:
    """Defined after the task that names it (a forward reference)."""

    at: dt.datetime


async def test_annotations_are_resolved_when_first_used(app: taskq.App) -> None:
    @app.task(name="fwd")
    async def fwd(items: list[Later], by_day: dict[dt.date, list[Later]]) -> list[Later]:
        assert all(isinstance(i.at, dt.datetime) for i in items)
        return [*items, *[i for v in by_day.values() for i in v]]

    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    async with app:
        job = await fwd.enqueue(items=[Later(now)], by_day={now.date(): [Later(now)]})
        with pytest.raises(taskq.SerializationError, match=r"argument 'items\[1\]\.at'"):
            await fwd.enqueue(items=[Later(now), Later("noon")], by_day={})  # type: ignore[arg-type]
        await app.drain()
        assert await job.result(timeout=5) == [Later(now), Later(now)]


@dataclasses.dataclass
class Node:
    name: str
    born: dt.date
    children: list[Node] = dataclasses.field(default_factory=list)


async def test_recursive_dataclasses(app: taskq.App) -> None:
    @app.task(name="tree")
    async def tree(root: Node) -> Node:
        assert isinstance(root.children[0].children[0].born, dt.date)
        return root

    day = dt.date(2026, 1, 1)
    root = Node("a", day, [Node("b", day, [Node("c", day)]), Node("d", day)])
    async with app:
        job = await tree.enqueue(root=root)
        assert (await job.status()).args["root"]["children"][0]["children"][0][
            "born"
        ] == "2026-01-01"
        await app.drain()
        assert await job.result(timeout=5) == root


async def test_plain_tasks_pay_nothing(app: taskq.App) -> None:
    @app.task
    async def plain(
        a: int, b: str, c: dict[str, Any], d: list[int] | None = None
    ) -> dict[str, int]:
        return {"a": a}

    assert not plain.codec.typed
    stored = {"a": 1, "b": "x", "c": {}}
    assert plain.codec.encode_args(stored) is stored  # no copy, no walk


def test_pydantic_is_never_imported_for_plain_tasks() -> None:
    # pydantic is imported by this module; the check is that taskq does not
    # need it: a fresh interpreter with typed (non-pydantic) tasks never loads it.
    code = (
        "import sys, datetime, taskq\n"
        "app = taskq.App('postgresql://unused')\n"
        "@app.task\n"
        "def f(x: datetime.date) -> datetime.date: return x\n"
        "assert f.codec.encode_args({'x': datetime.date(2026, 1, 1)}) == {'x': '2026-01-01'}\n"
        "assert 'pydantic' not in sys.modules, 'pydantic was imported'\n"
    )
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert pydantic.VERSION  # the model test above ran with pydantic present
