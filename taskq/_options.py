"""The options of one enqueue (``task.options(...)``), checked when they are made."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from ._errors import ConfigurationError
from ._names import check_queue

#: Priorities are smallint in Postgres; higher runs first.
MIN_PRIORITY, MAX_PRIORITY = -32768, 32767


@dataclass(frozen=True)
class EnqueueOptions:
    """Per-enqueue settings; ``None`` means: use the task's default."""

    queue: str | None = None
    priority: int | None = None
    delay: float = 0.0
    run_at: datetime | None = None
    connection: Any = None
    unique_key: str | None = None
    unique_for: float = 0.0
    meta: Mapping[str, Any] | None = None
    concurrency_key: str | None = None

    @classmethod
    def make(
        cls,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        connection: Any = None,
        unique_key: str | None = None,
        unique_for: float | timedelta | None = None,
        meta: Mapping[str, Any] | None = None,
        concurrency_key: str | None = None,
    ) -> EnqueueOptions:
        if queue is not None:
            check_queue(queue)
        if priority is not None:
            check_priority(priority)
        seconds = 0.0 if delay is None else _seconds("delay", delay)
        if run_at is not None:
            if not isinstance(run_at, datetime):
                raise ConfigurationError(f"run_at must be a datetime, got {run_at!r}")
            if run_at.tzinfo is None:
                raise ConfigurationError(
                    "run_at must be timezone-aware (e.g. datetime.now(timezone.utc) + ...); "
                    "a naive datetime is ambiguous"
                )
            if delay:
                raise ConfigurationError("give either delay or run_at, not both")
        if connection is not None and not hasattr(connection, "fetchval"):
            raise ConfigurationError(
                f"connection must be an asyncpg connection, got {type(connection).__name__}"
            )
        if unique_key is not None and (not isinstance(unique_key, str) or not unique_key):
            raise ConfigurationError(f"unique_key must be a non-empty string, got {unique_key!r}")
        if unique_key is not None and not _storable(unique_key):
            raise ConfigurationError(
                f"unique_key {unique_key!r} holds a NUL character or a lone surrogate, "
                "which Postgres cannot store in text"
            )
        if concurrency_key is not None:
            check_concurrency_key(concurrency_key)
        window = 0.0 if unique_for is None else _seconds("unique_for", unique_for)
        if window and unique_key is None:
            raise ConfigurationError("unique_for needs a unique_key")
        if meta is not None:
            if not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta):
                raise ConfigurationError(
                    f"meta must be a mapping with string keys, got {type(meta).__name__}"
                )
            meta = dict(meta) or None
        return cls(
            queue, priority, seconds, run_at, connection, unique_key, window, meta, concurrency_key
        )


#: Concurrency keys are short texts, like queue names (they are index keys).
MAX_CONCURRENCY_KEY = 200


def check_concurrency_key(key: Any) -> str:
    """A valid concurrency key: a non-empty text Postgres can store, at most 200 chars."""
    if not isinstance(key, str) or not key:
        raise ConfigurationError(f"concurrency_key must be a non-empty string, got {key!r}")
    if len(key) > MAX_CONCURRENCY_KEY:
        raise ConfigurationError(
            f"concurrency_key must be at most {MAX_CONCURRENCY_KEY} characters, got {len(key)}"
        )
    if not _storable(key):
        raise ConfigurationError(
            f"concurrency_key {key!r} holds a NUL character or a lone surrogate, "
            "which Postgres cannot store in text"
        )
    return key


def _storable(text: str) -> bool:
    """Whether Postgres can store ``text``: no NUL, valid UTF-8 (no lone surrogates)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _seconds(name: str, value: object) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigurationError(
            f"{name} must be seconds (int/float) or a timedelta, got {value!r}"
        )
    if not 0 <= seconds < float("inf"):
        raise ConfigurationError(f"{name} must be >= 0 seconds, got {value!r}")
    return seconds


def check_priority(priority: object) -> int:
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ConfigurationError(f"priority must be an int, got {priority!r}")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ConfigurationError(
            f"priority {priority} is out of range ({MIN_PRIORITY}..{MAX_PRIORITY})"
        )
    return priority


def with_key(opts: EnqueueOptions, key: str | None) -> EnqueueOptions:
    """``opts`` with the job's concurrency key (the task's default, when it has one)."""
    return opts if key == opts.concurrency_key else replace(opts, concurrency_key=key)
