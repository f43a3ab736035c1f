"""Tasks with typed arguments and results, run by a real worker process in test_typed.py.

Each task checks that every argument arrived as the annotated type (not as
its JSON form) and returns it, so the test also sees the result decoded.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import uuid
from decimal import Decimal
from typing import Any, NotRequired, TypedDict

import pydantic

import taskq

app = taskq.App()  # DSN and schema from $TASKQ_DSN and $TASKQ_SCHEMA


def expect(value: Any, kind: type | tuple[type, ...], name: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name} arrived as {type(value).__name__}: {value!r}")


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Line:
    sku: str
    price: Decimal
    shipped: dt.date | None = None


@dataclasses.dataclass
class Order:
    id: uuid.UUID
    placed: dt.datetime
    lines: list[Line]
    tags: frozenset[str] = frozenset()


class Address(TypedDict):
    city: str
    since: dt.date
    color: Color
    note: NotRequired[str]


class Invoice(pydantic.BaseModel):
    number: int
    due: dt.datetime
    amount: Decimal
    lines: list[str] = []


@app.task(name="typed.times")
def times(when: dt.datetime, day: dt.date, at: dt.time, span: dt.timedelta) -> dt.datetime:
    expect(when, dt.datetime, "when")
    expect(day, dt.date, "day")
    expect(at, dt.time, "at")
    expect(span, dt.timedelta, "span")
    return when + span


@app.task(name="typed.ids")
async def ids(key: uuid.UUID, amount: Decimal, maybe: uuid.UUID | None = None) -> list[uuid.UUID]:
    expect(key, uuid.UUID, "key")
    expect(amount, Decimal, "amount")
    expect(maybe, (uuid.UUID, type(None)), "maybe")
    if amount != Decimal("12345678901234567890.123456789"):
        raise ValueError(f"amount lost digits: {amount}")
    return [key] if maybe is None else [key, maybe]


@app.task(name="typed.enums")
async def enums(color: Color, level: Level, by_level: dict[Level, Color]) -> tuple[Color, Level]:
    expect(color, Color, "color")
    expect(level, Level, "level")
    for k, v in by_level.items():
        expect(k, Level, "by_level key")
        expect(v, Color, "by_level value")
    return color, level


@app.task(name="typed.order")
async def order(order: Order, extra: list[Line]) -> Order:
    expect(order, Order, "order")
    expect(order.id, uuid.UUID, "order.id")
    expect(order.placed, dt.datetime, "order.placed")
    expect(order.tags, frozenset, "order.tags")
    for line in [*order.lines, *extra]:
        expect(line, Line, "line")
        expect(line.price, Decimal, "line.price")
    return dataclasses.replace(order, lines=[*order.lines, *extra])


@app.task(name="typed.address")
async def address(home: Address) -> Address:
    expect(home, dict, "home")
    expect(home["since"], dt.date, "home.since")
    expect(home["color"], Color, "home.color")
    return home


@app.task(name="typed.invoice")
async def invoice(invoice: Invoice) -> Invoice:
    expect(invoice, Invoice, "invoice")
    expect(invoice.due, dt.datetime, "invoice.due")
    return invoice.model_copy(update={"number": invoice.number + 1})
