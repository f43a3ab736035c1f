"""Validation of the names users give taskq: schema, queue and task names.

The schema name is the only identifier pasted into SQL; it is validated and
quoted here and nowhere else. Queue and task names always travel as bind
parameters, and are validated so that logs, CLIs and NOTIFY payloads stay sane.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

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


def default_task_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of a function, with the module named as an import would name it.

    A function in a script run as ``python jobs.py`` lives in ``__main__``; a
    worker started with ``python -m taskq worker jobs:app`` imports the same
    file as ``jobs``. Naming the task ``__main__.f`` would leave its jobs to no
    worker, so a script's module is named by its file (and its packages).
    """
    return f"{_module_name(getattr(fn, '__module__', None))}.{fn.__qualname__}"


def _module_name(module: str | None) -> str:
    if module != "__main__":
        return module or "__main__"
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        # python -m pkg.jobs: the name it is imported by.
        name = str(spec.name)
        return name.removesuffix(".__main__") if name.endswith(".__main__") else name
    path = getattr(main, "__file__", None)
    if not path:
        return "__main__"  # an interactive session or python -c: no file to name it by
    file = Path(path).resolve()
    parts = [file.stem]
    folder = file.parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    if not all(part.isidentifier() for part in parts):
        return "__main__"
    return ".".join(parts)


def suggest_task(name: str, known: Iterable[str]) -> str | None:
    """The known task ``name`` most likely means: same short name, or a close spelling."""
    names = sorted(set(known))
    tail = [n for n in names if n.endswith(f".{name}")]
    if len(tail) == 1:
        return tail[0]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        return close[0]
    # A misspelt short name: compare with the last part of each name.
    shorts = {n.rpartition(".")[2]: n for n in reversed(names)}
    close = difflib.get_close_matches(name.rpartition(".")[2], list(shorts), n=1, cutoff=0.6)
    return shorts[close[0]] if close else None
