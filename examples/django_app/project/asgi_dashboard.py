"""The ASGI entry point with the taskq dashboard under /taskq, beside Django's views.

Django's ASGI application cannot mount another ASGI application, so
``mount_dashboard`` goes in front of it: requests under /taskq reach the
dashboard, every other one reaches Django. Run it from the root of the
repository with a password for the dashboard::

    TASKQ_DASHBOARD_PASSWORD=... uvicorn project.asgi_dashboard:application \\
        --app-dir examples/django_app

and open http://127.0.0.1:8000/taskq/ (user ``admin``).
"""

import os

from django.core.asgi import get_asgi_application

import taskq.dashboard
from taskq.contrib.django import mount_dashboard, with_lifespan

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_application = get_asgi_application()  # sets Django up: import models after this

from project.tasks import app as jobs  # noqa: E402

# Who may use the dashboard: here one password from the environment. Your own
# callable can check Django's session instead (it gets the request).
dashboard = taskq.dashboard.Dashboard(
    jobs, auth=taskq.dashboard.basic_auth("admin", os.environ["TASKQ_DASHBOARD_PASSWORD"])
)

if os.environ.get("TASKQ_DJANGO_LIFESPAN", "1") == "1":
    # taskq opened for the life of the process (workers run elsewhere:
    # `python -m taskq worker project.worker:app`).
    application = mount_dashboard(
        with_lifespan(django_application, jobs, worker=False), "/taskq", dashboard
    )
else:
    # Django alone: the dashboard opens the App on its first request.
    application = mount_dashboard(django_application, "/taskq", dashboard)
