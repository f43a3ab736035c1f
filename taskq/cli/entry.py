"""The entry point: the argument parser, global options, logging, and exit statuses."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, NoReturn

from .._errors import JobNotFound, TaskqError
from .._logging import JsonFormatter
from .._version import DISTRIBUTION, __version__
from . import cron, dashboard, demo, embedded, jobs, migrate, ops, queues, status, worker, workflows
from .exits import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_USAGE, UsageError
from .output import error

log = logging.getLogger("taskq.cli")

#: Level of the log lines on stderr when ``--log-level`` is not given.
DEFAULT_LOG_LEVEL = "INFO"


class _Parser(argparse.ArgumentParser):
    """argparse with taskq's one-line error format (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"taskq: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m taskq``."""
    parser = _Parser(prog="python -m taskq", description="taskq: background jobs on Postgres.")
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {__version__}")
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help=f"least severe log lines written to stderr (default {DEFAULT_LOG_LEVEL}; "
        "DEBUG adds tracebacks of unexpected errors). Given explicitly, it also shows "
        "where the embedded Postgres is, which only worker says by default",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="log lines on stderr as text (default) or one JSON object per line",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In the order of `python -m taskq --help`.
    worker.add_parser(commands)
    migrate.add_parser(commands)
    status.add_parser(commands)
    jobs.add_parser(commands)
    ops.add_parsers(commands)  # retry, cancel, purge
    workflows.add_parser(commands)
    queues.add_parser(commands)
    cron.add_parser(commands)
    dashboard.add_parser(commands)
    demo.add_parser(commands)
    embedded.add_parser(commands)
    return parser


class _QuietEmbeddedNotice(logging.Filter):
    """Drops the App's "no DSN given ...: using the embedded Postgres" INFO line.

    A worker logs it (someone starting one wants to know where the data
    lives); ``demo`` prints the same facts itself; on the commands that print a
    table or JSON it would be a line of noise on every run. ``--log-level``
    given explicitly brings it back.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "taskq"
            and record.levelno == logging.INFO
            and "embedded Postgres" in str(record.msg)
        )


def _setup_logging(level: str | None, fmt: str = "text", *, quiet_embedded: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    if quiet_embedded:
        handler.addFilter(_QuietEmbeddedNotice())
    level = (level or DEFAULT_LOG_LEVEL).upper()
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)


def _run(coro: Coroutine[Any, Any, int], *, uvloop: bool = True) -> int:
    if uvloop:
        try:
            import uvloop as _uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
            pass
        else:
            return int(_uvloop.run(coro))
    return asyncio.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(
        args.log_level,
        args.log_format,
        quiet_embedded=args.log_level is None and args.command != "worker",
    )
    try:
        return _run(args.handler(args), uvloop=args.command in ("worker", "demo"))
    except UsageError as exc:
        error(str(exc))
        return EXIT_USAGE
    except JobNotFound as exc:
        error(str(exc))
        return EXIT_NOT_FOUND
    except TaskqError as exc:
        error(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`... | head`): not an error worth a traceback.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as exc:  # a bug or an unforeseen driver error: one line, details in DEBUG
        log.debug("unexpected error", exc_info=True)
        error(
            f"unexpected {type(exc).__name__}: {exc} (run with --log-level DEBUG for the traceback)"
        )
        return EXIT_ERROR
