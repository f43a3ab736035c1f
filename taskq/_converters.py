"""Converters: how one annotated type travels as JSON, and back.

:mod:`taskq._codec` picks a converter for each annotation; each converter here
encodes values of its type to JSON values and decodes them again, refusing
what does not fit with a message (no path yet; ``encode_at``/``decode_at`` add
where inside the value it happened).
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from ._inputs import StepFailed

PLAIN = (str, int, float, bool, type(None))
NONE_TYPE = type(None)


class Refused(Exception):
    """A value does not fit its annotation; the message says how (no path yet)."""


def type_name(tp: Any) -> str:
    if isinstance(tp, type):
        if tp.__module__ in ("builtins", "typing"):
            return tp.__qualname__
        return f"{tp.__module__}.{tp.__qualname__}"
    return repr(tp).replace("typing.", "")


class Converter:
    """Encodes values of one annotated type to JSON values, and decodes them back.

    ``encode`` accepts a value of the type, or the JSON form of one (which it
    checks by decoding), and returns the JSON form. ``decode`` turns the JSON
    form back into the type. Both raise ``Refused`` saying what is wrong.
    """

    name: str

    def encode(self, value: Any) -> Any:
        raise NotImplementedError

    def decode(self, value: Any) -> Any:
        raise NotImplementedError


class Scalar(Converter):
    """A type carried as one JSON string (or number): datetime, UUID, Decimal..."""

    def __init__(
        self,
        tp: type,
        to_json: Callable[[Any], Any],
        from_json: Callable[[Any], Any],
        json_types: tuple[type, ...] = (str,),
        check: Callable[[Any], bool] | None = None,
    ) -> None:
        self.tp = tp
        self.name = type_name(tp)
        self.to_json = to_json
        self.from_json = from_json
        self.json_types = json_types
        self.check = check or (lambda v: isinstance(v, tp))

    def encode(self, value: Any) -> Any:
        if self.check(value):
            return self.to_json(value)
        if isinstance(value, self.json_types) and not isinstance(value, bool):
            # Already in its JSON form (e.g. enqueued by name): keep it if it decodes.
            return self.to_json(self.decode(value))
        raise Refused(f"must be {self.name}, got {type_name(type(value))}")

    def decode(self, value: Any) -> Any:
        if not isinstance(value, self.json_types) or isinstance(value, bool):
            raise Refused(
                f"must be {self.name} (stored as {_json_kind(self.json_types)}), "
                f"got {type_name(type(value))} {value!r:.80}"
            )
        try:
            return self.from_json(value)
        except (ValueError, TypeError, ArithmeticError) as exc:
            raise Refused(f"is {value!r:.80}, not a valid {self.name} ({exc})") from None


def _json_kind(json_types: tuple[type, ...]) -> str:
    return " or ".join(
        {str: "a string", int: "an integer", float: "a number"}[t] for t in json_types
    )


def _decimal_from_json(value: Any) -> Decimal:
    try:
        # A float from a producer writing JSON by hand: its shortest repr,
        # not its binary expansion (Decimal(0.1) has 55 digits).
        result = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise ValueError("not a decimal number") from None
    if not result.is_finite():
        raise ValueError("not a finite number")
    return result


def _decimal_to_json(value: Decimal | int) -> str:
    if isinstance(value, Decimal) and not value.is_finite():
        raise Refused(f"{value} is not a finite number, which JSON cannot carry")
    return str(value)


def _date_from_json(value: str) -> dt.date:
    return dt.date.fromisoformat(value)


def _scalars() -> dict[type, Scalar]:
    return {
        # datetime before date: a datetime is also a date.
        dt.datetime: Scalar(dt.datetime, dt.datetime.isoformat, dt.datetime.fromisoformat),
        dt.date: Scalar(
            dt.date,
            dt.date.isoformat,
            _date_from_json,
            check=lambda v: isinstance(v, dt.date) and not isinstance(v, dt.datetime),
        ),
        dt.time: Scalar(dt.time, dt.time.isoformat, dt.time.fromisoformat),
        # Seconds as a number: readable by any consumer, exact to the microsecond
        # for any span a job would carry.
        dt.timedelta: Scalar(
            dt.timedelta,
            dt.timedelta.total_seconds,
            lambda s: dt.timedelta(seconds=s),
            json_types=(int, float),
        ),
        uuid.UUID: Scalar(uuid.UUID, str, uuid.UUID),
        # A string, so no digit is lost to a float on the way.
        Decimal: Scalar(
            Decimal,
            _decimal_to_json,
            _decimal_from_json,
            json_types=(str, int, float),
            check=lambda v: isinstance(v, Decimal) or (type(v) is int),
        ),
    }


SCALARS = _scalars()


class EnumConverter(Converter):
    def __init__(self, tp: type[enum.Enum]) -> None:
        self.tp = tp
        self.name = type_name(tp)

    def encode(self, value: Any) -> Any:
        # A member, or a member's value given as such.
        member = value if isinstance(value, self.tp) else self.decode(value)
        member_value = member.value
        if not isinstance(member_value, PLAIN):
            raise Refused(
                f"{self.name} member values must be str, int, float or bool to travel as JSON, "
                f"got {type_name(type(member_value))}"
            )
        return member_value

    def decode(self, value: Any) -> Any:
        try:
            return self.tp(value)
        except (ValueError, TypeError):
            choices = ", ".join(repr(m.value) for m in self.tp)
            raise Refused(f"is {value!r:.80}, not a value of {self.name} ({choices})") from None


class FieldsConverter(Converter):
    """A JSON object with known keys: dataclasses and TypedDicts."""

    def __init__(
        self,
        tp: Any,
        fields: dict[str, Converter | None],
        required: frozenset[str],
        *,
        build: Callable[[dict[str, Any]], Any],
        read: Callable[[Any], dict[str, Any]],
        is_instance: Callable[[Any], bool],
    ) -> None:
        self.tp = tp
        self.name = type_name(tp)
        self.fields = fields
        self.required = required
        self.build = build
        self.read = read
        self.is_instance = is_instance

    def encode(self, value: Any) -> Any:
        if self.is_instance(value):
            items = self.read(value)
        elif isinstance(value, Mapping):
            return self.encode(self.decode(value))  # its JSON form: check it builds
        else:
            raise Refused(f"must be {self.name}, got {type_name(type(value))}")
        out: dict[str, Any] = {}
        for key, item in items.items():
            conv = self.fields.get(key)
            out[key] = encode_at(conv, item, key) if conv is not None else item
        return out

    def decode(self, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise Refused(f"must be {self.name} (stored as an object), got {value!r:.80}")
        unknown = [k for k in value if k not in self.fields]
        if unknown:
            raise Refused(
                f"has field(s) {', '.join(map(repr, unknown))} that {self.name} does not have"
            )
        missing = sorted(self.required - value.keys())
        if missing:
            raise Refused(f"lacks field(s) {', '.join(map(repr, missing))} of {self.name}")
        items: dict[str, Any] = {}
        for key, item in value.items():
            conv = self.fields[key]
            items[key] = decode_at(conv, item, key) if conv is not None else item
        try:
            return self.build(items)
        except (TypeError, ValueError) as exc:
            raise Refused(f"does not make a {self.name}: {exc}") from None


class PydanticConverter(Converter):
    def __init__(self, tp: Any) -> None:
        self.tp = tp
        self.name = type_name(tp)

    def encode(self, value: Any) -> Any:
        if not isinstance(value, self.tp):
            if not isinstance(value, Mapping):
                raise Refused(f"must be {self.name}, got {type_name(type(value))}")
            value = self.decode(value)
        return value.model_dump(mode="json")

    def decode(self, value: Any) -> Any:
        import pydantic  # present: the annotation is one of its models

        try:
            return self.tp.model_validate(value)
        except pydantic.ValidationError as exc:
            raise Refused(f"does not validate as {self.name}: {exc}") from None


class SequenceConverter(Converter):
    """list[X], tuple[X, ...], set[X], frozenset[X], Sequence[X]..."""

    def __init__(self, tp: Any, item: Converter | None, make: Callable[[Any], Any]) -> None:
        self.name = type_name(tp)
        self.item = item
        self.make = make

    def encode(self, value: Any) -> Any:
        if isinstance(value, str | bytes | Mapping) or not isinstance(
            value, list | tuple | set | frozenset
        ):
            raise Refused(f"must be {self.name}, got {type_name(type(value))}")
        if self.item is None:
            return list(value)
        return [encode_at(self.item, v, f"[{i}]") for i, v in enumerate(value)]

    def decode(self, value: Any) -> Any:
        if not isinstance(value, list):
            raise Refused(f"must be {self.name} (stored as an array), got {value!r:.80}")
        if self.item is not None:
            value = [decode_at(self.item, v, f"[{i}]") for i, v in enumerate(value)]
        try:
            return self.make(value)
        except TypeError as exc:  # e.g. unhashable items for a set
            raise Refused(f"does not make a {self.name}: {exc}") from None


class TupleConverter(Converter):
    """tuple[X, Y, Z]: a fixed-length array, one converter per position."""

    def __init__(self, tp: Any, items: list[Converter | None]) -> None:
        self.name = type_name(tp)
        self.items = items

    def encode(self, value: Any) -> Any:
        if not isinstance(value, list | tuple) or len(value) != len(self.items):
            raise Refused(f"must be {self.name}, got {value!r:.80}")
        return [
            encode_at(c, v, f"[{i}]") if c is not None else v
            for i, (c, v) in enumerate(zip(self.items, value, strict=True))
        ]

    def decode(self, value: Any) -> Any:
        if not isinstance(value, list) or len(value) != len(self.items):
            raise Refused(f"must be {self.name} (an array of {len(self.items)}), got {value!r:.80}")
        return tuple(
            decode_at(c, v, f"[{i}]") if c is not None else v
            for i, (c, v) in enumerate(zip(self.items, value, strict=True))
        )


class DictConverter(Converter):
    """dict[K, V] and Mapping[K, V]: a JSON object; keys other than str go as strings."""

    def __init__(
        self, tp: Any, key: Scalar | EnumConverter | None, key_tp: Any, value: Converter | None
    ):
        self.name = type_name(tp)
        self.key = key
        self.key_tp = key_tp
        self.value = value

    def _encode_key(self, key: Any) -> str:
        if self.key is None:
            if self.key_tp is int and type(key) is int:
                return str(key)
            if isinstance(key, str):
                return key
            raise Refused(f"has a key {key!r:.80} of type {type_name(type(key))}, not str")
        encoded = self.key.encode(key)
        return encoded if isinstance(encoded, str) else str(encoded)

    def _decode_key(self, key: str) -> Any:
        if self.key is None:
            if self.key_tp is int:
                try:
                    return int(key)
                except ValueError:
                    raise Refused(f"has a key {key!r:.80} that is not an integer") from None
            return key
        if isinstance(self.key, EnumConverter):
            # An int-valued enum's key arrives as a string.
            for member in self.key.tp:
                if str(member.value) == key:
                    return member
        return self.key.decode(key)

    def encode(self, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise Refused(f"must be {self.name}, got {type_name(type(value))}")
        out: dict[str, Any] = {}
        for k, v in value.items():
            name = self._encode_key(k)
            out[name] = encode_at(self.value, v, f"[{name!r}]") if self.value is not None else v
        return out

    def decode(self, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise Refused(f"must be {self.name} (stored as an object), got {value!r:.80}")
        return {
            self._decode_key(k): (
                decode_at(self.value, v, f"[{k!r}]") if self.value is not None else v
            )
            for k, v in value.items()
        }


class OptionalConverter(Converter):
    """X | None: None travels as null, anything else as X."""

    def __init__(self, inner: Converter) -> None:
        self.inner = inner
        self.name = f"{inner.name} | None"

    def encode(self, value: Any) -> Any:
        return None if value is None else self.inner.encode(value)

    def decode(self, value: Any) -> Any:
        return None if value is None else self.inner.decode(value)


class Unsupported(Converter):
    """An annotation taskq cannot carry faithfully (e.g. a union of two typed members)."""

    def __init__(self, tp: Any, reason: str) -> None:
        self.name = type_name(tp)
        self.reason = reason

    def encode(self, value: Any) -> Any:
        raise Refused(f"is annotated {self.name}, which taskq cannot encode: {self.reason}")

    def decode(self, value: Any) -> Any:
        raise Refused(f"is annotated {self.name}, which taskq cannot decode: {self.reason}")


class PathError(Exception):
    """A refusal with the path inside the value where it happened."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


def _join(step: str, inner: str) -> str:
    if not step or not inner:
        return step or inner
    return f"{step}{inner}" if inner.startswith("[") else f"{step}.{inner}"


def encode_at(conv: Converter, value: Any, step: str) -> Any:
    try:
        return conv.encode(value)
    except Refused as exc:
        raise PathError(step, str(exc)) from None
    except PathError as exc:
        raise PathError(_join(step, exc.path), exc.reason) from None


def decode_at(conv: Converter, value: Any, step: str) -> Any:
    if isinstance(value, StepFailed):
        return value  # a failed workflow parent, in place of its result: the task checks
    try:
        return conv.decode(value)
    except Refused as exc:
        raise PathError(step, str(exc)) from None
    except PathError as exc:
        raise PathError(_join(step, exc.path), exc.reason) from None
