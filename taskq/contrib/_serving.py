"""What the web-framework integrations share: checking their settings, and
keeping the taskq App open (with a worker, if asked) while a server runs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from .._app import App
from .._errors import ConfigurationError
from ..worker import WorkerConfig


def check_settings(
    caller: str, jobs_app: object, worker: bool, worker_options: dict[str, Any]
) -> None:
    """Refuse a wrong App or bad worker settings when the integration is set up,
    so a mistake fails at import rather than when the server starts."""
    if not isinstance(jobs_app, App):
        raise ConfigurationError(f"{caller} needs a taskq.App, got {type(jobs_app).__name__}")
    if worker:
        WorkerConfig.make(**worker_options)
    elif worker_options:
        raise ConfigurationError(
            f"worker settings {sorted(worker_options)} given with worker=False; "
            "drop them or run the worker"
        )


@contextlib.asynccontextmanager
async def serving(
    jobs_app: App, worker: bool, worker_options: dict[str, Any]
) -> AsyncIterator[None]:
    """Open ``jobs_app`` and, with ``worker``, run a worker beside the handlers.

    On exit the worker stops claiming, lets running jobs finish within its
    shutdown timeout, returns the rest to the queue, and the App closes.
    """
    async with jobs_app:
        if not worker:
            yield
            return
        async with jobs_app.worker(**worker_options):
            yield
