"""Griffe extension for the API reference: render the Sphinx roles in taskq's docstrings.

taskq's docstrings use roles such as :class:`taskq.Retry` or :meth:`Task.enqueue`,
which Markdown would print literally. A role naming a public taskq object becomes
a cross-reference to its entry on the API page; any other role becomes inline code.
Loaded by mkdocstrings (see ``extensions`` in mkdocs.yml); it only rewrites the
docstrings the documentation renders, never the source.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|data|attr|exc|obj|mod):`~?([^`]+)`")


def _public_names() -> frozenset[str]:
    try:
        import taskq
    except ImportError:  # the reference still builds, with code instead of links
        return frozenset()
    return frozenset(taskq.__all__)


class SphinxRoles(griffe.Extension):
    """Turn Sphinx roles into Markdown cross-references or inline code."""

    def __init__(self) -> None:
        super().__init__()
        self.public = _public_names()

    def _rewrite(self, match: re.Match[str]) -> str:
        name = match.group(1).removeprefix("taskq.")
        if name.split(".")[0] in self.public:
            return f"[`{name}`][taskq.{name}]"
        return f"`{name}`"

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":`" in obj.docstring.value:
            obj.docstring.value = _ROLE.sub(self._rewrite, obj.docstring.value)
