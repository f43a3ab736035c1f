"""Typed arguments and results: the task's own annotations say how to encode them.

Jobs travel as JSON. A parameter annotated with a type JSON cannot carry
(``datetime``, ``date``, ``time``, ``timedelta``, ``UUID``, ``Decimal``, an
``Enum``, a dataclass, a ``TypedDict``, a pydantic model, or a container of
those) is encoded to JSON at ``enqueue()`` and decoded back to that type
before the task runs; the return annotation does the same for
``job.result()``. Parameters annotated with plain JSON types (or not at all)
cost nothing: a task whose annotations need no conversion skips this module.

Each annotation becomes a :class:`Converter` once, when the task is first
used (not when it is decorated: a dataclass named in an annotation may be
defined further down the module).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import inspect
import logging
import sys
import types
import typing
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from ._errors import DecodeError, SerializationError

log = logging.getLogger("taskq")

_PLAIN = (str, int, float, bool, type(None))
_NONE = type(None)


class _Refused(Exception):
    """A value does not fit its annotation; the message says how (no path yet)."""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        if tp.__module__ in ("builtins", "typing"):
            return tp.__qualname__
        return f"{tp.__module__}.{tp.__qualname__}"
    return repr(tp).replace("typing.", "")


class Converter:
    """Encodes values of one annotated type to JSON values, and decodes them back.

    ``encode`` accepts a value of the type, or the JSON form of one (which it
    checks by decoding), and returns the JSON form. ``decode`` turns the JSON
    form back into the type. Both raise ``_Refused`` saying what is wrong.
    """

    name: str

    def encode(self, value: Any) -> Any:
        raise NotImplementedError

    def decode(self, value: Any) -> Any:
        raise NotImplementedError


class _Scalar(Converter):
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
        self.name = _type_name(tp)
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
        raise _Refused(f"must be {self.name}, got {_type_name(type(value))}")

    def decode(self, value: Any) -> Any:
        if not isinstance(value, self.json_types) or isinstance(value, bool):
            raise _Refused(
                f"must be {self.name} (stored as {_json_kind(self.json_types)}), "
                f"got {_type_name(type(value))} {value!r:.80}"
            )
        try:
            return self.from_json(value)
        except (ValueError, TypeError, ArithmeticError) as exc:
            raise _Refused(f"is {value!r:.80}, not a valid {self.name} ({exc})") from None


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
        raise _Refused(f"{value} is not a finite number, which JSON cannot carry")
    return str(value)


def _date_from_json(value: str) -> dt.date:
    return dt.date.fromisoformat(value)


def _scalars() -> dict[type, _Scalar]:
    return {
        # datetime before date: a datetime is also a date.
        dt.datetime: _Scalar(dt.datetime, dt.datetime.isoformat, dt.datetime.fromisoformat),
        dt.date: _Scalar(
            dt.date,
            dt.date.isoformat,
            _date_from_json,
            check=lambda v: isinstance(v, dt.date) and not isinstance(v, dt.datetime),
        ),
        dt.time: _Scalar(dt.time, dt.time.isoformat, dt.time.fromisoformat),
        # Seconds as a number: readable by any consumer, exact to the microsecond
        # for any span a job would carry.
        dt.timedelta: _Scalar(
            dt.timedelta,
            dt.timedelta.total_seconds,
            lambda s: dt.timedelta(seconds=s),
            json_types=(int, float),
        ),
        uuid.UUID: _Scalar(uuid.UUID, str, uuid.UUID),
        # A string, so no digit is lost to a float on the way.
        Decimal: _Scalar(
            Decimal,
            _decimal_to_json,
            _decimal_from_json,
            json_types=(str, int, float),
            check=lambda v: isinstance(v, Decimal) or (type(v) is int),
        ),
    }


_SCALARS = _scalars()


class _Enum(Converter):
    def __init__(self, tp: type[enum.Enum]) -> None:
        self.tp = tp
        self.name = _type_name(tp)

    def encode(self, value: Any) -> Any:
        # A member, or a member's value given as such.
        member = value if isinstance(value, self.tp) else self.decode(value)
        member_value = member.value
        if not isinstance(member_value, _PLAIN):
            raise _Refused(
                f"{self.name} member values must be str, int, float or bool to travel as JSON, "
                f"got {_type_name(type(member_value))}"
            )
        return member_value

    def decode(self, value: Any) -> Any:
        try:
            return self.tp(value)
        except (ValueError, TypeError):
            choices = ", ".join(repr(m.value) for m in self.tp)
            raise _Refused(f"is {value!r:.80}, not a value of {self.name} ({choices})") from None


class _Fields(Converter):
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
        self.name = _type_name(tp)
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
            raise _Refused(f"must be {self.name}, got {_type_name(type(value))}")
        out: dict[str, Any] = {}
        for key, item in items.items():
            conv = self.fields.get(key)
            out[key] = _encode_at(conv, item, key) if conv is not None else item
        return out

    def decode(self, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise _Refused(f"must be {self.name} (stored as an object), got {value!r:.80}")
        unknown = [k for k in value if k not in self.fields]
        if unknown:
            raise _Refused(
                f"has field(s) {', '.join(map(repr, unknown))} that {self.name} does not have"
            )
        missing = sorted(self.required - value.keys())
        if missing:
            raise _Refused(f"lacks field(s) {', '.join(map(repr, missing))} of {self.name}")
        items: dict[str, Any] = {}
        for key, item in value.items():
            conv = self.fields[key]
            items[key] = _decode_at(conv, item, key) if conv is not None else item
        try:
            return self.build(items)
        except (TypeError, ValueError) as exc:
            raise _Refused(f"does not make a {self.name}: {exc}") from None


class _Pydantic(Converter):
    def __init__(self, tp: Any) -> None:
        self.tp = tp
        self.name = _type_name(tp)

    def encode(self, value: Any) -> Any:
        if not isinstance(value, self.tp):
            if not isinstance(value, Mapping):
                raise _Refused(f"must be {self.name}, got {_type_name(type(value))}")
            value = self.decode(value)
        return value.model_dump(mode="json")

    def decode(self, value: Any) -> Any:
        import pydantic  # present: the annotation is one of its models

        try:
            return self.tp.model_validate(value)
        except pydantic.ValidationError as exc:
            raise _Refused(f"does not validate as {self.name}: {exc}") from None


class _Sequence(Converter):
    """list[X], tuple[X, ...], set[X], frozenset[X], Sequence[X]..."""

    def __init__(self, tp: Any, item: Converter | None, make: Callable[[Any], Any]) -> None:
        self.name = _type_name(tp)
        self.item = item
        self.make = make

    def encode(self, value: Any) -> Any:
        if isinstance(value, str | bytes | Mapping) or not isinstance(
            value, list | tuple | set | frozenset
        ):
            raise _Refused(f"must be {self.name}, got {_type_name(type(value))}")
        if self.item is None:
            return list(value)
        return [_encode_at(self.item, v, f"[{i}]") for i, v in enumerate(value)]

    def decode(self, value: Any) -> Any:
        if not isinstance(value, list):
            raise _Refused(f"must be {self.name} (stored as an array), got {value!r:.80}")
        if self.item is not None:
            value = [_decode_at(self.item, v, f"[{i}]") for i, v in enumerate(value)]
        try:
            return self.make(value)
        except TypeError as exc:  # e.g. unhashable items for a set
            raise _Refused(f"does not make a {self.name}: {exc}") from None


class _Tuple(Converter):
    """tuple[X, Y, Z]: a fixed-length array, one converter per position."""

    def __init__(self, tp: Any, items: list[Converter | None]) -> None:
        self.name = _type_name(tp)
        self.items = items

    def encode(self, value: Any) -> Any:
        if not isinstance(value, list | tuple) or len(value) != len(self.items):
            raise _Refused(f"must be {self.name}, got {value!r:.80}")
        return [
            _encode_at(c, v, f"[{i}]") if c is not None else v
            for i, (c, v) in enumerate(zip(self.items, value, strict=True))
        ]

    def decode(self, value: Any) -> Any:
        if not isinstance(value, list) or len(value) != len(self.items):
            raise _Refused(
                f"must be {self.name} (an array of {len(self.items)}), got {value!r:.80}"
            )
        return tuple(
            _decode_at(c, v, f"[{i}]") if c is not None else v
            for i, (c, v) in enumerate(zip(self.items, value, strict=True))
        )


class _Dict(Converter):
    """dict[K, V] and Mapping[K, V]: a JSON object; keys other than str go as strings."""

    def __init__(self, tp: Any, key: _Scalar | _Enum | None, key_tp: Any, value: Converter | None):
        self.name = _type_name(tp)
        self.key = key
        self.key_tp = key_tp
        self.value = value

    def _encode_key(self, key: Any) -> str:
        if self.key is None:
            if self.key_tp is int and type(key) is int:
                return str(key)
            if isinstance(key, str):
                return key
            raise _Refused(f"has a key {key!r:.80} of type {_type_name(type(key))}, not str")
        encoded = self.key.encode(key)
        return encoded if isinstance(encoded, str) else str(encoded)

    def _decode_key(self, key: str) -> Any:
        if self.key is None:
            if self.key_tp is int:
                try:
                    return int(key)
                except ValueError:
                    raise _Refused(f"has a key {key!r:.80} that is not an integer") from None
            return key
        if isinstance(self.key, _Enum):
            # An int-valued enum's key arrives as a string.
            for member in self.key.tp:
                if str(member.value) == key:
                    return member
        return self.key.decode(key)

    def encode(self, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise _Refused(f"must be {self.name}, got {_type_name(type(value))}")
        out: dict[str, Any] = {}
        for k, v in value.items():
            name = self._encode_key(k)
            out[name] = _encode_at(self.value, v, f"[{name!r}]") if self.value is not None else v
        return out

    def decode(self, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise _Refused(f"must be {self.name} (stored as an object), got {value!r:.80}")
        return {
            self._decode_key(k): (
                _decode_at(self.value, v, f"[{k!r}]") if self.value is not None else v
            )
            for k, v in value.items()
        }


class _Optional(Converter):
    """X | None: None travels as null, anything else as X."""

    def __init__(self, inner: Converter) -> None:
        self.inner = inner
        self.name = f"{inner.name} | None"

    def encode(self, value: Any) -> Any:
        return None if value is None else self.inner.encode(value)

    def decode(self, value: Any) -> Any:
        return None if value is None else self.inner.decode(value)


class _Unsupported(Converter):
    """An annotation taskq cannot carry faithfully (e.g. a union of two typed members)."""

    def __init__(self, tp: Any, reason: str) -> None:
        self.name = _type_name(tp)
        self.reason = reason

    def encode(self, value: Any) -> Any:
        raise _Refused(f"is annotated {self.name}, which taskq cannot encode: {self.reason}")

    def decode(self, value: Any) -> Any:
        raise _Refused(f"is annotated {self.name}, which taskq cannot decode: {self.reason}")


class _PathError(Exception):
    """A refusal with the path inside the value where it happened."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


def _join(step: str, inner: str) -> str:
    if not step or not inner:
        return step or inner
    return f"{step}{inner}" if inner.startswith("[") else f"{step}.{inner}"


def _encode_at(conv: Converter, value: Any, step: str) -> Any:
    try:
        return conv.encode(value)
    except _Refused as exc:
        raise _PathError(step, str(exc)) from None
    except _PathError as exc:
        raise _PathError(_join(step, exc.path), exc.reason) from None


def _decode_at(conv: Converter, value: Any, step: str) -> Any:
    try:
        return conv.decode(value)
    except _Refused as exc:
        raise _PathError(step, str(exc)) from None
    except _PathError as exc:
        raise _PathError(_join(step, exc.path), exc.reason) from None


# -- building converters from annotations -----------------------------------------


def converter_for(tp: Any) -> Converter | None:
    """The converter for an annotation, or None when its values are plain JSON."""
    return _build(tp, ())


def _build(tp: Any, seen: tuple[Any, ...]) -> Converter | None:
    if tp is Any or tp is object or tp in _PLAIN or tp is inspect.Parameter.empty:
        return None
    if isinstance(tp, typing.TypeVar | str | typing.ForwardRef):
        return None
    if isinstance(tp, typing.NewType):
        return _build(tp.__supertype__, seen)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Annotated, typing.Required, typing.NotRequired):
        return _build(args[0], seen)
    if origin is typing.Literal or tp is typing.LiteralString:
        return None
    if origin in (typing.Union, types.UnionType):
        return _union(tp, args, seen)
    if isinstance(tp, type) and tp in _SCALARS:
        return _SCALARS[tp]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _Enum(tp)
    if tp in seen:
        # A recursive type (a tree of dataclasses): it is already being built.
        return _Lazy(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, (*seen, tp))
    if typing.is_typeddict(tp):
        return _typeddict(tp, (*seen, tp))
    if _is_pydantic_model(tp):
        return _Pydantic(tp)
    if origin is not None:
        return _generic(tp, origin, args, seen)
    if tp in (tuple, set, frozenset):
        # Bare containers: JSON arrays of plain values, rebuilt as the container.
        return _Sequence(tp, None, tp)
    return None  # other classes: plain JSON, as before (the value is checked as JSON)


class _Lazy(Converter):
    def __init__(self, tp: Any) -> None:
        self.tp = tp
        self.name = _type_name(tp)
        self._conv: Converter | None = None

    def _get(self) -> Converter:
        if self._conv is None:
            self._conv = converter_for(self.tp) or _Unsupported(self.tp, "no converter")
        return self._conv

    def encode(self, value: Any) -> Any:
        return self._get().encode(value)

    def decode(self, value: Any) -> Any:
        return self._get().decode(value)


def _union(tp: Any, args: tuple[Any, ...], seen: tuple[Any, ...]) -> Converter | None:
    members = [a for a in args if a is not _NONE]
    convs = [_build(a, seen) for a in members]
    if all(c is None for c in convs):
        return None
    if len(members) == 1:
        conv = convs[0]
        assert conv is not None
        return _Optional(conv) if _NONE in args else conv
    return _Unsupported(
        tp,
        "in JSON the members of this union cannot be told apart; annotate one type "
        "(a dataclass or model with a field saying which kind it is)",
    )


def _generic(
    tp: Any, origin: Any, args: tuple[Any, ...], seen: tuple[Any, ...]
) -> Converter | None:
    import collections.abc as abc

    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _Sequence(tp, _build(args[0], seen), tuple)
        if args == ((),):
            args = ()
        return _Tuple(tp, [_build(a, seen) for a in args])
    if origin in (list, abc.Sequence, abc.MutableSequence, abc.Iterable, abc.Collection):
        item = _build(args[0], seen) if args else None
        return None if item is None else _Sequence(tp, item, list)
    if origin in (set, frozenset, abc.Set, abc.MutableSet):
        make = frozenset if origin is frozenset else set
        return _Sequence(tp, _build(args[0], seen) if args else None, make)
    if origin in (dict, abc.Mapping, abc.MutableMapping):
        if not args:
            return None
        key_tp, value_tp = args
        value = _build(value_tp, seen)
        key = _build(key_tp, seen)
        if key is None and key_tp is not int:
            return None if value is None else _Dict(tp, None, key_tp, value)
        if key is not None and not isinstance(key, _Scalar | _Enum):
            return _Unsupported(tp, "JSON object keys are strings; use str, int, UUID, date...")
        return _Dict(tp, key, key_tp, value)
    if origin is type:
        return _Unsupported(tp, "classes do not travel as JSON")
    return None


def _field_hints(tp: Any) -> dict[str, Any]:
    return _resolve_hints(tp, getattr(sys.modules.get(tp.__module__), "__dict__", {}))


def _dataclass(tp: type, seen: tuple[Any, ...]) -> Converter:
    hints = _field_hints(tp)
    fields = [f for f in dataclasses.fields(tp) if f.init]
    convs = {f.name: _build(hints.get(f.name, Any), seen) for f in fields}
    required = frozenset(
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    names = list(convs)
    return _Fields(
        tp,
        convs,
        required,
        build=lambda items: tp(**items),
        read=lambda v: {n: getattr(v, n) for n in names},
        is_instance=lambda v: isinstance(v, tp),
    )


def _typeddict(tp: Any, seen: tuple[Any, ...]) -> Converter:
    hints = _field_hints(tp)
    convs = {name: _build(hint, seen) for name, hint in hints.items()}
    # Read Required/NotRequired from the resolved hints: under `from __future__
    # import annotations` the class's own __required_keys__ cannot see them.
    total = getattr(tp, "__total__", True)
    required = frozenset(
        name
        for name, hint in hints.items()
        if (typing.get_origin(hint) is typing.Required)
        or (total and typing.get_origin(hint) is not typing.NotRequired)
    )
    return _Fields(
        tp,
        convs,
        required,
        build=dict,
        read=lambda v: _checked_keys(v, convs, required, tp),
        # A TypedDict is a dict at run time: any mapping is "an instance".
        is_instance=lambda v: isinstance(v, Mapping),
    )


def _checked_keys(
    value: Mapping[str, Any], fields: Mapping[str, Any], required: frozenset[str], tp: Any
) -> dict[str, Any]:
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise _Refused(f"has key(s) {', '.join(map(repr, unknown))} that {_type_name(tp)} lacks")
    missing = sorted(required - value.keys())
    if missing:
        raise _Refused(f"lacks key(s) {', '.join(map(repr, missing))} of {_type_name(tp)}")
    return dict(value)


def _is_pydantic_model(tp: Any) -> bool:
    # Never import pydantic for this: if it is not imported, no annotation
    # can be one of its models.
    pydantic = sys.modules.get("pydantic")
    if pydantic is None or not isinstance(tp, type):
        return False
    base = getattr(pydantic, "BaseModel", None)
    return base is not None and issubclass(tp, base) and hasattr(tp, "model_validate")


def _resolve_hints(obj: Any, globalns: Mapping[str, Any]) -> dict[str, Any]:
    """Annotations of a function or class, resolved one by one.

    ``typing.get_type_hints`` fails as a whole when one name cannot be found
    (a class local to a function under ``from __future__ import annotations``);
    here only that annotation is treated as plain JSON, with a warning.
    """
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except Exception:
        pass
    raw: dict[str, Any] = {}
    for klass in reversed(getattr(obj, "__mro__", (obj,))):
        raw.update(getattr(klass, "__annotations__", {}) or {})
    hints: dict[str, Any] = {}
    for name, ann in raw.items():
        if isinstance(ann, str):
            try:
                ann = eval(ann, dict(globalns))  # the module's own annotation text
            except Exception as exc:
                log.warning(
                    "taskq: annotation %r of %r in %s cannot be resolved (%s); its values "
                    "travel as plain JSON",
                    ann,
                    name,
                    getattr(obj, "__qualname__", obj),
                    exc,
                )
                ann = Any
        hints[name] = ann
    return hints


# -- per task ----------------------------------------------------------------------


class TaskCodec:
    """Encodes and decodes one task's arguments and result by its annotations."""

    def __init__(self, fn: Callable[..., Any], task: str) -> None:
        self._fn = fn
        self._task = task
        self._ready = False
        #: Parameters that need converting, by name; empty: all plain JSON.
        self._params: dict[str, Converter] = {}
        self._variadic: dict[str, str] = {}
        self._result: Converter | None = None

    def _prepare(self) -> None:
        fn = inspect.unwrap(self._fn)
        hints = _resolve_hints(fn, getattr(fn, "__globals__", {}))
        for name, param in inspect.signature(fn).parameters.items():
            conv = _build(hints.get(name, Any), ())
            if conv is None:
                continue
            self._params[name] = conv
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                self._variadic[name] = "*"
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                self._variadic[name] = "**"
        self._result = _build(hints.get("return", Any), ())
        self._ready = True

    @property
    def typed(self) -> bool:
        """Whether any parameter or the result needs converting."""
        if not self._ready:
            self._prepare()
        return bool(self._params) or self._result is not None

    def encode_args(self, stored: dict[str, Any]) -> dict[str, Any]:
        """Arguments by name -> their JSON forms; raises SerializationError naming one."""
        if not self._ready:
            self._prepare()
        if not self._params:
            return stored
        out = dict(stored)
        for name, conv in self._params.items():
            if name not in out:
                continue
            value = out[name]
            try:
                out[name] = self._each(conv, name, value, encode=True)
            except _PathError as exc:
                raise SerializationError(
                    f"arguments of task {self._task!r}: argument {exc.path!r} {exc.reason}; "
                    "nothing was written",
                    path=exc.path,
                ) from None
        return out

    def decode_args(self, stored: Mapping[str, Any]) -> Mapping[str, Any]:
        """Stored JSON arguments -> values of the annotated types; raises DecodeError."""
        if not self._ready:
            self._prepare()
        if not self._params:
            return stored
        out = dict(stored)
        for name, conv in self._params.items():
            if name not in out:
                continue
            try:
                out[name] = self._each(conv, name, out[name], encode=False)
            except _PathError as exc:
                where = "it" if exc.path == name else exc.path
                raise DecodeError(
                    f"task {self._task!r}: argument {name!r} does not decode to "
                    f"{conv.name}: {where} {exc.reason}",
                    path=exc.path,
                ) from None
        return out

    def _each(self, conv: Converter, name: str, value: Any, *, encode: bool) -> Any:
        step = _encode_at if encode else _decode_at
        kind = self._variadic.get(name)
        if kind == "*":  # *args: each item has the annotated type
            if not isinstance(value, list | tuple):
                raise _PathError(name, f"must be a sequence, got {_type_name(type(value))}")
            return [step(conv, v, f"{name}[{i}]") for i, v in enumerate(value)]
        if kind == "**":
            if not isinstance(value, Mapping):
                raise _PathError(name, f"must be a mapping, got {_type_name(type(value))}")
            return {k: step(conv, v, k) for k, v in value.items()}
        return step(conv, value, name)

    def encode_result(self, value: Any) -> Any:
        """A return value -> its JSON form (by the return annotation)."""
        if not self._ready:
            self._prepare()
        if self._result is None or value is None:
            return value
        try:
            return _encode_at(self._result, value, "")
        except _PathError as exc:
            where = f" at {exc.path!r}" if exc.path else ""
            raise SerializationError(
                f"result of task {self._task!r}{where} {exc.reason}", path=exc.path
            ) from None

    def decode_result(self, value: Any) -> Any:
        """A stored result -> a value of the return annotation's type."""
        if not self._ready:
            self._prepare()
        if self._result is None or value is None:
            return value
        try:
            return _decode_at(self._result, value, "")
        except _PathError as exc:
            raise DecodeError(
                f"result of task {self._task!r} does not decode to "
                f"{self._result.name}: {exc.path or 'it'} {exc.reason}",
                path=exc.path,
            ) from None


#: Types a value may have only under an annotation that names it (for messages).
ANNOTATION_TYPES: tuple[type, ...] = (*_SCALARS, enum.Enum)


def annotation_hint(value: Any) -> str:
    """Advice for a value refused as "not JSON" that an annotation would carry."""
    if isinstance(value, ANNOTATION_TYPES) or dataclasses.is_dataclass(value):
        return (
            f"; annotate the task's parameter as {_type_name(type(value))} "
            "and taskq encodes and decodes it"
        )
    if _is_pydantic_model(type(value)):
        return f"; annotate the task's parameter as {_type_name(type(value))}"
    return ""
