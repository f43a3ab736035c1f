"""aiohttp integration: taskq opened, and a worker run, for the life of an ``aiohttp.web`` app.

```python
from aiohttp import web
from taskq.contrib.aiohttp import APP_KEY, setup

web_app = web.Application()
setup(web_app, jobs, concurrency=20)

async def handler(request: web.Request) -> web.Response:
    jobs = request.config_dict[APP_KEY]  # typed: taskq.App
```

The dashboard, which is an ASGI application, is served by aiohttp through
:func:`mount_dashboard` (a small bridge: aiohttp cannot host ASGI itself):

```python
import taskq.dashboard
from taskq.contrib.aiohttp import mount_dashboard

mount_dashboard(web_app, "/taskq", taskq.dashboard.Dashboard(jobs, auth=staff_only))
```

Importing this module imports aiohttp; ``import taskq`` never does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, MutableMapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict

from .._app import App
from .._errors import ConfigurationError
from ._serving import check_settings, serving

if TYPE_CHECKING:
    from ..dashboard import Dashboard

__all__ = ["APP_KEY", "mount_dashboard", "setup"]

#: How often a bridged streaming response checks that its client is still
#: there (aiohttp does not cancel a handler whose client left, by default).
DISCONNECT_CHECK_SECONDS = 0.5
#: Request body chunks handed to the ASGI application at most this large.
BODY_CHUNK_BYTES = 64 * 1024

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


def mount_dashboard(web_app: web.Application, prefix: str, dashboard: Dashboard) -> None:
    """Serve the taskq ``dashboard`` under ``prefix`` (``/taskq``) in ``web_app``.

    Requests under the prefix are handed to the dashboard (an ASGI
    application) with the prefix as ``root_path``, their bodies streamed to it
    and its responses streamed back, so the live pages' event streams work; a
    client that goes away is told to the dashboard as ``http.disconnect``.
    When ``web_app`` cleans up, the dashboard's live updates stop (and it
    closes the App if it opened it). It works in a sub-application too.

    Raises:
        ConfigurationError: ``prefix`` is not a path like ``/taskq``.
    """
    clean = prefix.rstrip("/")
    if not clean.startswith("/") or "//" in clean or "{" in clean or "?" in clean:
        raise ConfigurationError(
            f"mount_dashboard() needs a path prefix like /taskq, got {prefix!r}"
        )
    if not callable(dashboard):
        raise ConfigurationError("mount_dashboard() needs a taskq.dashboard.Dashboard")

    stopping = _Stopping()

    async def handle(request: web.Request) -> web.StreamResponse:
        tail = request.match_info.get("tail", "")
        root_path = request.path[: len(request.path) - len(tail)]
        return await _bridge(request, dashboard, root_path, stopping.event())

    # {tail} is "" or starts with "/": /taskq and /taskq/... but not /taskqx.
    web_app.router.add_route("*", clean + "{tail:(/.*)?}", handle)

    async def end_streams(_: web.Application) -> None:
        # aiohttp waits for the handlers in flight after on_shutdown: a live
        # page's stream never ends by itself, so it is ended here.
        stopping.event().set()

    async def close_dashboard(_: web.Application) -> None:
        await dashboard.aclose()

    web_app.on_shutdown.append(end_streams)
    web_app.on_cleanup.append(close_dashboard)


class _Stopping:
    """The web app is shutting down (an event made in the server's loop)."""

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def event(self) -> asyncio.Event:
        if self._event is None:
            self._event = asyncio.Event()
        return self._event


async def _bridge(
    request: web.Request, asgi: Any, root_path: str, stopping: asyncio.Event
) -> web.StreamResponse:
    """One aiohttp request through an ASGI application."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    local = transport.get_extra_info("sockname") if transport is not None else None
    scope: dict[str, Any] = {
        "type": "http",
        # 2.3: the application learns of a client that left from receive(),
        # which this bridge can tell; it has no send() error to raise for it.
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.raw_path.split("?", 1)[0].encode("latin-1"),
        "query_string": request.query_string.encode("latin-1"),
        "root_path": root_path,
        "headers": [(k.lower(), v) for k, v in request.raw_headers],
        "client": tuple(peer[:2]) if isinstance(peer, tuple) else None,
        "server": tuple(local[:2]) if isinstance(local, tuple) else None,
    }
    response: web.StreamResponse | None = None
    finished = asyncio.Event()
    body_done = False

    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing() or stopping.is_set()

    async def receive() -> MutableMapping[str, Any]:
        nonlocal body_done
        if not body_done:
            chunk = await request.content.read(BODY_CHUNK_BYTES)
            body_done = request.content.at_eof()
            return {"type": "http.request", "body": chunk, "more_body": not body_done}
        # Nothing more to read: wait for the response to end or the client to leave.
        while not finished.is_set() and not gone():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), DISCONNECT_CHECK_SECONDS)
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal response
        if finished.is_set():
            return
        if message["type"] == "http.response.start":
            headers: CIMultiDict[str] = CIMultiDict()
            for key, value in message.get("headers", []):
                headers.add(key.decode("latin-1"), value.decode("latin-1"))
            response = web.StreamResponse(status=message["status"], headers=headers)
            return
        if message["type"] != "http.response.body" or response is None:
            return
        try:
            if not response.prepared:
                await response.prepare(request)
            body = message.get("body", b"")
            if body and request.method != "HEAD":
                await response.write(body)
            if not message.get("more_body", False):
                await response.write_eof()
                finished.set()
        except ConnectionError:
            # The client left mid-response: the application hears it from receive().
            finished.set()

    await asgi(scope, receive, send)
    if response is None:
        finished.set()
        return web.Response(status=500, text="the dashboard sent no response")
    if not finished.is_set():
        # A stream ended by the shutdown (or a client that left): close it properly.
        finished.set()
        with contextlib.suppress(ConnectionError):
            if not response.prepared:
                await response.prepare(request)
            await response.write_eof()
    return response
