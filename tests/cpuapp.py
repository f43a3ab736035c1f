"""Process-executor tasks (``executor="process"``): plain module-level functions.

Each process of a worker's pool imports this module and finds a function by
its name; tests register these functions on their own App. ``app`` is the App
that ``python -m taskq worker tests.cpuapp:app`` runs ($TASKQ_DSN, $TASKQ_SCHEMA).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import taskq

app = taskq.App()


@dataclass
class Span:
    start: datetime
    days: int


class Boom(Exception):
    """Raised by ``fail``: a user's exception type, by its full name in job.status()."""


def whoami(n: int) -> dict[str, int]:
    """The pid of the process that ran it (and n squared, worked out the slow way)."""
    return {"pid": os.getpid(), "square": sum(n for _ in range(n))}


def shift(span: Span, by: timedelta) -> Span:
    """A dataclass and a timedelta in, a dataclass (holding a datetime) out."""
    return Span(span.start + by, span.days + by.days)


def fail(message: str) -> None:
    """Raises in the process, two frames deep."""
    _deeper(message)


def _deeper(message: str) -> None:
    raise Boom(message)


def spin(pidfile: str) -> None:
    """Note the pid, then run (CPU-bound) until killed."""
    with Path(pidfile).open("a") as f:
        f.write(f"{os.getpid()}\n")
    while True:
        time.sleep(0.01)


def leave(pidfile: str) -> None:
    """Note the pid, then end the process from inside without a word."""
    Path(pidfile).write_text(str(os.getpid()))
    os._exit(3)


def report(steps: int, ctx: taskq.JobContext) -> dict[str, Any]:
    """Progress from a process; what else its context offers."""
    for i in range(1, steps + 1):
        ctx.progress(i / steps, f"step {i} of {steps}")
    try:
        ctx.transaction()
        refused = ""
    except RuntimeError as exc:
        refused = str(exc)
    return {"id": ctx.id, "attempt": ctx.attempt, "cancelled": ctx.cancelled, "refused": refused}


def not_json() -> object:
    return object()


app.task(name="cpu.whoami", executor="process")(whoami)
app.task(name="cpu.spin", executor="process")(spin)
