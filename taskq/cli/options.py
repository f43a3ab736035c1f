"""Command-line option types (durations, counts, limits) and the options many commands share."""

from __future__ import annotations

import argparse
import re
from typing import Any, Protocol

from .._database import DEFAULT_CONNECT_TIMEOUT
from .._errors import ConfigurationError
from .._names import DEFAULT_SCHEMA, check_queue, check_task_name

#: Default of options that leave a setting as it is.
KEEP: Any = object()


class Commands(Protocol):
    """Where a command module adds its subcommand (argparse's subparsers action)."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``15m``, ``12h``, ``7d``, ``2w`` or a sum like ``1h30m``."""
    value = text.strip().lower()
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match[1]) * _UNIT_SECONDS[match[2]]
        pos = match.end()
    if not value or pos != len(value):
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 30m, 12h, 7d or 1h30m, got {text!r}"
        )
    return total


def describe_seconds(seconds: float) -> str:
    """A duration as :func:`parse_duration` reads it, in its largest whole unit."""
    for unit in ("w", "d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def window_arg(text: str) -> float | None:
    """A duration longer than 0s, or ``all`` (None)."""
    if text.strip().lower() == "all":
        return None
    seconds = parse_duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the window must be longer than 0s")
    return seconds


#: Job ids (and counts) are Postgres bigints.
MAX_BIGINT = 2**63 - 1


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_BIGINT:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer of at most {MAX_BIGINT}, got {text!r}"
        )
    return value


def queue_name(text: str) -> str:
    """A ``--queue`` value, checked by the rules every queue name follows."""
    try:
        return check_queue(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def task_name(text: str) -> str:
    """A ``--task`` value (full or short name), checked by the rules of task names."""
    try:
        return check_task_name(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def limit_arg(value: str) -> int | None:
    """An integer, or ``none`` (None: no limit)."""
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'none', got {value!r}"
        ) from None


def db_options(p: argparse.ArgumentParser, *, with_app: bool = True) -> None:
    """``--dsn``, ``--app``, ``--schema`` and ``--connect-timeout``."""
    p.add_argument("--dsn", help="Postgres DSN (default: $TASKQ_DSN, else the embedded Postgres)")
    if with_app:
        p.add_argument("--app", help="MODULE:APP to take the DSN and schema from")
    p.add_argument("--schema", help=f"taskq schema (default: $TASKQ_SCHEMA, else {DEFAULT_SCHEMA})")
    connect_timeout_option(p)


def connect_timeout_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--connect-timeout",
        type=positive_float,
        metavar="SECONDS",
        help="give up on a database that does not answer a new connection after this "
        f"long (default: the App's, else {DEFAULT_CONNECT_TIMEOUT:g})",
    )


def json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
