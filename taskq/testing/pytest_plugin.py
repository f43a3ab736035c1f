"""The taskq pytest plugin: your App, open on a throwaway schema, in each test.

pytest loads it by itself when taskq is installed (the ``pytest11`` entry
point ``taskq``). It adds two ini options and three fixtures, all named
``taskq_*``, and nothing else; nothing happens unless a test uses one:

- ini ``taskq_app``: the App your tests use, as ``module:attribute``
  (``mypkg.tasks:app``).
- ini ``taskq_dsn``: the test database, when ``$TASKQ_TEST_DSN`` is unset
  (default: the local embedded Postgres).
- fixture ``taskq_dsn`` (session): the test database's DSN.
- fixture ``taskq_base_app`` (session): the App named by ``taskq_app``;
  override it in ``conftest.py`` to choose the App in code.
- fixture ``taskq_app`` (async): that App, open on a fresh schema, dropped
  after the test; its settings, tasks and hooks are restored afterwards.

Async fixtures run under anyio's pytest plugin (taskq depends on anyio):
mark tests ``@pytest.mark.anyio`` and define an ``anyio_backend`` fixture
that returns ``"asyncio"``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .. import App

# taskq itself is imported only when a fixture is used: every pytest run in
# an environment with taskq installed loads this module, and pays nothing.

#: ini option naming the App the fixtures use.
APP_OPTION = "taskq_app"
#: ini option naming the test database (``$TASKQ_TEST_DSN`` wins over it).
DSN_OPTION = "taskq_dsn"

_NOT_CONFIGURED = (
    "the taskq_app fixture needs to know your App. Name it in your pytest configuration, "
    'e.g. in pyproject.toml:\n\n    [tool.pytest.ini_options]\n    taskq_app = "mypkg.tasks:app"'
    "\n\n(or taskq_app = mypkg.tasks:app under [pytest] in pytest.ini), or override the "
    "taskq_base_app fixture in conftest.py to return it."
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        APP_OPTION,
        "taskq: the App the taskq_app fixture opens on a throwaway schema, as module:attribute "
        "(e.g. mypkg.tasks:app)",
        default="",
    )
    parser.addini(
        DSN_OPTION,
        "taskq: Postgres DSN of the test database when $TASKQ_TEST_DSN is unset "
        "(default: the local embedded Postgres; $TASKQ_DSN is never used)",
        default="",
    )


@pytest.fixture(scope="session")
def taskq_dsn(pytestconfig: pytest.Config) -> str:
    """The test database: ``$TASKQ_TEST_DSN``, the ``taskq_dsn`` ini option, or embedded."""
    from .._errors import TaskqError
    from ._isolation import resolve_dsn

    try:
        return resolve_dsn(default=str(pytestconfig.getini(DSN_OPTION)) or None)
    except TaskqError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def taskq_base_app(pytestconfig: pytest.Config) -> App:
    """The App named by the ``taskq_app`` ini option, as your code defines it.

    Override this fixture to choose the App in code instead.
    """
    spec = str(pytestconfig.getini(APP_OPTION)).strip()
    if not spec:
        pytest.fail(_NOT_CONFIGURED, pytrace=False)
    from .._errors import TaskqError
    from ..cli.connect import load_app

    try:
        return load_app(spec)
    except TaskqError as exc:
        pytest.fail(f"taskq_app = {spec!r} in your pytest configuration: {exc}", pytrace=False)


@pytest.fixture
async def taskq_app(taskq_base_app: App, taskq_dsn: str, anyio_backend: Any) -> AsyncIterator[App]:
    """Your App, open on a fresh schema of the test database; put back after the test.

    The schema (``taskq_test_<hex>``) is created and migrated before the test
    and dropped after it, so every test starts with no jobs. Tasks, hooks and
    cron entries added during the test are removed afterwards.
    """
    from .. import App
    from ._isolation import isolated_app

    backend = anyio_backend if isinstance(anyio_backend, str) else anyio_backend[0]
    if backend != "asyncio":
        pytest.fail(
            f"taskq runs on asyncio, not {backend}: define an anyio_backend fixture that "
            'returns "asyncio" in conftest.py',
            pytrace=False,
        )
    if not isinstance(taskq_base_app, App):
        pytest.fail(
            f"taskq_base_app returned a {type(taskq_base_app).__name__}, not a taskq.App",
            pytrace=False,
        )
    async with isolated_app(taskq_base_app, dsn=taskq_dsn) as app:
        yield app
