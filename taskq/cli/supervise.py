"""``worker --processes N`` and ``--autoscale MIN:MAX``: the options and the children's command.

Each child is ``python -m taskq worker`` with the parent's own options (all
but these two), so a child is exactly the worker one would start by hand.
The supervisor imports the App only to fail early on a bad ``MODULE:APP``
and to find its DSN; it never opens it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .._database import DSN_ENV
from .connect import load_app
from .exits import UsageError
from .supervisor import Supervisor, Timings

log = logging.getLogger("taskq.supervisor")

#: Options of the supervisor, not passed on to the children.
SUPERVISOR_OPTIONS = frozenset({"processes", "autoscale"})
#: What the namespace holds besides the worker's options.
_NOT_PASSED = SUPERVISOR_OPTIONS | {
    "app", "command", "handler", "log_level", "log_format", "worker_parser",
}  # fmt: skip


def processes_arg(text: str) -> int:
    """A number of processes above 0, or ``auto``: the number of cores."""
    if text.strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number above 0 or 'auto', got {text!r}")
    return value


def autoscale_arg(text: str) -> tuple[int, int]:
    """``MIN:MAX`` with 1 <= MIN <= MAX."""
    low, sep, high = text.partition(":")
    try:
        bounds = (int(low), int(high)) if sep else (0, 0)
    except ValueError:
        bounds = (0, 0)
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return bounds


def add_options(worker: argparse.ArgumentParser) -> None:
    """The two options, on the worker's parser."""
    worker.add_argument(
        "--processes",
        "-p",
        type=processes_arg,
        metavar="N|auto",
        help="run N worker processes under a supervisor that restarts them "
        "(auto: one per core; default 1, no supervisor)",
    )
    worker.add_argument(
        "--autoscale",
        type=autoscale_arg,
        metavar="MIN:MAX",
        help="run MIN to MAX worker processes: more while jobs wait and the CPU is idle, "
        "fewer (each drained, never killed) after a quiet period",
    )


def child_argv(args: argparse.Namespace, index: int) -> list[str]:
    """``python -m taskq ... worker ...`` for child ``index``: the parent's options.

    Every ``worker`` option is ``--`` and its name (tests/test_supervisor.py
    checks that each one reaches the children), so one added later is passed
    on without a change here. ``--metrics-port P`` becomes ``P + index``:
    children cannot share a port.
    """
    argv = [sys.executable, "-m", "taskq"]
    if args.log_level:
        argv += ["--log-level", args.log_level]
    if args.log_format != "text":
        argv += ["--log-format", args.log_format]
    argv += ["worker", args.app]
    for dest, value in sorted(vars(args).items()):
        if dest in _NOT_PASSED or value is None or value is False:
            continue
        flag = "--" + dest.replace("_", "-")
        if dest == "metrics_port":
            value += index
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


async def supervise(args: argparse.Namespace) -> int:
    """Run the children of ``--processes``/``--autoscale``; the exit status."""
    if args.processes is not None and args.autoscale is not None:
        raise UsageError("give --processes or --autoscale, not both")
    # Imported, never opened: a bad MODULE:APP fails here once, not in a
    # loop of children, and the App says where its database is.
    app = load_app(args.app)
    if args.dsn:
        app.database.dsn_arg = args.dsn
    env = dict(os.environ)
    # Children find the same server (with no DSN anywhere: the embedded
    # Postgres, started once here rather than raced by every child).
    dsn = await app.database.resolve_dsn()
    if not args.dsn and not app.database.dsn_arg:
        env[DSN_ENV] = dsn
    count = args.processes if args.autoscale is None else args.autoscale[0]
    if args.metrics_port is not None:
        top = count if args.autoscale is None else args.autoscale[1]
        log.info(
            "worker children serve metrics on ports %d to %d (child i on %d + i)",
            args.metrics_port,
            args.metrics_port + top - 1,
            args.metrics_port,
        )
    timings = Timings.from_env()
    supervisor = Supervisor(lambda i: child_argv(args, i), count, env=env, timings=timings)
    log.info(
        "supervisor (pid %d) starting %d worker child(ren)%s",
        os.getpid(),
        count,
        "" if args.autoscale is None else f", autoscaling {args.autoscale[0]}:{args.autoscale[1]}",
    )
    if args.autoscale is None:
        return await supervisor.run()
    from .autoscale import Autoscaler

    async with Autoscaler(
        supervisor,
        dsn,
        app.schema,
        args.queue,
        low=args.autoscale[0],
        high=args.autoscale[1],
        concurrency=args.concurrency,
        connect_args=app.database.connect_args("taskq supervisor"),
    ) as scaler:
        return await supervisor.run(scaler.tick)
