"""The ``python -m taskq`` command line.

Commands: worker, migrate, status, jobs, retry, cancel, purge, queues, cron,
demo, embedded. The SQL of the operator commands lives in ``_admin``; this
module parses arguments, asks for confirmation where deleting needs it, and
prints tables, JSON and progress.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import importlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn, TextIO

import anyio
import asyncpg
import orjson

from . import _admin
from ._app import DEFAULT_CONNECT_TIMEOUT, App, translate_errors
from ._errors import ConfigurationError, DatabaseError, JobNotFound, TaskqError
from ._logging import JsonFormatter
from ._names import DEFAULT_SCHEMA
from ._version import DISTRIBUTION, __version__

log = logging.getLogger("taskq.cli")

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

#: Seconds between frames of ``status --watch`` when no value is given.
DEFAULT_WATCH_SECONDS = 2.0
#: ``status --watch`` counts finished jobs of this recent window by default:
#: counting all of a large history on every frame would be a full scan.
DEFAULT_WATCH_WINDOW = 60.0

#: Default of options that leave a setting as it is.
_KEEP: Any = object()


class UsageError(TaskqError):
    """The command line asks for something impossible; exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with taskq's one-line error format (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"taskq: error: {message} (see `{self.prog} --help`)\n")


# -- helpers -------------------------------------------------------------------------


def load_app(spec: str) -> App:
    """Import ``module:attribute`` (``module`` alone looks for ``app``) and return the App."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if not module_name:
        raise TaskqError(f"expected MODULE:APP (e.g. myproject.jobs:app), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskqError(f"cannot import {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TaskqError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, App):
        raise TaskqError(f"{spec} is a {type(obj).__name__}, not a taskq.App")
    return obj


#: Level of the log lines on stderr when ``--log-level`` is not given.
DEFAULT_LOG_LEVEL = "INFO"


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


def _app_for(args: argparse.Namespace) -> App:
    if getattr(args, "app", None):
        if args.schema:
            raise UsageError("give --app or --schema, not both: the App names its own schema")
        app = load_app(args.app)
        if args.dsn:
            app._dsn_arg = args.dsn
    else:
        # Two connections are plenty for one command.
        app = App(args.dsn, schema=args.schema, pool_max_size=2)
    app.auto_migrate = False  # only `migrate` changes the schema
    _set_connect_timeout(app, args)
    return app


def _set_connect_timeout(app: App, args: argparse.Namespace) -> None:
    if getattr(args, "connect_timeout", None) is not None:
        app.connect_kwargs["timeout"] = args.connect_timeout


_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)\S+", re.IGNORECASE)


def _masked(dsn: str) -> str:
    """The DSN with its password replaced by ``***``."""
    return _KV_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", dsn))


def _dsn_source(app: App, args: argparse.Namespace) -> str:
    if getattr(args, "dsn", None):
        return "--dsn"
    if getattr(args, "app", None) and app._dsn_arg:
        return f"the App {args.app}"
    if os.environ.get("TASKQ_DSN"):
        return "$TASKQ_DSN"
    return "the embedded Postgres"


@contextlib.contextmanager
def _explained(app: App, args: argparse.Namespace) -> Iterator[None]:
    """Connection failures name the DSN (password masked) and where it came from.

    A server that never answers is reported as such, with the connect
    timeout, rather than as a bare ``TimeoutError()``.
    """
    try:
        yield
    except DatabaseError as exc:
        dsn = f"DSN {_masked(app.dsn or '')!r} from {_dsn_source(app, args)}"
        cause = exc.__cause__
        if isinstance(cause, asyncpg.ClientConfigurationError):
            reason = str(cause).removeprefix("invalid DSN: ")
            raise ConfigurationError(f"invalid {dsn}: {reason}") from exc
        if isinstance(cause, TimeoutError):
            seconds = app._connect_args("taskq")["timeout"]
            raise DatabaseError(
                f"connecting to Postgres failed: no answer within {seconds:g} s [{dsn}]"
            ) from exc
        raise DatabaseError(f"{exc} [{dsn}]") from exc
    except ValueError as exc:
        if isinstance(exc, TaskqError):
            raise
        # asyncpg's DSN parser lets some mistakes through as plain ValueErrors.
        dsn = f"DSN {_masked(app.dsn or '')!r} from {_dsn_source(app, args)}"
        raise ConfigurationError(f"invalid {dsn}: {exc}") from exc


@contextlib.asynccontextmanager
async def _opened(app: App, args: argparse.Namespace) -> AsyncIterator[App]:
    """Open the App (failures explained by :func:`_explained`), close it at the end."""
    with _explained(app, args):
        await app.open()
    try:
        yield app
    finally:
        await app.close()


def _print_json(value: Any) -> None:
    print(orjson.dumps(value).decode(), flush=True)


def _print_table(headers: list[str], rows: list[list[str]], *, right: Sequence[int] = ()) -> None:
    for line in _table(headers, rows, right=right):
        print(line)


def _table(headers: list[str], rows: list[list[str]], *, right: Sequence[int] = ()) -> list[str]:
    """Rows padded into columns; columns in ``right`` (numbers) align right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _when(value: datetime | None) -> str:
    """A timestamp for tables: UTC, to the second."""
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _age(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h10m``, ``4d03h``."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``15m``, ``12h``, ``7d``, ``2w`` or a sum like ``1h30m``."""
    value = text.strip().lower()
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match[1]) * _UNIT_SECONDS[match[2]]
        pos = match.end()
    if not value or pos != len(value):
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 30m, 12h, 7d or 1h30m, got {text!r}"
        )
    return total


def _window_arg(text: str) -> float | None:
    if text.strip().lower() == "all":
        return None
    seconds = parse_duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the window must be longer than 0s")
    return seconds


def _describe_seconds(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _limit_arg(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'none', got {value!r}"
        ) from None


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


class _Progress:
    """Progress of a bulk command on stderr, once more than one batch is involved.

    On a terminal one line is rewritten in place; otherwise (CI logs) a line
    is printed at most every ``interval`` seconds, and always at the end.
    """

    def __init__(self, verb: str, stream: TextIO | None = None, interval: float = 1.0) -> None:
        self.verb = verb
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.1 if self.tty else interval
        self.last = -float("inf")
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if total <= _admin.BATCH_SIZE:
            return
        now = time.monotonic()
        if done < total and now - self.last < self.interval:
            return
        self.last = now
        self.shown = True
        text = f"{self.verb} {done:,}/{total:,}"
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _scope(queue: str | None, task: str | None) -> str:
    parts = [f"queue {queue!r}" if queue else "", f"task {task!r}" if task else ""]
    text = " and ".join(p for p in parts if p)
    return f" of {text}" if text else ""


def _not_found(app: App, ids: Sequence[int]) -> None:
    for i in ids:
        print(f"taskq: error: no job with id {i} in schema {app.schema!r}", file=sys.stderr)


# -- worker, migrate -------------------------------------------------------------------


async def _cmd_worker(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    if args.dsn:
        app._dsn_arg = args.dsn
    _set_connect_timeout(app, args)
    settings: dict[str, Any] = {"shutdown_timeout": args.shutdown_timeout}
    if args.lease_seconds is not None:
        settings["lease_seconds"] = args.lease_seconds
    if args.poll_interval is not None:
        settings["poll_interval"] = args.poll_interval
    if args.no_cron:
        settings["cron"] = False
    async with contextlib.AsyncExitStack() as stack:
        metrics = None
        if args.metrics_port is not None:
            try:
                from .contrib.prometheus import TaskqMetrics
            except ImportError as exc:
                raise TaskqError(
                    "--metrics-port needs prometheus-client: "
                    f"pip install 'taskq-pg[metrics]' ({exc})"
                ) from None
            metrics = TaskqMetrics(app)
            try:
                server = metrics.start_http_server(args.metrics_port, args.metrics_addr)
            except OSError as exc:
                raise TaskqError(
                    f"cannot serve metrics on {args.metrics_addr}:{args.metrics_port}: {exc}"
                ) from None
            stack.callback(server.close)
            log.info("serving metrics on http://%s:%d/metrics", args.metrics_addr, server.port)
        # Opened here (the worker's own open() then counts one more user) so
        # that a database that cannot be reached is named in the error.
        await stack.enter_async_context(_opened(app, args))
        if metrics is not None:
            await stack.enter_async_context(metrics.refreshing())
        stats = await app.run_worker(
            concurrency=args.concurrency, queues=args.queue or None, **settings
        )
    log.info(
        "worker stopped: %d succeeded, %d failed, %d retried, %d cancelled, "
        "%d returned to the queue",
        stats.succeeded,
        stats.failed,
        stats.retried,
        stats.cancelled,
        stats.released,
    )
    return EXIT_OK


async def _cmd_migrate(args: argparse.Namespace) -> int:
    app = _app_for(args)
    from . import _migrations

    with _explained(app, args):
        app.dsn = await app._resolve_dsn()
        with translate_errors("connecting to Postgres"):
            conn = await asyncpg.connect(app.dsn, **app._connect_args("taskq-migrate"))
    try:
        with translate_errors("migrating"):
            if args.dry_run:
                sys.stdout.write(await _migrations.pending_sql(conn, app.schema))
                return EXIT_OK
            applied = await _migrations.migrate(conn, app.schema)
    finally:
        await conn.close()
    if applied:
        print(f"applied migration(s) {', '.join(map(str, applied))} to schema {app.schema!r}")
    else:
        print(f"schema {app.schema!r} is up to date")
    return EXIT_OK


# -- status ----------------------------------------------------------------------------

_STATUS_COLUMNS = ["queued", "scheduled", "running", "succeeded", "failed", "cancelled"]


def _status_lines(report: _admin.StatusReport) -> list[str]:
    lines: list[str] = []
    if report.queues:
        lines += _table(
            ["queue", "state", *_STATUS_COLUMNS],
            [
                [q.name, "paused" if q.paused else "active"]
                + [f"{getattr(q, c):,}" for c in _STATUS_COLUMNS]
                for q in report.queues
            ],
            right=range(2, 2 + len(_STATUS_COLUMNS)),
        )
    else:
        lines.append("no jobs")
    lines.append("")
    if report.workers:
        lines.append(f"{_plural(len(report.workers), 'worker')}:")
        lines += _table(
            ["worker", "host", "pid", "concurrency", "running", "queues", "heartbeat"],
            [
                [
                    w.id,
                    w.hostname,
                    str(w.pid),
                    str(w.concurrency),
                    str(w.running),
                    "all" if w.queues is None else ",".join(w.queues),
                    f"{_age(w.heartbeat_age)} ago",
                ]
                for w in report.workers
            ],
            right=(2, 3, 4),
        )
    else:
        lines.append("no live workers")
    return lines


def _status_header(report: _admin.StatusReport) -> str:
    window = (
        "finished: all history"
        if report.window is None
        else f"finished: last {_describe_seconds(report.window)}"
    )
    return f"taskq status  schema {report.schema!r}  {_when(report.time)} UTC  {window}"


async def _cmd_status(args: argparse.Namespace) -> int:
    app = _app_for(args)
    window = args.window
    if window is _KEEP:
        window = None if args.watch is None else DEFAULT_WATCH_WINDOW
    async with _opened(app, args):
        if args.watch is None:
            report = await _admin.status(app, window=window)
            if args.json:
                _print_json(report.to_dict())
                return EXIT_OK
            if window is not None:
                print(_status_header(report))
            print("\n".join(_status_lines(report)))
            return EXIT_OK
        return await _watch_status(app, args.watch, window, as_json=args.json)


async def _watch_status(app: App, interval: float, window: float | None, *, as_json: bool) -> int:
    """Print a status frame every ``interval`` seconds until SIGINT or SIGTERM (exit 0)."""
    loop = asyncio.get_running_loop()
    tty = sys.stdout.isatty() and not as_json
    stops = (signal.SIGINT, signal.SIGTERM)
    with anyio.CancelScope() as scope:
        # Ctrl-C or SIGTERM is how a watch ends: stop at once, even in the
        # middle of a query, and exit 0.
        for sig in stops:
            loop.add_signal_handler(sig, scope.cancel)
        try:
            if tty:
                sys.stdout.write("\x1b[2J")
            while True:
                report = await _admin.status(app, window=window)
                if as_json:
                    _print_json(report.to_dict())
                elif tty:
                    # Redraw in place: home, each line cleared to its end, then
                    # the rest of the screen cleared (no flicker).
                    lines = [
                        f"{_status_header(report)}  (every {interval:g}s, Ctrl-C to stop)",
                        "",
                        *_status_lines(report),
                    ]
                    sys.stdout.write("\x1b[H" + "".join(f"{ln}\x1b[K\n" for ln in lines) + "\x1b[J")
                    sys.stdout.flush()
                else:
                    print(_status_header(report))
                    print("\n".join(_status_lines(report)) + "\n", flush=True)
                await anyio.sleep(interval)
        finally:
            for sig in stops:
                loop.remove_signal_handler(sig)
    return EXIT_OK


# -- jobs ------------------------------------------------------------------------------


def _short_error(error: dict[str, Any] | None, width: int = 60) -> str:
    if not error:
        return ""
    text = f"{error.get('type')}: {error.get('message')}".replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def _short_name(task: str) -> str:
    """``store`` for ``gjobs.store``: the part after the last dot."""
    return task.rpartition(".")[2]


async def _resolve_task(app: App, name: str) -> str:
    """The full task name that ``name`` means: itself, or a unique short name.

    Raises UsageError with a suggestion when no known task matches, or when
    a short name fits several tasks.
    """
    known = await _admin.known_tasks(app)
    if name in known:
        return name
    matches = [k for k in known if _short_name(k) == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(
            f"{_plural(len(matches), 'task')} are named {name!r} in schema {app.schema!r}: "
            f"{', '.join(map(repr, matches))}; give the full name"
        )
    # A task that only finished jobs remember (e.g. cancelled before any
    # worker ran it) is in neither list; history is asked about it last.
    if await _admin.task_in_history(app, name):
        return name
    raise UsageError(_no_such_task(app, name, known))


def _no_such_task(app: App, name: str, known: list[str]) -> str:
    message = f"no task named {name!r} in schema {app.schema!r}"
    by_short: dict[str, list[str]] = {}
    for task in known:
        by_short.setdefault(_short_name(task), []).append(task)
    # The closest full or short name; a short name stands for every task it ends.
    close = difflib.get_close_matches(name, [*known, *by_short], n=1)
    guesses = list(
        dict.fromkeys(
            full for c in close for full in ([c] if c in known else []) + by_short.get(c, [])
        )
    )
    if guesses:
        return f"{message}; did you mean {' or '.join(map(repr, guesses))}?"
    if known:
        shown = ", ".join(map(repr, known[:10])) + (", ..." if len(known) > 10 else "")
        return f"{message} (known tasks: {shown})"
    return f"{message} (no worker has registered a task there yet)"


async def _cmd_jobs_list(args: argparse.Namespace) -> int:
    app = _app_for(args)
    states = args.state or list(_admin.ALL_STATES)
    async with _opened(app, args):
        task = None if args.task is None else await _resolve_task(app, args.task)
        jobs = await _admin.list_jobs(
            app, states=states, queue=args.queue, task=task, limit=args.limit
        )
    if args.json:
        _print_json([j.to_dict() for j in jobs])
        return EXIT_OK
    if not jobs:
        print("no jobs")
        return EXIT_OK
    rows = []
    for j in jobs:
        s = j.status
        rows.append(
            [
                str(s.id),
                str(s.state),
                s.queue,
                s.task,
                f"{s.attempts}/{s.max_attempts}",
                _when(s.enqueued_at),
                _when(s.finished_at) if s.state.finished else "-",
                _short_error(s.error),
            ]
        )
    _print_table(
        ["id", "state", "queue", "task", "attempts", "enqueued", "finished", "error"],
        rows,
        right=(0,),
    )
    return EXIT_OK


async def _cmd_jobs_show(args: argparse.Namespace) -> int:
    app = _app_for(args)
    async with _opened(app, args):
        detail = await _admin.get_job(app, args.id)
    if args.json:
        _print_json(detail.to_dict())
        return EXIT_OK
    s = detail.status
    state = str(s.state)
    if detail.cancel_requested:
        state += " (cancel requested)"
    fields = [
        ("state", state),
        ("task", s.task),
        ("queue", s.queue),
        ("priority", str(s.priority)),
        ("attempts", f"{s.attempts} of {s.max_attempts}"),
        ("rescues", str(detail.rescues)),
        ("args", _json_text(s.args)),
        ("unique key", s.unique_key or "-"),
        ("meta", _json_text(s.meta) if s.meta else "-"),
        ("enqueued at", _iso(s.enqueued_at)),
        ("run at", _iso(s.run_at)),
        ("started at", _iso(s.started_at)),
        ("finished at", _iso(s.finished_at)),
        ("worker", s.worker_id or "-"),
    ]
    if s.state.finished:
        fields.append(("result", _json_text(s.result) if s.state == "succeeded" else "-"))
    if s.error:
        fields.append(("error", f"{s.error.get('type')}: {s.error.get('message')}"))
    print(f"job {s.id}")
    for name, value in fields:
        print(f"  {name:<12} {value}")
    traceback = (s.error or {}).get("traceback")
    if traceback:
        print("  traceback:")
        for line in str(traceback).rstrip("\n").splitlines():
            print(f"    {line}")
    return EXIT_OK


def _iso(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat()


# -- retry -----------------------------------------------------------------------------


async def _cmd_retry(args: argparse.Namespace) -> int:
    bulk = args.all or args.queue is not None or args.task is not None
    if args.ids and bulk:
        raise UsageError("give job ids, or --all / --queue / --task, not both")
    if not args.ids and not bulk:
        raise UsageError("retry needs job ids, --all, or --queue/--task")
    if args.all and (args.queue is not None or args.task is not None):
        raise UsageError("--all takes no --queue or --task (they narrow the selection)")
    # Named jobs: failed or cancelled, like Job.retry(); a bulk retry takes
    # failed jobs (dead letters) unless --state says otherwise.
    states = list(dict.fromkeys(args.state or ([] if bulk else _admin.RETRYABLE_STATES)))
    states = states or ["failed"]
    app = _app_for(args)
    async with _opened(app, args):
        if args.ids:
            return await _retry_ids(app, args, states)
        return await _retry_bulk(app, args, states)


async def _retry_ids(app: App, args: argparse.Namespace, states: list[str]) -> int:
    if args.dry_run:
        matched = await _admin.count_retry(app, ids=args.ids, states=states)
        return _dry_run_retry(args, matched, f"of the {_plural(len(set(args.ids)), 'named job')}")
    progress = _Progress("retrying")
    try:
        result = await _admin.retry_ids(app, args.ids, states=states, progress=progress)
    finally:
        progress.close()
    if args.json:
        _print_json({"matched": len(result.retried) + len(result.key_held), **result.to_dict()})
    else:
        _retry_summary(result)
        for job_id, state in result.skipped.items():
            print(
                f"job {job_id}: not retried: its state is {state} "
                f"(retry takes {' or '.join(states)} jobs)"
            )
        _not_found(app, result.not_found)
    return EXIT_NOT_FOUND if result.not_found else EXIT_OK


async def _retry_bulk(app: App, args: argparse.Namespace, states: list[str]) -> int:
    matched = await _admin.count_retry(app, states=states, queue=args.queue, task=args.task)
    what = f"{'/'.join(states)} jobs{_scope(args.queue, args.task)}"
    if args.dry_run:
        return _dry_run_retry(args, matched, what)
    if not matched.count:
        if args.json:
            _print_json({"matched": 0, **_admin.RetryResult().to_dict()})
        else:
            print(f"no {what} to retry")
        return EXIT_OK
    progress = _Progress("retrying")
    try:
        result = await _admin.retry_matching(
            app,
            states=states,
            queue=args.queue,
            task=args.task,
            last_id=matched.last_id,
            total=matched.count,
            progress=progress,
        )
    finally:
        progress.close()
    if args.json:
        _print_json({"matched": len(result.retried) + len(result.key_held), **result.to_dict()})
    else:
        _retry_summary(result)
    return EXIT_OK


def _dry_run_retry(args: argparse.Namespace, matched: _admin.Matched, what: str) -> int:
    if args.json:
        _print_json({"dry_run": True, "matched": matched.count, "key_held": matched.key_held})
        return EXIT_OK
    print(f"would retry {_plural(matched.count, 'job')} ({what})")
    if matched.key_held:
        print(
            f"{_plural(matched.key_held, 'job')} of them would stay in history: their unique "
            "key is held by a live job (or by another of the jobs retried)"
        )
    return EXIT_OK


def _retry_summary(result: _admin.RetryResult) -> None:
    print(f"retried {_plural(len(result.retried), 'job')}")
    if result.key_held:
        held = ", ".join(map(str, result.key_held[:20]))
        more = " ..." if len(result.key_held) > 20 else ""
        print(
            f"not retried: {_plural(len(result.key_held), 'job')} whose unique key a live job "
            f"holds (they stay in history): {held}{more}"
        )


# -- cancel ----------------------------------------------------------------------------


async def _cmd_cancel(args: argparse.Namespace) -> int:
    bulk = args.queue is not None or args.task is not None
    if args.ids and bulk:
        raise UsageError("give job ids, or --queue / --task, not both")
    if not args.ids and not bulk:
        raise UsageError("cancel needs job ids, or --queue and/or --task")
    if args.ids and args.state:
        raise UsageError(
            "--state applies to --queue / --task; named jobs are cancelled as they are"
        )
    states = list(dict.fromkeys(args.state or _admin.LIVE_STATES))
    app = _app_for(args)
    async with _opened(app, args):
        if args.dry_run:
            matched = await _admin.count_cancel(
                app,
                ids=args.ids or None,
                queue=args.queue,
                task=args.task,
                states=states,
            )
            if args.json:
                _print_json({"dry_run": True, "queued": matched.queued, "running": matched.running})
            else:
                print(
                    f"would cancel {_plural(matched.queued, 'queued job')} and ask the workers "
                    f"of {_plural(matched.running, 'running job')} to stop them"
                )
            return EXIT_OK
        if args.ids:
            result = await _admin.cancel_ids(app, args.ids)
        else:
            progress = _Progress("cancelling")
            try:
                result = await _admin.cancel_matching(
                    app, queue=args.queue, task=args.task, states=states, progress=progress
                )
            finally:
                progress.close()
    if args.json:
        _print_json(result.to_dict())
    else:
        print(
            f"cancelled {_plural(len(result.cancelled), 'queued job')}; asked the workers of "
            f"{_plural(len(result.requested), 'running job')} to stop them"
        )
        for job_id, state in result.finished.items():
            print(f"job {job_id}: not cancelled: it has already finished ({state})")
        _not_found(app, result.not_found)
    return EXIT_NOT_FOUND if result.not_found else EXIT_OK


# -- purge -----------------------------------------------------------------------------


def _confirm(question: str) -> bool:
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


async def _cmd_purge(args: argparse.Namespace) -> int:
    states = list(dict.fromkeys(args.state or ["succeeded", "cancelled"]))
    risky = []
    if args.older_than is None:
        risky.append("of any age (no --older-than)")
    if "failed" in states:
        risky.append("including failed jobs (dead letters)")
    interactive = sys.stdin.isatty()
    if risky and not args.yes and not args.dry_run and not interactive:
        # CI and scripts: never wait on a prompt nobody can answer.
        raise UsageError(
            f"purge would delete {'/'.join(states)} jobs {', '.join(risky)}: add --yes to "
            "confirm (stdin is not a terminal, so taskq does not ask); nothing deleted"
        )
    app = _app_for(args)
    async with _opened(app, args):
        cutoff = await _admin.purge_cutoff(app, args.older_than)
        matched = await _admin.count_purge(app, states=states, finished_before=cutoff)
        what = f"{'/'.join(states)} jobs" + (
            "" if cutoff is None else f" finished before {_when(cutoff)} UTC"
        )
        if args.dry_run:
            if args.json:
                _print_json({"dry_run": True, "matched": matched.count})
            else:
                print(f"would delete {_plural(matched.count, 'job')} ({what})")
            return EXIT_OK
        if not matched.count:
            if args.json:
                _print_json({"deleted": 0})
            else:
                print(f"no {what} to delete")
            return EXIT_OK
        if risky and not args.yes:
            question = f"Delete {_plural(matched.count, 'job')} ({what})? This cannot be undone."
            if not await anyio.to_thread.run_sync(_confirm, question):
                print("taskq: error: not confirmed; nothing deleted", file=sys.stderr)
                return EXIT_ERROR
        progress = _Progress("deleting")
        try:
            deleted = await _admin.purge(
                app,
                states=states,
                finished_before=cutoff,
                last_id=matched.last_id,
                total=matched.count,
                progress=progress,
            )
        finally:
            progress.close()
    if args.json:
        _print_json({"deleted": deleted})
    else:
        print(f"deleted {_plural(deleted, 'job')} ({what})")
    return EXIT_OK


# -- queues, cron ----------------------------------------------------------------------


async def _cmd_queues(args: argparse.Namespace) -> int:
    if args.action in ("pause", "resume", "set") and not args.name:
        raise UsageError(f"queues {args.action} needs a queue name")
    if args.action == "list" and args.name:
        raise UsageError(f"unknown queues action {args.name!r}")
    changes: dict[str, Any] = {}
    if args.action == "set":
        if args.concurrency_limit is not _KEEP:
            changes["concurrency_limit"] = args.concurrency_limit
        if args.rate_limit is not _KEEP:
            rate = args.rate_limit
            changes["rate_limit"] = None if rate.lower() == "none" else rate
        if not changes:
            raise UsageError("queues set needs --concurrency-limit and/or --rate-limit")
    app = _app_for(args)
    async with _opened(app, args):
        if args.action in ("pause", "resume", "set"):
            queue = app.queue(args.name)
            if args.action == "pause":
                await queue.pause()
            elif args.action == "resume":
                await queue.resume()
            else:
                await queue.configure(**changes)
            infos = [await queue.info()]
        else:
            infos = await app.queues()
    if args.json:
        _print_json(
            [
                {
                    "name": i.name,
                    "paused": i.paused,
                    "concurrency_limit": i.concurrency_limit,
                    "rate_limit": None if i.rate_limit is None else str(i.rate_limit),
                    "queued": i.queued,
                    "running": i.running,
                }
                for i in infos
            ]
        )
        return EXIT_OK
    if not infos:
        print("no queues")
        return EXIT_OK
    _print_table(
        ["queue", "state", "queued", "running", "concurrency limit", "rate limit"],
        [
            [
                i.name,
                "paused" if i.paused else "active",
                str(i.queued),
                str(i.running),
                "-" if i.concurrency_limit is None else str(i.concurrency_limit),
                "-" if i.rate_limit is None else str(i.rate_limit),
            ]
            for i in infos
        ],
    )
    return EXIT_OK


async def _cmd_cron(args: argparse.Namespace) -> int:
    from ._cron import CronEntry
    from ._errors import ConfigurationError

    app = _app_for(args)
    async with _opened(app, args), app._acquire("listing cron entries") as conn:
        rows = await app._store.list_crons(conn)
    now = datetime.now(UTC)
    entries = []
    for r in rows:
        try:
            entry = CronEntry(r["name"], r["expression"], r["task"], timezone=r["timezone"])
            upcoming = entry.next_after(now)
            next_run = None if upcoming is None else upcoming.astimezone(entry.zone)
        except ConfigurationError:
            next_run = None
        entries.append(
            {
                "name": r["name"],
                "expression": r["expression"],
                "timezone": r["timezone"],
                "task": r["task"],
                "queue": r["queue"],
                "missed": r["missed"],
                "last_slot": r["last_slot"].isoformat(),
                "last_job_id": r["last_job_id"],
                "next_run": None if next_run is None else next_run.isoformat(),
                "registered_at": r["registered_at"].isoformat(),
            }
        )
    if args.json:
        _print_json(entries)
        return EXIT_OK
    if not entries:
        print("no cron entries (workers record theirs when they start)")
        return EXIT_OK
    _print_table(
        ["name", "schedule", "timezone", "task", "queue", "next run", "last job"],
        [
            [
                e["name"],
                e["expression"],
                e["timezone"],
                e["task"],
                e["queue"],
                e["next_run"] or "never",
                "-" if e["last_job_id"] is None else str(e["last_job_id"]),
            ]
            for e in entries
        ],
    )
    return EXIT_OK


# -- demo, embedded --------------------------------------------------------------------


async def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return await run_demo(dsn=args.dsn, jobs=args.jobs, concurrency=args.concurrency)


async def _cmd_embedded(args: argparse.Namespace) -> int:
    from . import _embedded

    data_dir = _embedded._default_data_dir()
    if args.action == "stop":
        if not (data_dir / "PG_VERSION").exists():
            print(f"no embedded Postgres in {data_dir}")
            return EXIT_OK
        server = _embedded.EmbeddedServer(
            dsn="",
            data_dir=data_dir,
            log_file=data_dir / "server.log",
            bin_dir=_embedded._bin_dir_for((data_dir / "PG_VERSION").read_text().strip()),
            started=False,
        )
        server.stop()
        print(f"stopped the embedded Postgres in {data_dir}")
        return EXIT_OK
    server = _embedded.ensure_server(data_dir)
    print(f"embedded Postgres {'started' if server.started else 'running'}")
    print(f"  data: {server.data_dir}")
    print(f"  log:  {server.log_file}")
    print(f"  dsn:  {server.dsn}")
    return EXIT_OK


# -- the parser ------------------------------------------------------------------------


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def db_options(p: argparse.ArgumentParser, *, with_app: bool = True) -> None:
        p.add_argument(
            "--dsn", help="Postgres DSN (default: $TASKQ_DSN, else the embedded Postgres)"
        )
        if with_app:
            p.add_argument("--app", help="MODULE:APP to take the DSN and schema from")
        p.add_argument(
            "--schema", help=f"taskq schema (default: $TASKQ_SCHEMA, else {DEFAULT_SCHEMA})"
        )
        connect_timeout_option(p)

    def connect_timeout_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--connect-timeout",
            type=_positive_float,
            metavar="SECONDS",
            help="give up on a database that does not answer a new connection after this "
            f"long (default: the App's, else {DEFAULT_CONNECT_TIMEOUT:g})",
        )

    def json_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON for scripts")

    worker = sub.add_parser("worker", help="run a worker process")
    worker.add_argument(
        "app", metavar="MODULE:APP", help="where your taskq.App lives, e.g. jobs:app"
    )
    worker.add_argument(
        "--queue", "-q", action="append", help="queue to serve (repeatable; default all)"
    )
    worker.add_argument(
        "--concurrency", "-c", type=int, default=10, help="jobs at once (default 10)"
    )
    worker.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds running jobs get to finish on SIGTERM (default 30)",
    )
    worker.add_argument(
        "--lease-seconds",
        type=float,
        help="lease of a claimed job, renewed every third of it; a crashed worker's jobs "
        "run again about 1.5 leases later (default 30)",
    )
    worker.add_argument(
        "--poll-interval",
        type=float,
        help="seconds between fallback polls when no notification arrives (default 2)",
    )
    worker.add_argument(
        "--no-cron", action="store_true", help="do not run the App's cron entries in this worker"
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port at /metrics (needs taskq-pg[metrics])",
    )
    worker.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        metavar="ADDR",
        help="address the metrics server listens on (default 127.0.0.1; 0.0.0.0 for all)",
    )
    worker.add_argument("--dsn", help="override the App's DSN")
    connect_timeout_option(worker)
    worker.set_defaults(handler=_cmd_worker)

    migrate = sub.add_parser("migrate", help="create or upgrade the taskq schema")
    db_options(migrate)
    migrate.add_argument(
        "--dry-run", action="store_true", help="print the SQL instead of running it"
    )
    migrate.set_defaults(handler=_cmd_migrate)

    status = sub.add_parser("status", help="job counts by queue and state, and the live workers")
    status.add_argument(
        "--watch",
        nargs="?",
        type=_positive_float,
        const=DEFAULT_WATCH_SECONDS,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C",
    )
    status.add_argument(
        "--window",
        type=_window_arg,
        default=_KEEP,
        metavar="DURATION|all",
        help="count finished jobs of this recent window only, e.g. 15m "
        "(default: all of history; with --watch: 1m)",
    )
    json_option(status)
    db_options(status)
    status.set_defaults(handler=_cmd_status)

    jobs = sub.add_parser("jobs", help="list jobs, or show one in full")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    jobs_list = jobs_sub.add_parser("list", help="live and finished jobs, newest first")
    jobs_list.add_argument(
        "--state",
        action="append",
        choices=_admin.ALL_STATES,
        help="only jobs in this state (repeatable; default all)",
    )
    jobs_list.add_argument("--queue", help="only jobs of this queue")
    jobs_list.add_argument(
        "--task",
        help="only jobs of this task: its full name, or the part after the last dot when "
        "only one known task ends with it (e.g. store for myapp.jobs.store)",
    )
    jobs_list.add_argument(
        "--limit", type=_positive_int, default=50, help="most jobs listed (default 50)"
    )
    json_option(jobs_list)
    db_options(jobs_list)
    jobs_list.set_defaults(handler=_cmd_jobs_list)
    jobs_show = jobs_sub.add_parser("show", help="one job: args, attempts, error, result, meta")
    jobs_show.add_argument("id", type=_positive_int, help="the job id")
    json_option(jobs_show)
    db_options(jobs_show)
    jobs_show.set_defaults(handler=_cmd_jobs_show)

    retry = sub.add_parser(
        "retry",
        help="run failed (or cancelled) jobs again with a fresh attempt budget",
        description="retry ID [ID ...] | retry --all | retry [--queue Q] [--task T]",
    )
    retry.add_argument("ids", nargs="*", type=_positive_int, metavar="ID", help="job ids")
    retry.add_argument("--all", action="store_true", help="every failed job")
    retry.add_argument("--queue", help="failed jobs of this queue")
    retry.add_argument("--task", help="failed jobs of this task")
    retry.add_argument(
        "--state",
        action="append",
        choices=_admin.RETRYABLE_STATES,
        help="which finished jobs to take (repeatable; default: failed, "
        "or failed and cancelled for named ids)",
    )
    retry.add_argument(
        "--dry-run", action="store_true", help="print how many jobs would be retried"
    )
    json_option(retry)
    db_options(retry)
    retry.set_defaults(handler=_cmd_retry)

    cancel = sub.add_parser(
        "cancel",
        help="cancel queued jobs and stop running ones",
        description="cancel ID [ID ...] | cancel [--queue Q] [--task T] [--state queued|running]",
    )
    cancel.add_argument("ids", nargs="*", type=_positive_int, metavar="ID", help="job ids")
    cancel.add_argument("--queue", help="live jobs of this queue")
    cancel.add_argument("--task", help="live jobs of this task")
    cancel.add_argument(
        "--state",
        action="append",
        choices=_admin.LIVE_STATES,
        help="only queued or only running jobs (repeatable; default both)",
    )
    cancel.add_argument(
        "--dry-run", action="store_true", help="print how many jobs would be cancelled"
    )
    json_option(cancel)
    db_options(cancel)
    cancel.set_defaults(handler=_cmd_cancel)

    purge = sub.add_parser(
        "purge",
        help="delete finished jobs from history",
        description="Delete finished jobs (default: succeeded and cancelled) from history. "
        "Without --older-than, or with --state failed, it needs --yes.",
    )
    purge.add_argument(
        "--older-than",
        type=parse_duration,
        metavar="DURATION",
        help="only jobs that finished longer ago than this, e.g. 7d, 12h, 30m",
    )
    purge.add_argument(
        "--state",
        action="append",
        choices=_admin.FINISHED_STATES,
        help="which finished jobs (repeatable; default succeeded and cancelled)",
    )
    purge.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="confirm deleting without --older-than or failed jobs",
    )
    purge.add_argument("--dry-run", action="store_true", help="print how many would be deleted")
    json_option(purge)
    db_options(purge)
    purge.set_defaults(handler=_cmd_purge)

    queues = sub.add_parser(
        "queues",
        help="list queues, pause or resume one, set its cluster-wide limits",
        description="queues [list] | queues pause NAME | queues resume NAME | "
        "queues set NAME [--concurrency-limit N|none] [--rate-limit 50/second|none]",
    )
    queues.add_argument(
        "action", nargs="?", default="list", choices=["list", "pause", "resume", "set"]
    )
    queues.add_argument("name", nargs="?", help="the queue (for pause, resume and set)")
    queues.add_argument(
        "--concurrency-limit",
        type=_limit_arg,
        default=_KEEP,
        metavar="N|none",
        help="most jobs of the queue running at once across all workers",
    )
    queues.add_argument(
        "--rate-limit",
        default=_KEEP,
        metavar="RATE|none",
        help="most job starts per period across all workers, e.g. 100/minute",
    )
    json_option(queues)
    db_options(queues)
    queues.set_defaults(handler=_cmd_queues)

    cron = sub.add_parser("cron", help="cron entries recorded by workers, with their next run")
    json_option(cron)
    db_options(cron)
    cron.set_defaults(handler=_cmd_cron)

    demo = sub.add_parser("demo", help="run sample jobs (with failures and retries) on a worker")
    demo.add_argument(
        "--dsn", help="Postgres DSN (default: $TASKQ_DSN, else the embedded Postgres)"
    )
    demo.add_argument("--jobs", type=int, default=500, help="how many sample jobs (default 500)")
    demo.add_argument("--concurrency", type=int, default=20)
    demo.set_defaults(handler=_cmd_demo)
    embedded = sub.add_parser(
        "embedded", help="the local Postgres used when no DSN is given: start it, or stop it"
    )
    embedded.add_argument("action", choices=["start", "stop"])
    embedded.set_defaults(handler=_cmd_embedded)
    return parser


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
        print(f"taskq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except JobNotFound as exc:
        print(f"taskq: error: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except TaskqError as exc:
        print(f"taskq: error: {exc}", file=sys.stderr)
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
        print(
            f"taskq: error: unexpected {type(exc).__name__}: {exc} "
            "(run with --log-level DEBUG for the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR
