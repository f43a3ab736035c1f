"""Numbers, times and durations in the sentences that explain a job (``why``)."""

from __future__ import annotations

from datetime import UTC, datetime


def plural(count: int, word: str) -> str:
    """``1 job``, ``2 jobs``."""
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def are(count: int) -> str:
    return "is" if count == 1 else "are"


def attempts(n: int, of: int) -> str:
    return f"{n} attempt{'' if n == 1 else 's'} (of {of})"


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def when(value: datetime) -> str:
    """A timestamp in a sentence: UTC, to the second."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def span(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``4m05s``, ``2h10m``, ``3d04h``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = round(seconds)
    return f"{s} s" if s < 60 else long_span(s)


def long_span(s: int) -> str:
    """A minute or more, in two units: ``4m05s``, ``2h10m``, ``3d04h``."""
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
