"""Validation of the names users give taskq: schema, queue and task names.

The schema name is the only identifier pasted into SQL; it is validated and
quoted here and nowhere else. Queue and task names always travel as bind
parameters, and are validated so that logs, CLIs and NOTIFY payloads stay sane.
"""

from __future__ import annotations

import re

from ._errors import ConfigurationError

DEFAULT_SCHEMA = "taskq"
DEFAULT_QUEUE = "default"

_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,39}")
# Task names are usually "module.function"; queues are short labels.
_QUEUE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}")
# Task names may also hold "<locals>" (functions defined inside functions).
_TASK_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:<>\-]{0,199}")


def quote_schema(name: str) -> str:
    """Validate a schema name and return it quoted for SQL."""
    if not isinstance(name, str) or not _SCHEMA_RE.fullmatch(name):
        raise ConfigurationError(
            f"schema name {name!r} is invalid: use 1-40 characters of lowercase a-z, 0-9 "
            "and _, not starting with a digit (for example 'taskq')"
        )
    if name.startswith("pg_"):
        raise ConfigurationError(f"schema name {name!r} is invalid: 'pg_' is reserved by Postgres")
    return f'"{name}"'


def check_queue(name: object) -> str:
    """Validate a queue name and return it."""
    return _check(name, "queue", _QUEUE_RE, 128, "_ . : -")


def check_task_name(name: object) -> str:
    """Validate a task name and return it."""
    return _check(name, "task", _TASK_RE, 200, "_ . : - < >")


def _check(name: object, kind: str, pattern: re.Pattern[str], limit: int, extra: str) -> str:
    if not isinstance(name, str):
        raise ConfigurationError(f"{kind} name must be a str, got {type(name).__name__}")
    if not pattern.fullmatch(name):
        raise ConfigurationError(
            f"{kind} name {name!r} is invalid: use 1-{limit} characters of letters, digits "
            f"and {extra}, starting with a letter, digit or _"
        )
    return name
