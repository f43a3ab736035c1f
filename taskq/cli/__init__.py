"""The ``python -m taskq`` command line, one module per command group.

- :mod:`.entry`: the argument parser, global options, logging, :func:`main`;
- :mod:`.exits`: exit statuses and :class:`UsageError`;
- :mod:`.options`: option types and the options many commands share;
- :mod:`.connect`: the App a command works on, opened with failures explained;
- :mod:`.output`: tables, JSON, timestamps, progress, masked DSNs;
- :mod:`.worker`, :mod:`.migrate`, :mod:`.status`, :mod:`.jobs`,
  :mod:`.ops` (retry, cancel, purge), :mod:`.queues`, :mod:`.cron`,
  :mod:`.workflows`, :mod:`.demo`, :mod:`.embedded`: the commands;
- :mod:`.demo_jobs`: the demo's own App and sample jobs;
- :mod:`.supervise`, :mod:`.supervisor`, :mod:`.autoscale`: ``worker
  --processes``/``--autoscale``, a supervisor of child worker processes.

The SQL of the operator commands lives in ``taskq._admin``; these modules
parse arguments, ask for confirmation where deleting needs it, and print
tables, JSON and progress.
"""

from __future__ import annotations

from .connect import load_app
from .entry import build_parser, main
from .exits import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
)
from .options import parse_duration

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "load_app",
    "main",
    "parse_duration",
]
