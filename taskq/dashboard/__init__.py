"""The web dashboard: an ASGI application that shows the queue and acts on it.

```python
from fastapi import FastAPI
import taskq.dashboard

api = FastAPI()
api.mount("/taskq", taskq.dashboard.Dashboard(jobs, auth=current_admin))
```

or, on its own: ``python -m taskq dashboard myproject.jobs:app --password-env PW``.

Its dependencies (Starlette, Jinja2) come with the ``dashboard`` extra:
``pip install 'taskq-pg[dashboard]'``. ``import taskq`` never loads them.
"""

from __future__ import annotations

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        f"taskq.dashboard needs {exc.name}: pip install 'taskq-pg[dashboard]'"
    ) from exc

from ._app import Dashboard
from ._security import Auth, basic_auth, no_auth

__all__ = ["Auth", "Dashboard", "basic_auth", "no_auth"]
