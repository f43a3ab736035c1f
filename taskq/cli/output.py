"""What the commands print: tables, JSON, timestamps and ages, counts, progress, masked DSNs."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from .._admin import BATCH_SIZE
from .._admin.wording import long_span
from .._admin.wording import plural as plural  # the commands' import of it


def print_json(value: Any) -> None:
    print(orjson.dumps(value).decode(), flush=True)


def json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def print_table(headers: list[str], rows: list[list[str]], *, right: Sequence[int] = ()) -> None:
    for line in table(headers, rows, right=right):
        print(line)


def table(headers: list[str], rows: list[list[str]], *, right: Sequence[int] = ()) -> list[str]:
    """Rows padded into columns; columns in ``right`` (numbers) align right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def when(value: datetime | None) -> str:
    """A timestamp for tables: UTC, to the second."""
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def iso(value: datetime | None) -> str:
    """A timestamp in full (ISO 8601), or ``-``."""
    return "-" if value is None else value.isoformat()


def age(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h10m``, ``4d03h``."""
    s = int(seconds)
    return f"{s}s" if s < 60 else long_span(s)


_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)\S+", re.IGNORECASE)


def masked(dsn: str) -> str:
    """The DSN with its password replaced by ``***``."""
    return _KV_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", dsn))


def error(message: str) -> None:
    """``taskq: error: message`` on stderr."""
    print(f"taskq: error: {message}", file=sys.stderr)


class Progress:
    """Progress of a bulk command on stderr, once more than one batch is involved.

    On a terminal one line is rewritten in place; otherwise (CI logs) a line
    is printed at most every ``interval`` seconds, and always at the end.
    """

    def __init__(self, verb: str, stream: TextIO | None = None, interval: float = 1.0) -> None:
        self.verb = verb
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.1 if self.tty else interval
        self.last = -float("inf")
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if total <= BATCH_SIZE:
            return
        now = time.monotonic()
        if done < total and now - self.last < self.interval:
            return
        self.last = now
        self.shown = True
        text = f"{self.verb} {done:,}/{total:,}"
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
