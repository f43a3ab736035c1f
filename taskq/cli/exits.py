"""Exit statuses of ``python -m taskq``, and the error that means a bad command line."""

from __future__ import annotations

from .._errors import TaskqError

#: Exit status: the command did what was asked.
EXIT_OK = 0
#: Exit status: a taskq error (database unreachable, schema missing, ...).
EXIT_ERROR = 1
#: Exit status: bad command line (unknown option, missing argument, refused
#: without ``--yes``); nothing was changed.
EXIT_USAGE = 2
#: Exit status: a job id given on the command line does not exist.
EXIT_NOT_FOUND = 3
#: Exit status: interrupted by Ctrl-C (commands other than ``worker`` and
#: ``status --watch``, for which Ctrl-C is the normal way to stop).
EXIT_INTERRUPTED = 130


class UsageError(TaskqError):
    """The command line asks for something impossible; exit status 2."""
