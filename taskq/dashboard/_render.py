"""HTML from templates: Jinja2 with autoescaping on, and the filters pages use.

Everything a page shows from the database is user data (arguments, results,
errors, tracebacks, task and queue names): autoescaping makes each of them
text, never markup. Nothing here marks a string safe.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jinja2
import orjson

HERE = Path(__file__).parent
#: The longest JSON value shown in full; longer ones are cut with a note.
MAX_SHOWN_CHARS = 100_000


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        enable_async=False,
    )
    env.filters.update(
        num=num,
        when=when,
        ago=ago,
        duration=duration,
        pretty=pretty,
        short=short,
    )
    return env


def num(value: int | float | None) -> str:
    """12,345 (thin grouping is easier to read than 12345)."""
    if value is None:
        return "–"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def when(value: datetime | None) -> str:
    """A timestamp in UTC to the second: the same on every operator's screen."""
    if value is None:
        return "–"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float | timedelta | None) -> str:
    """0.25 s, 42 s, 3 min 5 s, 2 h 10 min, 3 d 4 h."""
    if seconds is None:
        return "–"
    if isinstance(seconds, timedelta):
        seconds = seconds.total_seconds()
    if math.isnan(seconds):
        return "–"
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    if s < 10:
        return f"{sign}{s:.2f} s" if s < 1 else f"{sign}{s:.1f} s"
    if s < 60:
        return f"{sign}{s:.0f} s"
    if s < 3600:
        return f"{sign}{int(s // 60)} min {int(s % 60)} s"
    if s < 86400:
        return f"{sign}{int(s // 3600)} h {int(s % 3600 // 60)} min"
    return f"{sign}{int(s // 86400)} d {int(s % 86400 // 3600)} h"


def ago(value: datetime | None, now: datetime | None = None) -> str:
    """How long ago (or, for a future time, in how long)."""
    if value is None:
        return "–"
    now = now or datetime.now(UTC)
    delta = (now - value).total_seconds()
    if delta >= 0:
        return f"{duration(delta)} ago"
    return f"in {duration(-delta)}"


def pretty(value: Any) -> str:
    """A JSON value (or JSON text) indented for reading, cut when huge."""
    if value is None:
        return "null"
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return short(value, MAX_SHOWN_CHARS)
    try:
        text = orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        text = repr(value)
    return short(text, MAX_SHOWN_CHARS)


def short(value: Any, limit: int = 120) -> str:
    """One line of at most ``limit`` characters."""
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"
