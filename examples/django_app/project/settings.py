"""Settings of the example: the least Django needs to serve the views.

taskq reads its own configuration from the environment ($TASKQ_DSN; without it
the embedded Postgres), not from these settings.
"""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "project.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
# Django's own database (none of the example's data lives there): the sync
# view's transaction.atomic() needs one.
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True

# Run a taskq worker inside each web server process (handy in development).
# Set TASKQ_WEB_WORKER=0 to only enqueue from the web processes and run
# `python -m taskq worker project.worker:app` beside them instead.
TASKQ_WEB_WORKER = os.environ.get("TASKQ_WEB_WORKER", "1") == "1"
