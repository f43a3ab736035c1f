"""FastAPI (and Starlette) integration: taskq opened, and a worker run, for the life of the app.

```python
from fastapi import FastAPI
from taskq.contrib.fastapi import lifespan

api = FastAPI(lifespan=lifespan(jobs, concurrency=20))
```

Nothing here imports FastAPI: the lifespan protocol is a plain callable that
takes the web app and returns an async context manager, so the same object
serves Starlette apps too.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

from .._app import App
from .._errors import ConfigurationError
from ._serving import check_settings, serving

__all__ = ["Lifespan", "lifespan"]


class Lifespan:
    """Opens a taskq App (and runs a worker) while a web app runs.

    Made by :func:`lifespan`. Use it in either of two ways:

    - as the web app's lifespan: ``FastAPI(lifespan=lifespan(jobs))``;
    - as an async context manager inside a lifespan of your own, when the app
      has more to start and stop: ``async with taskq_lifespan: ...``.

    On exit the worker stops claiming, gives its running jobs their shutdown
    timeout to finish, returns the rest to the queue, and the App closes.

    Attributes:
        jobs_app: the taskq App it opens.
        worker: whether it runs a worker.
        worker_options: the worker's settings, as given to :func:`lifespan`.
    """

    def __init__(self, jobs_app: App, *, worker: bool, worker_options: dict[str, Any]) -> None:
        self.jobs_app = jobs_app
        self.worker = worker
        self.worker_options = worker_options
        self._entered: AbstractAsyncContextManager[None] | None = None

    def __repr__(self) -> str:
        return f"<taskq.contrib.fastapi.Lifespan {self.jobs_app!r} worker={self.worker}>"

    def __call__(self, web_app: object = None) -> AbstractAsyncContextManager[None]:
        """A fresh context manager for one run of the web app (the lifespan protocol).

        The web app itself is not used: taskq needs nothing from it.
        """
        return self._run()

    def _run(self) -> AbstractAsyncContextManager[None]:
        return serving(self.jobs_app, self.worker, self.worker_options)

    async def __aenter__(self) -> None:
        if self._entered is not None:
            raise ConfigurationError(
                "this taskq lifespan is already entered; enter it once at a time, or call "
                "it (lifespan(...)(web_app)) for a context manager of its own"
            )
        entered = self._entered = self._run()
        try:
            await entered.__aenter__()
        except BaseException:
            self._entered = None
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        entered, self._entered = self._entered, None
        if entered is None:
            raise ConfigurationError("this taskq lifespan was not entered")
        return await entered.__aexit__(exc_type, exc, tb)


def lifespan(jobs_app: App, *, worker: bool = True, **worker_options: Any) -> Lifespan:
    """A lifespan that opens ``jobs_app`` and runs a worker beside the request handlers.

    Pass it to ``FastAPI(lifespan=...)`` (or Starlette's), or enter it with
    ``async with`` inside your own lifespan. Each server process opens its
    own App and, with ``worker=True``, runs its own worker.

    Args:
        jobs_app: the taskq App whose tasks the web app enqueues.
        worker: run a worker in the web process (default). With ``False`` the
            process only enqueues and reads jobs; run workers elsewhere, e.g.
            ``python -m taskq worker tasks:app``.
        **worker_options: settings of the worker (``concurrency``, ``queues``,
            ``shutdown_timeout``... see :class:`taskq.WorkerConfig`). They are
            checked here, so a bad setting fails at import, not at startup.

    Returns:
        A :class:`Lifespan`: callable with the web app, and an async context manager.

    Raises:
        ConfigurationError: a worker setting is unknown or invalid, or
            ``worker_options`` were given with ``worker=False``.
    """
    check_settings("lifespan()", jobs_app, worker, worker_options)
    return Lifespan(jobs_app, worker=worker, worker_options=dict(worker_options))
