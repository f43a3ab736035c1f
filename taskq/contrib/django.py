"""Django integration: taskq opened, and a worker run, for the life of Django's ASGI application.

Django's ASGI handler does not take part in the ASGI ``lifespan`` protocol, so
it has no startup or shutdown step in which to open a taskq App. Wrap it:

```python
# project/asgi.py
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_application = get_asgi_application()

from project.tasks import app as jobs  # after Django is set up
from taskq.contrib.django import with_lifespan

application = with_lifespan(django_application, jobs, concurrency=10)
```

and serve ``project.asgi:application`` with an ASGI server that runs the
lifespan protocol (uvicorn, Hypercorn). Every other scope (HTTP, WebSocket)
goes to Django untouched.

The dashboard: Django's ASGI application has no way to mount another ASGI
application, so :func:`mount_dashboard` puts one in front of it:

```python
import taskq.dashboard
from taskq.contrib.django import mount_dashboard, with_lifespan

dashboard = taskq.dashboard.Dashboard(jobs, auth=staff_only)
application = mount_dashboard(with_lifespan(django_application, jobs), "/taskq", dashboard)
```

Nothing here imports Django: the wrappers speak plain ASGI.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from .._app import App
from .._errors import ConfigurationError
from ._serving import check_settings, serving

if TYPE_CHECKING:
    from ..dashboard import Dashboard

__all__ = ["DashboardMount", "TaskqLifespan", "mount_dashboard", "with_lifespan"]

log = logging.getLogger("taskq.contrib.django")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TaskqLifespan:
    """An ASGI application: Django (or any ASGI app) plus taskq's lifespan.

    Made by :func:`with_lifespan`. On ``lifespan.startup`` it opens the taskq
    App (applying migrations unless the App says otherwise) and, with
    ``worker=True``, starts a worker in the server's event loop. On
    ``lifespan.shutdown`` the worker stops claiming, lets running jobs finish
    within its shutdown timeout, returns the rest to the queue, and the App
    closes. Every other scope is passed to the wrapped application.
    """

    def __init__(
        self,
        application: ASGIApp,
        jobs_app: App,
        *,
        worker: bool,
        worker_options: dict[str, Any],
    ) -> None:
        #: The wrapped ASGI application (Django's).
        self.application = application
        #: The taskq App opened for the life of the server process.
        self.jobs_app = jobs_app
        #: Whether a worker runs in the server process.
        self.worker = worker
        self.worker_options = worker_options

    def __repr__(self) -> str:
        return f"<taskq.contrib.django.TaskqLifespan {self.jobs_app!r} worker={self.worker}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle a ``lifespan`` scope; hand any other scope to the wrapped application."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.application(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        # One task runs the whole lifespan, so the App and the worker's task
        # group are entered and left in the same task, as anyio requires.
        started = False
        try:
            async with serving(self.jobs_app, self.worker, self.worker_options):
                started = True
                await send({"type": "lifespan.startup.complete"})
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
        except Exception as exc:
            # The server logs the message (uvicorn then exits on a failed
            # startup instead of serving requests that cannot enqueue).
            phase = "shutdown" if started else "startup"
            await send(
                {
                    "type": f"lifespan.{phase}.failed",
                    "message": f"taskq {phase} failed: {type(exc).__name__}: {exc}",
                }
            )
            return
        await send({"type": "lifespan.shutdown.complete"})


def with_lifespan(
    application: ASGIApp, jobs_app: App, *, worker: bool = True, **worker_options: Any
) -> TaskqLifespan:
    """Wrap Django's ASGI application so that each server process opens ``jobs_app``.

    Serve the result instead of Django's application (``application = with_lifespan(...)``
    in ``asgi.py``). It needs an ASGI server that runs the lifespan protocol,
    such as uvicorn or Hypercorn; each server process opens its own App and,
    with ``worker=True``, runs its own worker.

    Args:
        application: Django's ASGI application (``get_asgi_application()``), or
            any other ASGI application that does not handle ``lifespan`` itself.
        jobs_app: the taskq App whose tasks the views enqueue.
        worker: run a worker in the web process (default). With ``False`` the
            process only enqueues and reads jobs; run workers elsewhere, e.g.
            ``python -m taskq worker project.worker:app``.
        **worker_options: settings of the worker (``concurrency``, ``queues``,
            ``shutdown_timeout``... see :class:`taskq.WorkerConfig`). They are
            checked here, so a bad setting fails at import, not at startup.

    Returns:
        A :class:`TaskqLifespan`, an ASGI application.

    Raises:
        ConfigurationError: ``jobs_app`` is not a taskq App, ``application`` is not
            callable, a worker setting is unknown or invalid, or
            ``worker_options`` were given with ``worker=False``.
    """
    check_settings("with_lifespan()", jobs_app, worker, worker_options)
    if not callable(application):
        raise ConfigurationError(
            f"with_lifespan() needs an ASGI application, got {type(application).__name__}"
        )
    return TaskqLifespan(application, jobs_app, worker=worker, worker_options=dict(worker_options))


class DashboardMount:
    """An ASGI application: the dashboard under a path prefix, everything else
    to the wrapped application (Django's). Made by :func:`mount_dashboard`.

    Requests under the prefix go to the dashboard with the prefix added to
    ``root_path`` (its links, redirects and cookies then stay under it). The
    ``lifespan`` scope goes to the wrapped application when it takes part in
    the protocol (a :class:`TaskqLifespan` does; Django's own handler does
    not, and then this answers it alone); at shutdown the dashboard's live
    updates stop first.
    """

    def __init__(self, application: ASGIApp, prefix: str, dashboard: Dashboard) -> None:
        #: The wrapped ASGI application.
        self.application = application
        #: Where the dashboard is, e.g. ``/taskq`` (no trailing slash).
        self.prefix = prefix
        self.dashboard = dashboard

    def __repr__(self) -> str:
        return f"<taskq.contrib.django.DashboardMount {self.prefix!r} {self.application!r}>"

    def _mine(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Dispatch by path; run the lifespan of both applications."""
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        root = scope.get("root_path", "")
        path = scope.get("path", "")
        # ASGI servers put root_path in front of path (uvicorn --root-path):
        # the prefix is matched after it.
        inner = path[len(root) :] if root and path.startswith(root) else path
        if scope["type"] == "http" and self._mine(inner):
            await self.dashboard({**scope, "root_path": root + self.prefix}, receive, send)
            return
        await self.application(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen: set[str] = set()
        answered = False

        async def receive_for_inner() -> Message:
            message = await receive()
            seen.add(message["type"])
            if message["type"] == "lifespan.shutdown":
                # Live updates stop before the wrapped application closes the App.
                await self.dashboard.aclose()
            return message

        async def send_for_inner(message: Message) -> None:
            nonlocal answered
            answered = True
            await send(message)

        try:
            await self.application(scope, receive_for_inner, send_for_inner)
        except Exception as exc:
            if answered:
                raise
            # Django's handler refuses the lifespan scope (ValueError): answer it here.
            log.debug("the wrapped application does not run the lifespan protocol: %r", exc)
        if answered:
            return
        if "lifespan.startup" not in seen:
            await receive()
        await send({"type": "lifespan.startup.complete"})
        if "lifespan.shutdown" not in seen:
            while (await receive())["type"] != "lifespan.shutdown":
                pass
            await self.dashboard.aclose()
        await send({"type": "lifespan.shutdown.complete"})


def mount_dashboard(application: ASGIApp, prefix: str, dashboard: Dashboard) -> DashboardMount:
    """Serve ``dashboard`` under ``prefix`` in front of Django's ASGI application.

    Serve the result (``application = mount_dashboard(...)`` in ``asgi.py``);
    wrap Django in :func:`with_lifespan` first if the process should also open
    the taskq App (and run a worker). The dashboard opens the App on its
    first request otherwise.

    Args:
        application: Django's ASGI application, or :func:`with_lifespan`'s.
        prefix: the path the dashboard answers under, such as ``/taskq``.
        dashboard: a :class:`taskq.dashboard.Dashboard` (its ``auth`` decides
            who may use it: Django's session is not consulted unless your
            ``auth`` callable does).

    Raises:
        ConfigurationError: ``prefix`` is not a path like ``/taskq``, or an
            argument is not an ASGI application.
    """
    clean = prefix.rstrip("/")
    if not clean.startswith("/") or "//" in clean or "?" in clean or "#" in clean:
        raise ConfigurationError(
            f"mount_dashboard() needs a path prefix like /taskq, got {prefix!r}"
        )
    if not callable(application) or not callable(dashboard):
        raise ConfigurationError(
            "mount_dashboard() needs Django's ASGI application and a Dashboard"
        )
    return DashboardMount(application, clean, dashboard)
