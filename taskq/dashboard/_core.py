"""What every page module works with: the page and action shapes, and the view.

A page module (``pages/*.py``) exposes ``PAGES`` and ``ACTIONS``:

- a :class:`Page` is a GET address, a template, and ``load(view)`` that reads
  what the template shows. Its ``regions`` are the parts that update live:
  each is a template rendered with the same context, shown inside an element
  ``data-region="<name>"``. Regions hold data only, never a form's token,
  because one rendering is sent to every browser showing the page.
- an :class:`Action` is a POST address. The dashboard has already checked
  the user, read-only mode and the CSRF token when ``handle`` runs; it
  returns :class:`Done` (redirect with a message) or :class:`Rendered` (a
  page, such as a confirmation).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.datastructures import QueryParams

if TYPE_CHECKING:
    from .._app import App
    from .._database import Database


class NotFound(Exception):
    """The page's object does not exist: a 404 with this message."""


class BadRequest(Exception):
    """A parameter or form field is wrong: a 400 with this message."""


@dataclass(frozen=True)
class Core:
    """The App a dashboard shows and how it may act on it."""

    app: App
    read_only: bool

    @property
    def database(self) -> Database:
        return self.app.database

    @property
    def schema(self) -> str:
        return self.app.schema


@dataclass(frozen=True)
class View:
    """One GET of a page (or one live refresh of it)."""

    core: Core
    params: Mapping[str, Any]
    query: QueryParams

    def arg(self, name: str, default: str = "") -> str:
        """A query parameter, stripped; ``default`` when absent or empty."""
        value = self.query.get(name, "").strip()
        return value or default

    def int_arg(self, name: str, default: int | None = None) -> int | None:
        """A query parameter that must be an integer (400 otherwise)."""
        value = self.arg(name)
        if not value:
            return default
        try:
            return int(value)
        except ValueError:
            raise BadRequest(f"{name} must be a whole number, got {value!r}") from None

    def link(self, **changes: Any) -> str:
        """This page's query string with ``changes`` (None removes a key)."""
        items = {k: v for k, v in self.query.items()}
        for key, value in changes.items():
            if value is None or value == "":
                items.pop(key, None)
            else:
                items[key] = str(value)
        return "?" + urlencode(items) if items else "?"


@dataclass(frozen=True)
class Page:
    path: str
    template: str
    load: Callable[[View], Awaitable[dict[str, Any]]]
    #: The navigation entry it belongs to.
    nav: str
    regions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Form:
    """One POST, checked: its fields (repeated fields are lists)."""

    core: Core
    params: Mapping[str, Any]
    fields: Mapping[str, list[str]]
    user: Any

    def get(self, name: str, default: str = "") -> str:
        values = self.fields.get(name)
        return values[0].strip() if values else default

    def getlist(self, name: str) -> list[str]:
        return list(self.fields.get(name, []))

    def ids(self, name: str = "id") -> list[int]:
        """Job ids ticked in a form (400 if one is not a number)."""
        out = []
        for value in self.getlist(name):
            try:
                out.append(int(value))
            except ValueError:
                raise BadRequest(f"not a job id: {value!r}") from None
        return out


@dataclass(frozen=True)
class Done:
    """An action's outcome: go to ``location`` (relative to the dashboard) and
    show ``message`` there once."""

    location: str
    message: str
    ok: bool = True


@dataclass(frozen=True)
class Rendered:
    """An action's answer that is a page of its own (a confirmation)."""

    template: str
    context: dict[str, Any]
    nav: str = ""
    status: int = 200


@dataclass(frozen=True)
class Action:
    path: str
    handle: Callable[[Form], Awaitable[Done | Rendered]]
