"""What `python -m taskq worker project.worker:app` loads: Django first, then the tasks.

Tasks that use the ORM need Django set up before their module is imported.
"""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django.setup()

from project.tasks import app  # noqa: E402

__all__ = ["app"]
