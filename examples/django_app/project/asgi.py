"""The ASGI entry point: Django, with taskq opened for the life of each server process.

Run it from the root of the repository (no database to set up: without
$TASKQ_DSN taskq starts its embedded Postgres)::

    uvicorn project.asgi:application --app-dir examples/django_app

Then, in another terminal::

    curl -X POST localhost:8000/users/42/welcome
    curl localhost:8000/jobs/1
"""

import os

from django.conf import settings
from django.core.asgi import get_asgi_application

from taskq.contrib.django import with_lifespan

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_application = get_asgi_application()  # sets Django up: import models after this

from project.tasks import app as jobs  # noqa: E402

if settings.TASKQ_WEB_WORKER:
    # Opens taskq and runs a worker beside the views; on shutdown the worker
    # lets running jobs finish (30 s by default) and returns the rest to the queue.
    application = with_lifespan(django_application, jobs, concurrency=10)
else:
    application = with_lifespan(django_application, jobs, worker=False)
