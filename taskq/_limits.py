"""Rate limits: "100/minute" and friends, parsed once, checked in Postgres."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ._errors import ConfigurationError

_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}
_RATE_RE = re.compile(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*")
#: A sanity bound on the count. The window's size does not grow with it: it
#: keeps at most about 64 entries per period (see rate_log_add() in migration 2).
MAX_RATE_LIMIT = 1_000_000


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` job starts in any ``period`` seconds (a sliding window).

    Made from strings such as ``"100/minute"``, ``"50/s"``, ``"5/10s"`` or
    ``"1000/hour"``, or from ``(limit, timedelta)``.
    """

    limit: int
    period: float

    def __str__(self) -> str:
        for unit, seconds in (("day", 86400.0), ("hour", 3600.0), ("minute", 60.0)):
            if self.period == seconds:
                return f"{self.limit}/{unit}"
        if self.period == 1.0:
            return f"{self.limit}/second"
        return f"{self.limit}/{self.period:g}s"

    @classmethod
    def parse(cls, value: Any) -> RateLimit:
        """A RateLimit from a string, a ``(limit, period)`` pair or a RateLimit."""
        if isinstance(value, RateLimit):
            return value
        if isinstance(value, str):
            match = _RATE_RE.fullmatch(value.lower())
            if not match or match[3] not in _UNITS:
                raise ConfigurationError(
                    f"bad rate limit {value!r}: write it as '<count>/<unit>' such as "
                    "'100/minute', '50/second', '5/10s' or '1000/hour' (units: s, m, h, d)"
                )
            period = float(match[2] or 1) * _UNITS[match[3]]
            return cls._checked(int(match[1]), period, value)
        if isinstance(value, tuple) and len(value) == 2:
            limit, period = value
            if isinstance(period, timedelta):
                period = period.total_seconds()
            if (
                isinstance(limit, int)
                and not isinstance(limit, bool)
                and isinstance(period, int | float)
            ):
                return cls._checked(limit, float(period), value)
        raise ConfigurationError(
            f"a rate limit is a string such as '100/minute' or a (count, timedelta) pair, "
            f"got {value!r}"
        )

    @classmethod
    def _checked(cls, limit: int, period: float, given: Any) -> RateLimit:
        if not 1 <= limit <= MAX_RATE_LIMIT:
            raise ConfigurationError(
                f"rate limit {given!r}: the count must be between 1 and {MAX_RATE_LIMIT}"
            )
        if not 0.001 <= period <= 366 * 86400:
            raise ConfigurationError(
                f"rate limit {given!r}: the period must be between 1 ms and a year"
            )
        return cls(limit, period)


def check_per_key_limit(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"per_key_limit must be a positive int, got {value!r}")
    return value


def check_concurrency_limit(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"concurrency_limit must be a positive int, got {value!r}")
    return value
