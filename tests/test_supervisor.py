"""`python -m taskq worker --processes N`: real supervisor and child processes, real signals.

Jobs (tests/supervisorapp.py) write ledger rows with the pid that ran them, so
which child ran what, and whether anything ran twice or was cut short, can be
counted whatever happened to a process.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import taskq
from taskq.cli import EXIT_USAGE, build_parser, main
from taskq.cli.supervise import SUPERVISOR_OPTIONS, child_argv

from .conftest import PYTHON, subprocess_env, until
from .supervisorapp import LEDGER_SQL
from .worker_process import WorkerProcess

# Every schema here is opened (and so migrated) by the test's App before any worker starts.
pytestmark = [pytest.mark.anyio, pytest.mark.migrated_schema]

# Short clocks so that a test waits seconds, not minutes.
TIMINGS = "backoff_min=0.2,backoff_max=0.8,stable_seconds=60"
LEASE = "2"


@pytest.fixture
def supervised(tmp_path: Path, pg_dsn: str, schema: str) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*options: str, **env: str) -> WorkerProcess:
        env.setdefault("TASKQ_SUPERVISOR_TIMINGS", TIMINGS)
        w = WorkerProcess(
            pg_dsn,
            schema,
            "supervisorapp:app",
            tmp_path / f"supervisor{len(started)}.log",
            *options,
            **env,
        )
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


async def prepare(dsn: str, schema: str) -> taskq.App:
    app = taskq.App(dsn, schema=schema)
    app.task(name="sup.work", retry=taskq.Retry(attempts=5, wait=0))(lambda n, seconds=0: n)
    await app.open()
    async with app.pool.acquire() as c:
        await c.execute(LEDGER_SQL.format(schema=f'"{schema}"'))
    return app


async def val(app: taskq.App, sql: str, *args: Any) -> Any:
    async with app.pool.acquire() as c:
        return await c.fetchval(sql.replace("{s}", f'"{app.schema}"'), *args)


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(") ", 1)[1].split()[1])


async def children(app: taskq.App, supervisor: int) -> dict[int, str]:
    """pid -> worker id of the live workers that are children of ``supervisor``."""
    async with app.pool.acquire() as c:
        rows = await c.fetch(f'SELECT id, pid FROM "{app.schema}".workers')
    return {r["pid"]: r["id"] for r in rows if parent_of(r["pid"]) == supervisor}


def slot(text: str, pid: int) -> str:
    """The slot a child was started in, from the supervisor's log."""
    (index,) = re.findall(rf"started worker child (\d+) \(pid {pid}\)", text)
    return str(index)


def test_children_get_every_option_but_the_supervisors() -> None:
    parser = build_parser()
    argv = [
        "--log-level=debug",
        "--log-format=json",
        "worker",
        "some.module:app",
        "-q",
        "a",
        "--queue",
        "b",
        "-c",
        "3",
        "--shutdown-timeout",
        "7.5",
        "--lease-seconds",
        "4",
        "--poll-interval",
        "0.5",
        "--no-cron",
        "--metrics-port",
        "9100",
        "--metrics-addr",
        "0.0.0.0",
        "--process-pool-size",
        "2",
        "--max-jobs-per-process",
        "50",
        "--dsn",
        "postgresql://x@y/z",
        "--connect-timeout",
        "3",
        "--connect-retry",
        "0",
        "--processes",
        "3",
    ]
    args = parser.parse_args(argv)
    (worker_parser,) = [a.choices["worker"] for a in parser._actions if isinstance(a.choices, dict)]
    # Every option of `worker` is given above, so a new one must be added here
    # (and is then checked to reach the children).
    actions = [a for a in worker_parser._actions if a.dest != "help"]
    given = {a.dest for a in actions}
    unset = {a.dest for a in actions if getattr(args, a.dest) in (None, a.default)}
    assert not unset - SUPERVISOR_OPTIONS, f"give these options in the test: {unset}"
    argv2 = child_argv(args, 2)
    assert argv2[:3] == [PYTHON, "-m", "taskq"]
    again = parser.parse_args(argv2[3:])
    for dest in given - SUPERVISOR_OPTIONS:
        expected = args.metrics_port + 2 if dest == "metrics_port" else getattr(args, dest)
        assert getattr(again, dest) == expected, dest
    assert again.log_level == "DEBUG" and again.log_format == "json"
    assert again.processes is None


async def test_two_processes_register_two_workers_and_share_the_jobs(
    pg_dsn: str, schema: str, supervised: Callable[..., WorkerProcess]
) -> None:
    app = await prepare(pg_dsn, schema)
    try:
        sup = supervised("--processes", "2", "--concurrency", "2")
        found = await until(
            lambda: _count(app, sup.proc.pid, 2), 60, "two children registered as workers"
        )
        ids = sorted(found.values())
        assert sorted(slot(sup.text(), pid) for pid in found) == ["0", "1"]
        # The worker id ends with the supervisor's pid and the child's slot.
        assert sorted(i.rsplit(":", 1)[1] for i in ids) == [
            f"{sup.proc.pid}/0",
            f"{sup.proc.pid}/1",
        ]
        assert sup.proc.pid not in found  # the supervisor itself runs no worker
        status = subprocess.run(
            [PYTHON, "-m", "taskq", "status", "--schema", schema],
            env=subprocess_env(pg_dsn),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "2 workers:" in status.stdout, status.stdout + status.stderr
        for worker_id in ids:
            assert worker_id in status.stdout
        await app.tasks["sup.work"].enqueue_many([{"n": n, "seconds": 0.2} for n in range(20)])
        await until(
            lambda: val(app, "SELECT count(*) = 20 FROM {s}.history WHERE state = 'succeeded'"),
            60,
            "20 jobs done",
        )
        pids = await val(app, "SELECT array_agg(DISTINCT (result::text)::int) FROM {s}.history")
        assert sorted(pids) == sorted(found), (pids, found)
        assert await val(app, "SELECT count(*) FROM {s}.ledger WHERE event = 'done'") == 20
    finally:
        await app.close()
    assert sup.stop() == 0


async def _count(app: taskq.App, supervisor: int, n: int) -> dict[int, str] | None:
    found = await children(app, supervisor)
    return found if len(found) == n else None


async def one_job_in_each_of_two(
    app: taskq.App, sup: WorkerProcess, seconds: float
) -> dict[int, str]:
    """Once both children registered, two jobs of ``seconds``, one running in each;
    the children (pid: worker id) as they were before the jobs."""
    before: dict[int, str] = await until(lambda: _count(app, sup.proc.pid, 2), 60, "two children")
    await app.tasks["sup.work"].enqueue_many([{"n": n, "seconds": seconds} for n in range(2)])
    await until(
        lambda: val(app, "SELECT count(DISTINCT pid) = 2 FROM {s}.ledger WHERE event='start'"),
        60,
        "both jobs running, one in each child",
    )
    return before


async def test_a_sigkilled_child_is_restarted_and_its_job_finishes_once(
    pg_dsn: str, schema: str, supervised: Callable[..., WorkerProcess]
) -> None:
    app = await prepare(pg_dsn, schema)
    try:
        sup = supervised(
            "--processes", "2", "--concurrency", "1", "--lease-seconds", LEASE,
            "--poll-interval", "0.5",
        )  # fmt: skip
        before = await one_job_in_each_of_two(app, sup, 2)
        victim = await val(app, "SELECT pid FROM {s}.ledger WHERE n = 0")
        assert victim in before
        os.kill(victim, signal.SIGKILL)
        sup.wait_for_output(f"(pid {victim}) was killed by SIGKILL")
        sup.wait_for_output("restarting it in 0.2 s")
        after = await until(
            lambda: _replaced(app, sup.proc.pid, before), 60, "a new child registered"
        )
        assert slot(sup.text(), after) == slot(sup.text(), victim)
        await until(
            lambda: val(app, "SELECT count(*) = 2 FROM {s}.history WHERE state = 'succeeded'"),
            60,
            "both jobs done, the killed one rescued",
        )
        assert await val(app, "SELECT count(*) FROM {s}.ledger WHERE event = 'done'") == 2
        assert await val(app, "SELECT count(*) FROM {s}.ledger WHERE event = 'done' AND n = 0") == 1
        assert await val(app, "SELECT rescues FROM {s}.history WHERE args->>'n' = '0'") == 1
        assert await val(app, "SELECT pid FROM {s}.ledger WHERE n = 0 AND event = 'done'") != victim
    finally:
        await app.close()
    assert sup.stop() == 0


async def _replaced(app: taskq.App, supervisor: int, before: dict[int, str]) -> int | None:
    new = [p for p in await children(app, supervisor) if p not in before]
    return new[0] if new else None


async def test_sigterm_lets_running_jobs_finish_and_exits_0(
    pg_dsn: str, schema: str, supervised: Callable[..., WorkerProcess]
) -> None:
    app = await prepare(pg_dsn, schema)
    try:
        sup = supervised("--processes", "2", "--concurrency", "1")
        await one_job_in_each_of_two(app, sup, 1)
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(60) == 0, sup.text()
        assert await val(app, "SELECT count(*) FROM {s}.ledger WHERE event = 'done'") == 2
        assert await val(app, "SELECT count(*) FROM {s}.ledger WHERE event = 'cancelled'") == 0
        assert await val(app, "SELECT count(*) FROM {s}.history WHERE state = 'succeeded'") == 2
        assert await val(app, "SELECT count(*) FROM {s}.workers") == 0  # both unregistered
        text = sup.text()
        assert "SIGTERM received (1)" in text
        assert text.count("exited with status 0") == 2, text
        assert "unexpectedly" not in text
    finally:
        await app.close()


RESTART = re.compile(
    r"worker child (\d+) \(pid \d+\) exited with status 1 after [\d.]+ s, unexpectedly; "
    r"restarting it in ([\d.]+) s"
)


def restarts(text: str) -> dict[str, list[float]]:
    """The logged waits before each restart, by slot."""
    waits: dict[str, list[float]] = {}
    for slot, wait in RESTART.findall(text):
        waits.setdefault(slot, []).append(float(wait))
    return waits


async def test_a_child_that_crashes_at_import_is_restarted_with_growing_backoff(
    pg_dsn: str, schema: str, supervised: Callable[..., WorkerProcess]
) -> None:
    app = await prepare(pg_dsn, schema)
    try:
        sup = supervised("--processes", "2", SUP_CRASH="1")

        async def four_each() -> bool:
            waits = restarts(sup.text())
            return len(waits) == 2 and all(len(w) >= 4 for w in waits.values())

        await until(four_each, 60, "four restarts of each child")
        text = sup.text()
        assert "crashing at import, as asked" in text
        for slot, waits in restarts(text).items():
            # Doubling from 0.2 s to the 0.8 s cap: a crash loop cannot spin.
            assert waits[:4] == [0.2, 0.4, 0.8, 0.8], (slot, waits)
            starts = text.count(f"started worker child {slot} ")
            assert len(waits) <= starts <= len(waits) + 1, (slot, starts, waits)
        assert await val(app, "SELECT count(*) FROM {s}.workers") == 0
    finally:
        await app.close()
    assert sup.stop() == 0


async def test_a_second_sigterm_forces_the_children_to_return_their_jobs(
    pg_dsn: str, schema: str, supervised: Callable[..., WorkerProcess]
) -> None:
    app = await prepare(pg_dsn, schema)
    try:
        sup = supervised("--processes", "2", "--concurrency", "1")
        await one_job_in_each_of_two(app, sup, 600)
        sup.proc.send_signal(signal.SIGTERM)
        sup.wait_for_output("SIGTERM received (1)")
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(60) == 0, sup.text()
        assert "SIGTERM received (2): forcing" in sup.text()
        assert sup.text().count("sup.work interrupted; back to the queue") == 2
        assert await val(app, "SELECT count(*) FROM {s}.ledger WHERE event = 'done'") == 0
        # Returned to the queue without using an attempt, for another worker.
        assert await val(app, "SELECT count(*) FROM {s}.jobs WHERE state = 'queued'") == 2
        assert await val(app, "SELECT count(*) FROM {s}.history") == 0
    finally:
        await app.close()


async def test_children_of_a_sigkilled_supervisor_stop_gracefully(
    pg_dsn: str, schema: str, supervised: Callable[..., WorkerProcess]
) -> None:
    app = await prepare(pg_dsn, schema)
    try:
        sup = supervised("--processes", "2")
        found = await until(lambda: _count(app, sup.proc.pid, 2), 60, "two children")
        sup.proc.send_signal(signal.SIGKILL)
        sup.proc.wait(10)
        # The kernel sends each child SIGTERM: they unregister and exit.
        await until(lambda: val(app, "SELECT count(*) = 0 FROM {s}.workers"), 60, "children gone")
        for pid in found:
            await until(lambda pid=pid: _gone(pid), 30, f"child {pid} to exit")
    finally:
        await app.close()


async def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie until reaped by init: dead all the same.
    stat = Path(f"/proc/{pid}/stat").read_text()  # noqa: ASYNC240 - a tiny procfs read
    return stat.split(") ", 1)[1].startswith("Z")


# Autoscaling with short clocks. idle_cpu=0: the CI machine's CPU is shared
# with Postgres and other tests; the CPU gate has its own test below.
AUTOSCALE = (
    TIMINGS + ",check_seconds=0.2,lag_seconds=0.5,grow_checks=2,grow_seconds=0.5,"
    "quiet_seconds=1.5,shrink_seconds=0.5,idle_cpu=0"
)
DECISION = re.compile(r"autoscale: (starting|draining) worker child")


async def test_autoscale_grows_under_a_backlog_and_drains_back_to_min(
    pg_dsn: str, schema: str, supervised: Callable[..., WorkerProcess]
) -> None:
    app = await prepare(pg_dsn, schema)
    try:
        sup = supervised(
            "--autoscale", "1:3", "--concurrency", "2", TASKQ_SUPERVISOR_TIMINGS=AUTOSCALE
        )
        await until(lambda: _count(app, sup.proc.pid, 1), 60, "one child")
        await app.tasks["sup.work"].enqueue_many([{"n": n, "seconds": 1} for n in range(30)])
        await until(lambda: _count(app, sup.proc.pid, 3), 60, "three children under the backlog")
        text = sup.text()
        assert "autoscale: starting worker child 1 (1 -> 2: the job next in queue" in text
        assert "autoscale: starting worker child 2 (2 -> 3:" in text
        await until(
            lambda: val(app, "SELECT count(*) = 30 FROM {s}.history WHERE state = 'succeeded'"),
            60,
            "the backlog done",
        )
        await until(lambda: _count(app, sup.proc.pid, 1), 60, "back to one child")
        await until(
            lambda: _logged(sup, "worker child 1 (pid", "exited with status 0"), 30, "drained"
        )
        text = sup.text()
        assert "autoscale: draining worker child 2" in text
        assert re.search(r"draining worker child 2 \(pid \d+\): 3 -> 2: no job waited", text)
        assert re.search(r"draining worker child 1 \(pid \d+\): 2 -> 1:", text)
        assert "unexpectedly" not in text and "killed" not in text
        # Drained, not killed: each job ran once, none was cut short.
        assert await val(app, "SELECT count(*) FROM {s}.ledger WHERE event = 'cancelled'") == 0
        assert await val(app, "SELECT count(*) FROM {s}.ledger WHERE event = 'start'") == 30
        assert await val(app, "SELECT count(DISTINCT n) FROM {s}.ledger WHERE event='done'") == 30
        assert await val(app, "SELECT max(attempts) FROM {s}.history") == 1
        # The grown children took part (the last may find the backlog gone).
        assert await val(app, "SELECT count(DISTINCT pid) FROM {s}.ledger") >= 2
    finally:
        await app.close()
    assert sup.stop() == 0


async def _logged(sup: WorkerProcess, *parts: str) -> bool:
    return any(all(p in line for p in parts) for line in sup.text().splitlines())


async def test_autoscale_does_not_flap_under_a_steady_small_load(
    pg_dsn: str, schema: str, supervised: Callable[..., WorkerProcess]
) -> None:
    app = await prepare(pg_dsn, schema)
    try:
        sup = supervised(
            "--autoscale", "1:3", "--concurrency", "2", TASKQ_SUPERVISOR_TIMINGS=AUTOSCALE
        )
        await until(lambda: _count(app, sup.proc.pid, 1), 60, "one child")
        # A job of 50 ms every 100 ms: one child at concurrency 2 keeps up.
        # 40 checks of the autoscaler (8 s at 0.2 s), 5 quiet periods.
        for n in range(80):
            await app.tasks["sup.work"].enqueue(n=n, seconds=0.05)
            await anyio.sleep(0.1)
        await until(
            lambda: val(app, "SELECT count(*) = 80 FROM {s}.history WHERE state = 'succeeded'"),
            60,
            "the load done",
        )
        # A stall of the shared CI machine may cost one grow and its shrink;
        # flapping would be a cycle every few checks.
        decisions = DECISION.findall(sup.text())
        assert len(decisions) <= 2, decisions
    finally:
        await app.close()
    assert sup.stop() == 0


async def test_autoscale_does_not_grow_when_the_cpu_is_busy(
    pg_dsn: str, schema: str, supervised: Callable[..., WorkerProcess]
) -> None:
    app = await prepare(pg_dsn, schema)
    try:
        # No CPU is ever 101% idle: the backlog must not start a child.
        timings = AUTOSCALE.replace("idle_cpu=0", "idle_cpu=1.01")
        sup = supervised(
            "--autoscale", "1:3", "--concurrency", "1", TASKQ_SUPERVISOR_TIMINGS=timings
        )
        await until(lambda: _count(app, sup.proc.pid, 1), 60, "one child")
        await app.tasks["sup.work"].enqueue_many([{"n": n, "seconds": 0.5} for n in range(6)])
        sup.wait_for_output("autoscale: not growing past 1 children although the job next")
        assert "the CPU is only" in sup.text()
        await until(
            lambda: val(app, "SELECT count(*) = 6 FROM {s}.history WHERE state = 'succeeded'"),
            60,
            "the backlog done by the one child",
        )
        assert not DECISION.findall(sup.text())
        assert await val(app, "SELECT count(DISTINCT pid) FROM {s}.ledger") == 1
    finally:
        await app.close()
    assert sup.stop() == 0


def two_free_ports() -> int:
    """A port P such that P and P + 1 are free now."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise AssertionError("no two consecutive free ports")


async def test_child_i_serves_metrics_on_port_plus_i(
    pg_dsn: str, schema: str, supervised: Callable[..., WorkerProcess]
) -> None:
    pytest.importorskip("prometheus_client")
    app = await prepare(pg_dsn, schema)
    try:
        port = two_free_ports()
        sup = supervised("--processes", "2", "--metrics-port", str(port))
        for p in (port, port + 1):
            sup.wait_for_output(f"serving metrics on http://127.0.0.1:{p}/metrics")
            body = await anyio.to_thread.run_sync(_get, f"http://127.0.0.1:{p}/metrics")
            assert "taskq_" in body
        assert f"ports {port} to {port + 1}" in sup.text()
    finally:
        await app.close()
    assert sup.stop() == 0


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return str(r.read().decode())


def test_processes_and_autoscale_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["worker", "supervisorapp:app", "--processes", "2", "--autoscale", "1:2"])
    assert status == EXIT_USAGE
    assert "give --processes or --autoscale, not both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["worker", "supervisorapp:app", "--autoscale", "3:2"])
    assert exit_.value.code == EXIT_USAGE
    assert "expected MIN:MAX with 1 <= MIN <= MAX, got '3:2'" in capsys.readouterr().err


async def test_a_child_drained_by_a_shrink_finishes_its_job_even_if_a_stop_follows(
    pg_dsn: str, schema: str, supervised: Callable[..., WorkerProcess]
) -> None:
    app = await prepare(pg_dsn, schema)
    app.task(name="sup.hold", retry=taskq.Retry(attempts=5, wait=0))(lambda n, seconds=0: n)
    try:
        sup = supervised(
            "--autoscale", "1:2", "--concurrency", "4", TASKQ_SUPERVISOR_TIMINGS=AUTOSCALE
        )
        await until(lambda: _count(app, sup.proc.pid, 1), 60, "one child")
        await app.tasks["sup.work"].enqueue_many([{"n": n, "seconds": 0.5} for n in range(40)])
        await until(lambda: _count(app, sup.proc.pid, 2), 60, "a second child")
        # Only the child in slot 1 (the one a shrink drains) can run this job.
        await app.tasks["sup.hold"].enqueue(n=100, seconds=4)
        await until(
            lambda: val(app, "SELECT count(*) = 1 FROM {s}.ledger WHERE n = 100"), 60, "held"
        )
        sup.wait_for_output("autoscale: draining worker child 1")
        # The stop's first signal must not be the draining child's second.
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(60) == 0, sup.text()
        assert await val(app, "SELECT count(*) FROM {s}.ledger WHERE event = 'cancelled'") == 0
        assert await val(app, "SELECT event FROM {s}.ledger WHERE n = 100 ORDER BY at DESC") == (
            "done"
        )
        assert await val(app, "SELECT count(*) FROM {s}.history WHERE state = 'succeeded'") == 41
    finally:
        await app.close()
