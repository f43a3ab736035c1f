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
import enum
import inspect
import logging
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, cast

from ._converters import (
    NONE_TYPE,
    PLAIN,
    SCALARS,
    Converter,
    DictConverter,
    EnumConverter,
    FieldsConverter,
    OptionalConverter,
    PathError,
    PydanticConverter,
    Refused,
    Scalar,
    SequenceConverter,
    TupleConverter,
    Unsupported,
    decode_at,
    encode_at,
    type_name,
)
from ._errors import ConfigurationError, DecodeError, SerializationError
from ._hooks import JobContext

log = logging.getLogger("taskq")

# -- building converters from annotations -----------------------------------------


def converter_for(tp: Any) -> Converter | None:
    """The converter for an annotation, or None when its values are plain JSON."""
    return _build(tp, ())


def _build(tp: Any, seen: tuple[Any, ...]) -> Converter | None:
    if tp is Any or tp is object or tp in PLAIN or tp is inspect.Parameter.empty:
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
    if isinstance(tp, type) and tp in SCALARS:
        return SCALARS[tp]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return EnumConverter(tp)
    if tp in seen:
        # A recursive type (a tree of dataclasses): it is already being built.
        return _Lazy(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, (*seen, tp))
    if typing.is_typeddict(tp):
        return _typeddict(tp, (*seen, tp))
    if _is_pydantic_model(tp):
        return PydanticConverter(tp)
    if origin is not None:
        return _generic(tp, origin, args, seen)
    if tp in (tuple, set, frozenset):
        # Bare containers: JSON arrays of plain values, rebuilt as the container.
        return SequenceConverter(tp, None, tp)
    return None  # other classes: plain JSON, as before (the value is checked as JSON)


class _Lazy(Converter):
    def __init__(self, tp: Any) -> None:
        self.tp = tp
        self.name = type_name(tp)
        self._conv: Converter | None = None

    def _get(self) -> Converter:
        if self._conv is None:
            self._conv = converter_for(self.tp) or Unsupported(self.tp, "no converter")
        return self._conv

    def encode(self, value: Any) -> Any:
        return self._get().encode(value)

    def decode(self, value: Any) -> Any:
        return self._get().decode(value)


def _union(tp: Any, args: tuple[Any, ...], seen: tuple[Any, ...]) -> Converter | None:
    members = [a for a in args if a is not NONE_TYPE]
    convs = [_build(a, seen) for a in members]
    if all(c is None for c in convs):
        return None
    if len(members) == 1:
        conv = convs[0]
        assert conv is not None
        return OptionalConverter(conv) if NONE_TYPE in args else conv
    return Unsupported(
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
            return SequenceConverter(tp, _build(args[0], seen), tuple)
        if args == ((),):
            args = ()
        return TupleConverter(tp, [_build(a, seen) for a in args])
    if origin in (list, abc.Sequence, abc.MutableSequence, abc.Iterable, abc.Collection):
        item = _build(args[0], seen) if args else None
        return None if item is None else SequenceConverter(tp, item, list)
    if origin in (set, frozenset, abc.Set, abc.MutableSet):
        make = frozenset if origin is frozenset else set
        return SequenceConverter(tp, _build(args[0], seen) if args else None, make)
    if origin in (dict, abc.Mapping, abc.MutableMapping):
        if not args:
            return None
        key_tp, value_tp = args
        value = _build(value_tp, seen)
        key = _build(key_tp, seen)
        if key is None and key_tp is not int:
            return None if value is None else DictConverter(tp, None, key_tp, value)
        if key is not None and not isinstance(key, Scalar | EnumConverter):
            return Unsupported(tp, "JSON object keys are strings; use str, int, UUID, date...")
        return DictConverter(tp, key, key_tp, value)
    if origin is type:
        return Unsupported(tp, "classes do not travel as JSON")
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
    return FieldsConverter(
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
    return FieldsConverter(
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
        raise Refused(f"has key(s) {', '.join(map(repr, unknown))} that {type_name(tp)} lacks")
    missing = sorted(required - value.keys())
    if missing:
        raise Refused(f"lacks key(s) {', '.join(map(repr, missing))} of {type_name(tp)}")
    return dict(value)


def _is_pydantic_model(tp: Any) -> bool:
    # Never import pydantic for this: if it is not imported, no annotation
    # can be one of its models.
    pydantic = sys.modules.get("pydantic")
    if pydantic is None or not isinstance(tp, type):
        return False
    base = getattr(pydantic, "BaseModel", None)
    return base is not None and issubclass(tp, base) and hasattr(tp, "model_validate")


def _resolve_hints(
    obj: Any, globalns: Mapping[str, Any], skip: str | None = None
) -> dict[str, Any]:
    """Annotations of a function or class, resolved one by one.

    ``typing.get_type_hints`` fails as a whole when one name cannot be found
    (a class local to a function under ``from __future__ import annotations``);
    here only that annotation is treated as plain JSON, with a warning.
    ``skip``: a name left out (the job's context parameter, whose annotation
    may name a class imported only for type checkers).
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
        if name == skip:
            continue
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


# -- the job's context parameter ---------------------------------------------------


def context_parameter(fn: Callable[..., Any]) -> str | None:
    """The name of ``fn``'s parameter annotated ``taskq.JobContext``, if it has one.

    Read when the task is made: the worker passes the job's context there, and
    it is not an argument of the job. ``JobContext | None`` (or ``Optional``,
    ``Annotated``) counts too. An annotation string that cannot be evaluated
    yet (``from __future__ import annotations`` with the name imported only
    under ``TYPE_CHECKING``) counts when it names ``JobContext``.

    Raises:
        ConfigurationError: two such parameters, or a ``*args``/``**kwargs`` one.
    """
    fn = inspect.unwrap(fn)
    globalns = dict(getattr(fn, "__globals__", {}))
    found = []
    for name, param in inspect.signature(fn).parameters.items():
        if param.annotation is inspect.Parameter.empty:
            continue
        if not _is_context(param.annotation, globalns):
            continue
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ConfigurationError(
                f"{getattr(fn, '__qualname__', fn)}: the job's context needs a parameter of its "
                f"own, not *{name} or **{name}"
            )
        found.append(name)
    if len(found) > 1:
        raise ConfigurationError(
            f"{getattr(fn, '__qualname__', fn)}: parameters {', '.join(found)} are all annotated "
            "JobContext; a task receives one context"
        )
    return found[0] if found else None


def _is_context(annotation: Any, globalns: dict[str, Any]) -> bool:
    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, globalns)  # the module's own annotation text
        except Exception:
            return _names_context(annotation)
    if annotation is JobContext:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _is_context(args[0], globalns)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not NONE_TYPE]
        return len(members) == 1 and _is_context(members[0], globalns)
    return False


def _names_context(text: str) -> bool:
    """Whether annotation text names JobContext (``ctx: "JobContext | None"``...)."""
    text = text.replace(" ", "").replace("|None", "").replace("None|", "")
    for wrapper in ("typing.Optional[", "Optional["):
        if text.startswith(wrapper) and text.endswith("]"):
            text = text[len(wrapper) : -1]
    return text.rpartition(".")[2] == "JobContext"


# -- per task ----------------------------------------------------------------------


class TaskCodec:
    """Encodes and decodes one task's arguments and result by its annotations."""

    def __init__(self, fn: Callable[..., Any], task: str, *, context: str | None = None) -> None:
        self._fn = fn
        self._task = task
        # The parameter that receives the job's context: not an argument.
        self._context = context
        self._ready = False
        #: Parameters that need converting, by name; empty: all plain JSON.
        self._params: dict[str, Converter] = {}
        self._variadic: dict[str, str] = {}
        self._result: Converter | None = None

    def _prepare(self) -> None:
        fn = inspect.unwrap(self._fn)
        hints = _resolve_hints(fn, getattr(fn, "__globals__", {}), self._context)
        for name, param in inspect.signature(fn).parameters.items():
            if name == self._context:
                continue
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
        return cast(dict[str, Any], self._convert_args(stored, encode=True))

    def decode_args(self, stored: Mapping[str, Any]) -> Mapping[str, Any]:
        """Stored JSON arguments -> values of the annotated types; raises DecodeError."""
        return self._convert_args(stored, encode=False)

    def _convert_args(self, stored: Mapping[str, Any], *, encode: bool) -> Mapping[str, Any]:
        if not self._ready:
            self._prepare()
        if not self._params:
            return stored  # all plain JSON: no copy, no walk
        out = dict(stored)
        for name, conv in self._params.items():
            if name not in out:
                continue
            try:
                out[name] = self._each(conv, name, out[name], encode=encode)
            except PathError as exc:
                if encode:
                    raise SerializationError(
                        f"arguments of task {self._task!r}: argument {exc.path!r} "
                        f"{exc.reason}; nothing was written",
                        path=exc.path,
                    ) from None
                where = "it" if exc.path == name else exc.path
                raise DecodeError(
                    f"task {self._task!r}: argument {name!r} does not decode to "
                    f"{conv.name}: {where} {exc.reason}",
                    path=exc.path,
                ) from None
        return out

    def _each(self, conv: Converter, name: str, value: Any, *, encode: bool) -> Any:
        step = encode_at if encode else decode_at
        kind = self._variadic.get(name)
        if kind == "*":  # *args: each item has the annotated type
            if not isinstance(value, list | tuple):
                raise PathError(name, f"must be a sequence, got {type_name(type(value))}")
            return [step(conv, v, f"{name}[{i}]") for i, v in enumerate(value)]
        if kind == "**":
            if not isinstance(value, Mapping):
                raise PathError(name, f"must be a mapping, got {type_name(type(value))}")
            return {k: step(conv, v, k) for k, v in value.items()}
        return step(conv, value, name)

    def encode_result(self, value: Any) -> Any:
        """A return value -> its JSON form (by the return annotation)."""
        if not self._ready:
            self._prepare()
        if self._result is None or value is None:
            return value
        try:
            return encode_at(self._result, value, "")
        except PathError as exc:
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
            return decode_at(self._result, value, "")
        except PathError as exc:
            raise DecodeError(
                f"result of task {self._task!r} does not decode to "
                f"{self._result.name}: {exc.path or 'it'} {exc.reason}",
                path=exc.path,
            ) from None


#: Types a value may have only under an annotation that names it (for messages).
ANNOTATION_TYPES: tuple[type, ...] = (*SCALARS, enum.Enum)


def annotation_hint(value: Any) -> str:
    """Advice for a value refused as "not JSON" that an annotation would carry."""
    if isinstance(value, ANNOTATION_TYPES) or dataclasses.is_dataclass(value):
        return (
            f"; annotate the task's parameter as {type_name(type(value))} "
            "and taskq encodes and decodes it"
        )
    if _is_pydantic_model(type(value)):
        return f"; annotate the task's parameter as {type_name(type(value))}"
    return ""
