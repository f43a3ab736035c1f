"""JSON encoding of job arguments and results (orjson), with errors that name the bad value."""

from __future__ import annotations

import math
from typing import Any

import orjson

from ._codec import annotation_hint
from ._errors import SerializationError

#: Largest encoded payload (arguments or result) accepted, in bytes. Postgres
#: could store far more, but a queue row that big is almost always a mistake
#: (pass a reference to the data instead) and it slows every claim.
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024

_SCALARS = (str, int, bool, type(None))

#: Containers nested deeper than this are refused (orjson's own limit). The
#: walk that explains a refusal stops there too: without the bound a value
#: nested a few thousand levels deep ended the walk with a RecursionError.
_MAX_DEPTH = 254


def _find_problem(value: Any, path: str, depth: int = 0) -> tuple[str, str] | None:
    """Return (path, reason) of the first value that JSON cannot carry faithfully."""
    if isinstance(value, dict | list | tuple) and depth >= _MAX_DEPTH:
        where = path if len(path) <= 60 else f"{path[:40]}...{path[-17:]}"
        return where, f"is nested more than {_MAX_DEPTH} levels deep"
    if isinstance(value, str):
        if "\x00" in value:
            return path, "contains a NUL character (\\x00), which Postgres cannot store in JSON"
        return None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            return path, "is an integer outside the 64-bit range"
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return path, f"is {value!r}, which JSON cannot represent"
        if 1e16 <= abs(value) < 2**64 and value.is_integer():
            # orjson writes it as 1e16; jsonb keeps the number, not its
            # spelling, and returns 10000000000000000, which reads back as an
            # int (past 64 bits orjson reads a float again).
            return path, (
                f"is {value!r}, an integral float that Postgres would return as an integer; "
                "pass int(...) or a string"
            )
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path}[{key!r}]", f"has a non-string key of type {type(key).__name__}"
            if "\x00" in key:
                # Postgres refuses \u0000 anywhere in jsonb, keys included: found
                # here, the caller's transaction is not aborted by a failed INSERT.
                where = f"{path}[{key!r}]" if path else key
                return where, "is a key with a NUL character (\\x00), which Postgres cannot store"
            sub = f"{path}.{key}" if path else key
            problem = _find_problem(item, sub, depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            problem = _find_problem(item, f"{path}[{index}]", depth + 1)
            if problem:
                return problem
        return None
    kind = type(value)
    return (
        path,
        f"is of type {kind.__module__}.{kind.__qualname__}, not JSON{annotation_hint(value)}",
    )


def _needs_check(value: Any) -> bool:
    # orjson already refuses most bad values; NaN/Infinity (silently written as
    # null) and NUL characters (refused by jsonb at INSERT time) slip through.
    if isinstance(value, _SCALARS):
        return isinstance(value, str) and "\x00" in value
    return True


def _suspicious(value: Any) -> bool:
    """Whether ``value`` (usually a dict of arguments) needs the full walk."""
    if isinstance(value, dict):
        return any(_needs_check(v) for v in value.values()) or any(
            isinstance(k, str) and "\x00" in k for k in value
        )
    return _needs_check(value)


def encode(value: Any, *, what: str, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """Encode ``value`` to JSON text, or raise SerializationError naming the bad part.

    ``what`` names the value in messages ("arguments of task 'x'", "result").
    For a dict of keyword arguments the path starts at the argument name.
    """
    if _suspicious(value):
        problem = _find_problem(value, "")
        if problem:
            raise _error(what, *problem)
    try:
        data = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        problem = _find_problem(value, "")
        if problem:
            raise _error(what, *problem) from exc
        raise SerializationError(f"{what} cannot be encoded as JSON: {exc}") from exc
    if len(data) > max_bytes:
        raise SerializationError(
            f"{what} encode to {len(data):,} bytes, over the {max_bytes:,}-byte limit "
            "(store large data elsewhere and pass a reference, or raise max_payload_bytes)",
            path="",
        )
    return data.decode()


def _error(what: str, path: str, reason: str) -> SerializationError:
    where = f"argument {path!r}" if path else "the value"
    return SerializationError(f"{what}: {where} {reason}", path=path)


def decode(text: str | bytes | None) -> Any:
    """Decode JSON text stored by taskq (``None`` stays ``None``)."""
    if text is None:
        return None
    return orjson.loads(text)


def encode_many(values: list[Any], *, what: str, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """Encode a list of payloads as one JSON array, each checked like ``encode``.

    One ``orjson.dumps`` of the whole list is several times cheaper than one
    per item; items are only looked at one by one when something is wrong.
    """
    for value in values:
        if _suspicious(value):
            _check_each(values, what, max_bytes)
            break
    try:
        data = orjson.dumps(values)
    except (TypeError, orjson.JSONEncodeError) as exc:
        _check_each(values, what, max_bytes)
        # Every item alone is fine: one at the depth limit went over it inside the array.
        raise SerializationError(f"{what} cannot be encoded as JSON: {exc}") from exc
    # Every item is at most as long as the whole array.
    if len(data) > max_bytes:
        _check_each(values, what, max_bytes)
    return data.decode()


def _check_each(values: list[Any], what: str, max_bytes: int) -> None:
    for index, value in enumerate(values):
        try:
            encode(value, what=what, max_bytes=max_bytes)
        except SerializationError as exc:
            raise SerializationError(f"item {index}: {exc}", path=exc.path) from exc
