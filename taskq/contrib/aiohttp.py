"""aiohttp integration: taskq opened, and a worker run, for the life of an ``aiohttp.web`` app.

```python
from aiohttp import web
from taskq.contrib.aiohttp import APP_KEY, setup

web_app = web.Application()
setup(web_app, jobs, concurrency=20)

async def handler(request: web.Request) -> web.Response:
    jobs = request.config_dict[APP_KEY]  # typed: taskq.App
```

Importing this module imports aiohttp; ``import taskq`` never does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from .._app import App
from .._errors import ConfigurationError
from ._serving import check_settings, serving

__all__ = ["APP_KEY", "setup"]

#: Where :func:`setup` stores the taskq App on the web app. Read it with
#: ``request.config_dict[APP_KEY]``, which sub-applications see too.
APP_KEY: web.AppKey[App] = web.AppKey("taskq_app", App)


def setup(
    web_app: web.Application, jobs_app: App, *, worker: bool = True, **worker_options: Any
) -> None:
    """Open ``jobs_app`` while ``web_app`` runs, and run a worker beside its handlers.

    Adds a cleanup context to ``web_app``: on startup it opens the App and
    starts the worker; on cleanup the worker stops claiming, gives its running
    jobs their shutdown timeout to finish, returns the rest to the queue, and
    the App closes. Call it before the web app starts, once per web app.

    Args:
        web_app: the aiohttp application (the main one, not a sub-application).
        jobs_app: the taskq App whose tasks the handlers enqueue; stored under
            :data:`APP_KEY`.
        worker: run a worker in the web process (default). With ``False`` the
            process only enqueues and reads jobs; run workers elsewhere, e.g.
            ``python -m taskq worker tasks:app``.
        **worker_options: settings of the worker (``concurrency``, ``queues``,
            ``shutdown_timeout``... see :class:`taskq.WorkerConfig`), checked now.

    Raises:
        ConfigurationError: a worker setting is unknown or invalid,
            ``worker_options`` were given with ``worker=False``, or ``web_app``
            already has a taskq App.
    """
    check_settings("setup()", jobs_app, worker, worker_options)
    if APP_KEY in web_app:
        raise ConfigurationError(f"this web app already has a taskq App: {web_app[APP_KEY]!r}")
    options = dict(worker_options)

    async def run_taskq(_: web.Application) -> AsyncIterator[None]:
        async with serving(jobs_app, worker, options):
            yield

    web_app[APP_KEY] = jobs_app
    web_app.cleanup_ctx.append(run_taskq)
