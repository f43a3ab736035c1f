"""``dashboard``: serve the web dashboard on its own, with uvicorn.

A password is required: ``--password-env VAR`` (HTTP basic, the password read
from the environment so it never shows in ``ps``), or ``--insecure-no-auth``
given explicitly. SIGINT and SIGTERM end the open live-update streams, let
requests in flight finish, close the App and exit with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .._errors import TaskqError
from .connect import app_for, opened
from .exits import EXIT_OK, UsageError
from .options import Commands, db_options

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("taskq.cli")

#: Where the dashboard listens unless ``--host`` says otherwise: only this
#: machine. Anything else is a choice (``--host 0.0.0.0``).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: The basic-auth user name unless ``--user`` is given.
DEFAULT_USER = "admin"
#: Database connections of a dashboard made from ``--dsn`` (pages load in
#: parallel; the live updates render once for every browser).
DASHBOARD_POOL_SIZE = 5
#: How long requests in flight get to finish once asked to stop (seconds);
#: event streams are ended at once, so only a slow page load waits.
SHUTDOWN_GRACE_SECONDS = 10
EXTRA_HINT = "pip install 'taskq-pg[dashboard]'"


def add_parser(commands: Commands) -> None:
    parser = commands.add_parser(
        "dashboard",
        help="serve the web dashboard (needs a password: --password-env VAR)",
        description="Serve the taskq web dashboard with uvicorn. It needs a password "
        "(--password-env VAR, HTTP basic) unless --insecure-no-auth is given.",
    )
    parser.add_argument(
        "app",
        nargs="?",
        metavar="MODULE:APP",
        help="your taskq.App, e.g. jobs:app (default: an App on --dsn and --schema)",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    parser.add_argument(
        "--password-env",
        metavar="VAR",
        help="ask for a user name and this environment variable's value as the password "
        "(HTTP basic; serve it behind HTTPS)",
    )
    parser.add_argument(
        "--user",
        default=DEFAULT_USER,
        help=f"the user name with --password-env (default {DEFAULT_USER})",
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="let anyone who can reach the address in, without a password",
    )
    parser.add_argument("--read-only", action="store_true", help="show everything, change nothing")
    parser.add_argument(
        "--secret-env",
        metavar="VAR",
        help="sign the forms' CSRF tokens with this environment variable's value "
        "(at least 16 bytes; the same for every process behind one address; "
        "default: a random one per process)",
    )
    parser.add_argument(
        "--root-path",
        default="",
        metavar="PATH",
        help="the path prefix a reverse proxy serves the dashboard under and strips, "
        "e.g. /taskq (default: none)",
    )
    db_options(parser, with_app=False)
    parser.set_defaults(handler=cmd_dashboard)


def _env_value(option: str, var: str) -> str:
    value = os.environ.get(var, "")
    if not value:
        raise UsageError(f"{option} {var}: ${var} is not set or is empty")
    return value


def _root_path(text: str) -> str:
    root = text.strip().rstrip("/")
    if root and not root.startswith("/"):
        raise UsageError(f"--root-path must start with /, got {text!r}")
    return root


def _auth(args: argparse.Namespace) -> Any:
    from ..dashboard import basic_auth, no_auth

    if args.password_env and args.insecure_no_auth:
        raise UsageError("give --password-env or --insecure-no-auth, not both")
    if args.password_env:
        if not args.user:
            raise UsageError("--user cannot be empty")
        return basic_auth(args.user, _env_value("--password-env", args.password_env))
    if args.insecure_no_auth:
        print(
            "taskq: warning: --insecure-no-auth: anyone who can reach this address can see "
            "the jobs and act on them",
            file=sys.stderr,
        )
        return no_auth
    raise UsageError(
        "the dashboard needs a password: set one in an environment variable and give "
        "--password-env VAR (HTTP basic, user --user, default admin), or give "
        "--insecure-no-auth to serve it without one"
    )


async def cmd_dashboard(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..dashboard import Dashboard
    except ImportError as exc:
        raise TaskqError(f"the dashboard needs {exc.name}: {EXTRA_HINT}") from None
    auth = _auth(args)
    root_path = _root_path(args.root_path)
    secret = _env_value("--secret-env", args.secret_env) if args.secret_env else None
    app = app_for(args)
    if not args.app:
        app.database.pool_max_size = max(app.database.pool_max_size, DASHBOARD_POOL_SIZE)
    try:
        dashboard = Dashboard(app, auth=auth, read_only=args.read_only, secret=secret)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        raise TaskqError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    with sock:
        # Opened first: a database that cannot be reached stops the command
        # with the DSN named, instead of a page of errors later.
        async with opened(app, args):
            stoppable = _EndStreamsOnStop(dashboard)
            config = uvicorn.Config(
                stoppable,
                lifespan="on",
                root_path=root_path,
                log_level="warning",
                access_log=False,
                proxy_headers=False,
                timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
            )
            server = _server(config, stoppable)
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            log.info(
                "taskq dashboard%s on http://%s:%d%s/ (%s)",
                " (read-only)" if args.read_only else "",
                shown,
                port,
                root_path,
                f"user {args.user}" if args.password_env else "no password",
            )
            await server.serve(sockets=[sock])
    log.info("taskq dashboard stopped")
    return EXIT_OK


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


class _EndStreamsOnStop:
    """The dashboard, with its event streams ended when the server is asked to stop.

    A live page's stream never ends by itself, and uvicorn waits for every
    open request before it shuts down: without this, one open browser tab
    would hold a stopping server until its grace period ran out and the
    stream was cancelled (with an error logged). Each stream is told that
    its client went away (``http.disconnect``), so it ends like any other.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._stopping: asyncio.Event | None = None

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._stopping is None:
            self._stopping = asyncio.Event()
        stopping = self._stopping
        body_done = False

        async def receive_until_stop() -> Message:
            nonlocal body_done
            # A request body is read to its end first: cut short, it would be an error.
            if not body_done:
                message = await receive()
                body_done = message["type"] != "http.request" or not message.get("more_body")
                return message
            waiting = asyncio.ensure_future(receive())
            stopped = asyncio.ensure_future(stopping.wait())
            try:
                await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                if not waiting.done():
                    waiting.cancel()
            if waiting.done() and not waiting.cancelled():
                return waiting.result()
            return {"type": "http.disconnect"}

        started = ended = False

        async def send_tracked(message: Message) -> None:
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True
            await send(message)

        await self.app(scope, receive_until_stop, send_tracked)
        if started and not ended and stopping.is_set():
            # The stream was cut short by the stop: end the response properly,
            # so the browser sees a closed stream rather than a broken one.
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _server(config: uvicorn.Config, stoppable: _EndStreamsOnStop) -> uvicorn.Server:
    """uvicorn's server, stopped by SIGINT or SIGTERM without re-raising the signal.

    uvicorn re-raises a captured signal once it has shut down, so that the
    default handler runs: SIGTERM would then kill the process after a clean
    shutdown, and its exit status would say otherwise. Here a signal asks the
    server to stop (a second SIGINT stops it at once), the event streams end,
    and the command returns status 0.
    """
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            signals = (signal.SIGINT, signal.SIGTERM)
            for sig in signals:
                loop.add_signal_handler(sig, self._on_signal, sig)
            try:
                yield
            finally:
                for sig in signals:
                    loop.remove_signal_handler(sig)

        def _on_signal(self, sig: int) -> None:
            log.info("taskq dashboard: %s received, stopping", signal.Signals(sig).name)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            stoppable.stop()

    return Server(config)
