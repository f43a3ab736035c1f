"""The App a command works on (``MODULE:APP``, ``--dsn``, ``--schema``), opened and closed.

Connection failures are explained: the DSN, password masked, and where it came from.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg

from .._app import App
from .._database import DSN_ENV
from .._errors import ConfigurationError, DatabaseError, TaskqError
from .exits import UsageError
from .output import masked


def load_app(spec: str) -> App:
    """Import ``module:attribute`` (``module`` alone looks for ``app``) and return the App."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if not module_name:
        raise TaskqError(f"expected MODULE:APP (e.g. myproject.jobs:app), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskqError(f"cannot import {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TaskqError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, App):
        raise TaskqError(f"{spec} is a {type(obj).__name__}, not a taskq.App")
    return obj


def app_for(args: argparse.Namespace) -> App:
    """The App of an operator command: ``--app``'s, else one on ``--dsn`` and ``--schema``.

    It never migrates: only ``migrate`` changes the schema.
    """
    if getattr(args, "app", None):
        if args.schema:
            raise UsageError("give --app or --schema, not both: the App names its own schema")
        app = load_app(args.app)
        if args.dsn:
            app.database.dsn_arg = args.dsn
    else:
        # Two connections are plenty for one command.
        app = App(args.dsn, schema=args.schema, pool_max_size=2)
    app.auto_migrate = False  # only `migrate` changes the schema
    # Someone waits for the answer: a database that cannot be reached is
    # reported at once (the worker command keeps trying, see --connect-retry).
    app.database.connect_retry = 0
    set_connect_timeout(app, args)
    return app


def set_connect_timeout(app: App, args: argparse.Namespace) -> None:
    """Apply ``--connect-timeout``, when given, to the App's new connections."""
    if getattr(args, "connect_timeout", None) is not None:
        app.database.connect_kwargs["timeout"] = args.connect_timeout


def dsn_source(app: App, args: argparse.Namespace) -> str:
    """Where the App's DSN came from, for error messages."""
    if getattr(args, "dsn", None):
        return "--dsn"
    if getattr(args, "app", None) and app.database.dsn_arg:
        return f"the App {args.app}"
    if os.environ.get(DSN_ENV):
        return f"${DSN_ENV}"
    return "the embedded Postgres"


@contextlib.contextmanager
def explained(app: App, args: argparse.Namespace) -> Iterator[None]:
    """Connection failures name the DSN (password masked) and where it came from.

    A server that never answers is reported as such, with the connect
    timeout, rather than as a bare ``TimeoutError()``.
    """
    try:
        yield
    except DatabaseError as exc:
        dsn = f"DSN {masked(app.database.dsn or '')!r} from {dsn_source(app, args)}"
        cause = exc.__cause__
        if isinstance(cause, asyncpg.ClientConfigurationError):
            reason = str(cause).removeprefix("invalid DSN: ")
            raise ConfigurationError(f"invalid {dsn}: {reason}") from exc
        if isinstance(cause, TimeoutError):
            seconds = app.database.connect_args("taskq")["timeout"]
            raise DatabaseError(
                f"connecting to Postgres failed: no answer within {seconds:g} s [{dsn}]"
            ) from exc
        raise DatabaseError(f"{exc} [{dsn}]") from exc
    except ValueError as exc:
        if isinstance(exc, TaskqError):
            raise
        # asyncpg's DSN parser lets some mistakes through as plain ValueErrors.
        dsn = f"DSN {masked(app.database.dsn or '')!r} from {dsn_source(app, args)}"
        raise ConfigurationError(f"invalid {dsn}: {exc}") from exc


@contextlib.asynccontextmanager
async def opened(app: App, args: argparse.Namespace) -> AsyncIterator[App]:
    """Open the App (failures explained by :func:`explained`), close it at the end."""
    with explained(app, args):
        await app.open()
    try:
        yield app
    finally:
        await app.close()
