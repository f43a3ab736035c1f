"""The queues page(s)."""

from __future__ import annotations

from .._core import Action, Page

PAGES: list[Page] = []
ACTIONS: list[Action] = []
