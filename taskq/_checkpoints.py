"""Recorded steps of a job (``ctx.step()``): their SQL for one schema, and how results travel.

A step's result is stored in ``job_checkpoints`` (migration 6), one row per
job and step name, the first time the step succeeds. A later attempt of the
job reads all of its rows at its first ``ctx.step()`` and returns the
recorded result of a step instead of running it again. The result travels as
a task's does: encoded by the step function's return annotation
(``converter_for``), decoded by it on replay.

Only the schema name is pasted into the SQL (validated and quoted by
``quote_schema``); every value travels as a bind parameter.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import logging
import typing
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from ._codec import converter_for
from ._converters import Converter, PathError, decode_at, encode_at
from ._errors import DecodeError, SerializationError
from ._names import quote_schema
from ._serialization import decode, encode

log = logging.getLogger("taskq.worker")

#: An asyncpg Connection or a pool's connection proxy (asyncpg ships no types).
Conn: TypeAlias = Any


@dataclass(slots=True, frozen=True)
class Recorded:
    """What recording a step found.

    ``held``: the attempt still held the job's lease (else nothing was
    written). ``inserted``: this call wrote the row. ``result``: when held and
    not inserted, the JSON text of the result recorded before (by another
    attempt that got there first, or by an earlier try of this same record).
    """

    held: bool
    inserted: bool
    result: str | None = None


class Checkpoints:
    """The statements on ``job_checkpoints`` of one schema, as methods taking a connection."""

    def __init__(self, schema: str) -> None:
        s = quote_schema(schema)
        self.schema = schema
        self._load = (
            f"SELECT name, result::text AS result FROM {s}.job_checkpoints WHERE job_id = $1"
        )
        # The record is written only while the attempt holds the job's lease:
        # a worker cut off from its job (rescued, taken over elsewhere) must
        # not record a step under the new attempt's feet. On a connection of
        # its own the row is locked FOR SHARE for the statement: a rescue that
        # changes the token waits for the insert to commit (so the next
        # attempt, claimed after the rescue, reads this row), or the insert
        # waits for the rescue and then finds the token changed (Postgres
        # re-checks the locked row's newest version) and writes nothing.
        # Inside the job's ctx.transaction() the row is not locked (that would
        # hold up the lease renewals of all the worker's jobs for as long as
        # the transaction lasts); the transaction's commit checks the token
        # again and rolls the record back with the rest if it changed.
        record = (
            "WITH held AS (SELECT 1 FROM {s}.jobs WHERE id = $1 AND lease_token = $2{lock}), "
            "ins AS (INSERT INTO {s}.job_checkpoints (job_id, name, result, attempt) "
            "SELECT $1, $3, $4::text::jsonb, $5 FROM held "
            "ON CONFLICT (job_id, name) DO NOTHING RETURNING 1) "
            "SELECT EXISTS (SELECT FROM held) AS held, EXISTS (SELECT FROM ins) AS inserted"
        )
        self._record_locked = record.format(s=s, lock=" FOR SHARE")
        self._record_in_transaction = record.format(s=s, lock="")
        # The row another attempt recorded first (the insert found it): a
        # statement of its own, whose snapshot sees that attempt's commit.
        self._recorded = (
            f"SELECT result::text FROM {s}.job_checkpoints WHERE job_id = $1 AND name = $2"
        )
        # Purge: the checkpoints of jobs in an id range that exist no more
        # (in neither table: a job being retried moved to jobs keeps its own).
        self._delete_orphans = (
            f"DELETE FROM {s}.job_checkpoints AS c WHERE c.job_id > $1 AND c.job_id <= $2 "
            f"AND NOT EXISTS (SELECT FROM {s}.history AS h WHERE h.id = c.job_id) "
            f"AND NOT EXISTS (SELECT FROM {s}.jobs AS j WHERE j.id = c.job_id)"
        )

    async def load(self, conn: Conn, job_id: int) -> dict[str, str | None]:
        """The job's recorded steps: name -> result as JSON text (None for a None result)."""
        rows = await conn.fetch(self._load, job_id)
        return {r["name"]: r["result"] for r in rows}

    async def record(
        self,
        conn: Conn,
        job_id: int,
        token: uuid.UUID,
        name: str,
        result: str | None,
        attempt: int,
        *,
        in_transaction: bool,
    ) -> Recorded:
        """Record a step's result if the lease is still ``token``'s and no attempt did before.

        Safe to repeat: a repeat finds the row the first try wrote and
        returns its (equal) result.
        """
        sql = self._record_in_transaction if in_transaction else self._record_locked
        row = await conn.fetchrow(sql, job_id, token, name, result, attempt)
        if not row["held"] or row["inserted"]:
            return Recorded(held=bool(row["held"]), inserted=bool(row["inserted"]))
        recorded = await conn.fetchval(self._recorded, job_id, name)
        return Recorded(held=True, inserted=False, result=recorded)

    async def delete_orphans(self, conn: Conn, after_id: int, last_id: int) -> int:
        """Delete the checkpoints of jobs with ids in ``(after_id, last_id]`` that are gone."""
        status: str = await conn.execute(self._delete_orphans, after_id, last_id)
        return int(status.rpartition(" ")[2] or 0)


@functools.lru_cache(maxsize=64)
def checkpoints_for(schema: str) -> Checkpoints:
    """The (shared) statements of one schema."""
    return Checkpoints(schema)


# -- results ------------------------------------------------------------------------


def result_converter(fn: Callable[..., Any]) -> Converter | None:
    """The converter for what ``fn`` returns (awaited), by its return annotation.

    None when the result is plain JSON: no annotation, a plain JSON type, or
    an annotation that cannot be resolved (logged once). Built once per
    function (held weakly: a closure made for one attempt does not stay).
    """
    function = _annotated_function(fn)
    if function is None:
        return None
    try:
        return _CONVERTERS[function]
    except KeyError:
        pass
    annotation = _return_annotation(function)
    origin = typing.get_origin(annotation)
    if origin in (collections.abc.Awaitable, collections.abc.Coroutine) and not (
        inspect.iscoroutinefunction(function)
    ):
        # A plain function returning an awaitable: the step's value is what it gives.
        args = typing.get_args(annotation)
        annotation = args[-1] if args else None
    conv = None if annotation is None else converter_for(annotation)
    _CONVERTERS[function] = conv
    return conv


#: Converters by the function whose return annotation they were built from.
_CONVERTERS: weakref.WeakKeyDictionary[Any, Converter | None] = weakref.WeakKeyDictionary()


def _annotated_function(fn: Any) -> Any:
    """The Python function whose return annotation says what ``fn`` returns, or None."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.ismethod(fn):
        fn = fn.__func__
    if not inspect.isfunction(fn):
        fn = getattr(type(fn), "__call__", None)  # noqa: B004  (a callable object)
        if inspect.ismethod(fn):
            fn = fn.__func__
    return fn if inspect.isfunction(fn) else None  # builtins have no annotations to read


def _return_annotation(function: Any) -> Any:
    """The resolved return annotation of a function, or None."""
    unwrapped = inspect.unwrap(function)
    try:
        return typing.get_type_hints(unwrapped, include_extras=True).get("return")
    except Exception:
        pass
    # One annotation that cannot be resolved makes get_type_hints fail as a
    # whole (a class local to a function, under `from __future__ import
    # annotations`): resolve the return annotation alone.
    raw = getattr(unwrapped, "__annotations__", {}).get("return")
    if not isinstance(raw, str):
        return raw
    try:
        return eval(raw, dict(getattr(unwrapped, "__globals__", {})))  # the module's own text
    except Exception as exc:
        log.warning(
            "taskq: the return annotation %r of step function %s cannot be resolved (%s); "
            "its result is recorded as plain JSON",
            raw,
            getattr(unwrapped, "__qualname__", unwrapped),
            exc,
        )
        return None


def encode_result(conv: Converter | None, value: Any, step: str, max_bytes: int) -> str | None:
    """A step's result -> JSON text (None for None); SerializationError naming the step."""
    if value is None:
        return None
    what = f"result of step {step!r}"
    if conv is not None:
        try:
            value = encode_at(conv, value, "")
        except PathError as exc:
            where = f" at {exc.path!r}" if exc.path else ""
            raise SerializationError(
                f"{what}{where} {exc.reason}; the step was not recorded", path=exc.path
            ) from None
    try:
        return encode(value, what=what, max_bytes=max_bytes)
    except SerializationError as exc:
        raise SerializationError(f"{exc}; the step was not recorded", path=exc.path) from None


def decode_result(conv: Converter | None, text: str | None, step: str) -> Any:
    """A recorded result -> a value of the step function's return annotation."""
    value = decode(text)
    if conv is None or value is None:
        return value
    try:
        return decode_at(conv, value, "")
    except PathError as exc:
        raise DecodeError(
            f"the recorded result of step {step!r} does not decode to {conv.name}: "
            f"{exc.path or 'it'} {exc.reason}",
            path=exc.path,
        ) from None
