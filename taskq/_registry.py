"""The registry: an App's tasks, cron entries and hooks, readable by workers and schedulers.

The App adds to it (``@app.task``, ``@app.cron``, ``@app.before_job``...);
the worker, the scheduler and the enqueue path read it. It knows nothing of
the database.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._cron import CronEntry
from ._errors import ConfigurationError
from ._hooks import Hooks
from ._options import check_priority
from ._serialization import encode
from ._task import Task


class Registry:
    """Tasks by name, cron entries by name, and the hooks around jobs and enqueues."""

    def __init__(self) -> None:
        self.tasks: dict[str, Task[Any, Any]] = {}
        #: Cron entries by name (``@app.cron``, ``app.add_cron``).
        self.crons: dict[str, CronEntry] = {}
        self.hooks = Hooks()
        self._cron_listeners: list[Callable[[], None]] = []

    def add_task(self, task: Task[Any, Any]) -> Task[Any, Any]:
        """Register a task under its name; the same function again is a no-op."""
        known = self.tasks.get(task.name)
        if known is not None and known.fn is not task.fn:
            raise ConfigurationError(f"a different task is already registered as {task.name!r}")
        self.tasks[task.name] = task
        return task

    def add_cron(
        self,
        expression: str,
        task: Task[Any, Any] | str,
        *,
        timezone: str,
        name: str | None,
        args: Mapping[str, Any] | None,
        queue: str | None,
        priority: int | None,
        missed: str,
    ) -> CronEntry:
        """Add (or replace) a cron entry of a registered task; running schedulers hear of it."""
        task_name = task.name if isinstance(task, Task) else task
        local = self.tasks.get(task_name) if isinstance(task_name, str) else None
        if local is None or (isinstance(task, Task) and local is not task):
            raise ConfigurationError(
                f"cron needs a task of this App, got {task!r}; register it with @app.task"
            )
        if args is not None and not isinstance(args, Mapping):
            raise TypeError(f"args must be a mapping of keyword arguments, got {args!r}")
        stored = local.bind_arguments((), args or {})
        encode(stored, what=f"args of the cron entry of {task_name!r}")
        if priority is not None:
            check_priority(priority)
        entry_name = name or task_name
        entry = CronEntry(
            name=entry_name,
            expression=expression,
            task=task_name,
            timezone=timezone,
            args=stored,
            queue=queue,
            priority=priority,
            missed=missed,
        )
        old = self.crons.get(entry_name)
        if old is not None and name is None and old.task == task_name and old != entry:
            raise ConfigurationError(
                f"task {task_name!r} already has a cron entry ({old.expression!r}); give "
                "each further entry its own name=..."
            )
        self.crons[entry_name] = entry
        for listener in list(self._cron_listeners):
            listener()
        return entry

    def on_cron_change(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` whenever an entry is added; returns the unsubscribe."""
        self._cron_listeners.append(listener)
        return lambda: self._cron_listeners.remove(listener)
