"""The dashboard's pages, one module per navigation entry.

Each module exposes ``PAGES`` (GET addresses) and ``ACTIONS`` (POST addresses);
see :mod:`taskq.dashboard._core`.
"""

from __future__ import annotations

from .._core import Action, Page
from . import cron, job, jobs, overview, queues, workers, workflows

_MODULES = (overview, jobs, job, workflows, queues, cron, workers)


def all_pages() -> list[Page]:
    return [page for module in _MODULES for page in module.PAGES]


def all_actions() -> list[Action]:
    return [action for module in _MODULES for action in module.ACTIONS]
