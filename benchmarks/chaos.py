"""Chaos: worker processes SIGKILLed, Postgres restarted, backends terminated; count the damage.

::

    python -m benchmarks.chaos --jobs 20000 --kills 10 --restart immediate
    python -m benchmarks.chaos --jobs 3000 --kills 4 --kill-every 3 --lease 2   # quick

Starts a throwaway Postgres of its own (it is restarted), enqueues the jobs of
``tests/chaosapp.py`` (a fifth of them write their effect with
``ctx.transaction()``), runs ``--workers`` worker processes, and while they
drain the queue: SIGKILLs a random worker every ``--kill-every`` seconds
(and starts a new one), restarts Postgres once halfway through the kills
(``pg_ctl stop -m fast|immediate``, then start), and terminates a random
taskq backend (``pg_terminate_backend``) every ``--terminate-every`` seconds.
Then it prints:

- lost: jobs in neither the live table nor history; stuck: jobs still live;
- duplicate runs: jobs whose function started more than once, with how many
  of them had a run in flight at a kill (started by the killed process, not
  ended before it), at a restart or a terminated backend, and unexplained
  ones (must be 0); and jobs whose function completed more than once;
- duplicate effects of the ``ctx.transaction()`` jobs (must be 0);
- the longest kill-to-rescue time: from a SIGKILL until the last job the
  killed worker held was taken from it (re-queued by a rescue), against the
  documented bound of one lease plus one rescue interval.

The exit status is 1 when anything must-be-zero is not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import asyncpg

import taskq
from taskq import _embedded

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.chaosapp import TABLES  # noqa: E402

#: A run that ended this long before a fault may still have had its outcome
#: waiting to be written (batched write-back), so it counts as in flight.
WRITE_BACK_GRACE = 2.0


@dataclass
class Config:
    jobs: int = 20_000
    workers: int = 3
    concurrency: int = 10
    lease: float = 5.0
    kills: int = 10
    kill_every: float = 5.0
    restart: str | None = "immediate"  # None, "fast" or "immediate"
    restart_down: float = 1.0  # seconds Postgres stays down
    terminate_every: float = 2.0
    sleep: str = "0.05:0.2"
    effect_share: int = 5  # every n-th job uses ctx.transaction()
    timeout: float = 900.0
    workdir: Path | None = None
    seed: int | None = None


@dataclass
class Kill:
    pid: int
    at: float
    held: list[int]  # jobs the killed worker held (running under its id)
    rescued_after: float | None = None


@dataclass
class Report:
    jobs: int = 0
    transactional: int = 0
    kills: list[Kill] = field(default_factory=list)
    restarts: list[tuple[float, float]] = field(default_factory=list)
    terminated: list[float] = field(default_factory=list)
    worker_exits: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    lost: list[int] = field(default_factory=list)
    stuck: list[int] = field(default_factory=list)
    ran_again: int = 0
    in_flight_at_kill: int = 0
    in_flight_at_db_fault: int = 0
    unexplained: list[int] = field(default_factory=list)
    completed_twice: int = 0
    completed_twice_unexplained: list[int] = field(default_factory=list)
    duplicate_effects: list[int] = field(default_factory=list)
    missing_effects: list[int] = field(default_factory=list)
    elapsed: float = 0.0
    lease: float = 0.0
    rescue_interval: float = 0.0

    @property
    def longest_rescue(self) -> float | None:
        times = [k.rescued_after for k in self.kills if k.rescued_after is not None]
        return max(times) if times else None

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.stuck
            or self.unexplained
            or self.completed_twice_unexplained
            or self.duplicate_effects
            or self.missing_effects
            or set(self.failed) - {"taskq.PoisonJob"}
            or any(k.rescued_after is None and k.held for k in self.kills)
        )

    def lines(self) -> Iterator[str]:
        yield f"jobs               {self.jobs} ({self.transactional} with ctx.transaction())"
        yield (
            f"kills              {len(self.kills)} SIGKILLs; workers that exited by "
            f"themselves: {self.worker_exits}"
        )
        downs = ", ".join(f"down {b - a:.1f}s" for a, b in self.restarts)
        yield f"restarts           {len(self.restarts)}{f' ({downs})' if downs else ''}"
        yield f"terminated         {len(self.terminated)} taskq backends"
        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())) or "0"
        yield f"succeeded          {self.succeeded}; failed: {failed}"
        yield f"lost               {len(self.lost)}{_ids(self.lost)}"
        yield f"stuck              {len(self.stuck)}{_ids(self.stuck)}"
        yield (
            f"duplicate runs     {self.ran_again} jobs started more than once: in flight at "
            f"a kill {self.in_flight_at_kill}, at a restart or terminated backend "
            f"{self.in_flight_at_db_fault}, unexplained {len(self.unexplained)}"
            f"{_ids(self.unexplained)}"
        )
        yield (
            f"completed twice    {self.completed_twice} at-least-once jobs ran to their end "
            f"more than once; unexplained {len(self.completed_twice_unexplained)}"
        )
        yield (
            f"duplicate effects  {len(self.duplicate_effects)} of the ctx.transaction() jobs"
            f"{_ids(self.duplicate_effects)}; succeeded without their effect "
            f"{len(self.missing_effects)}{_ids(self.missing_effects)}"
        )
        bound = self.lease + self.rescue_interval
        longest = self.longest_rescue
        held = sum(len(k.held) for k in self.kills)
        yield (
            f"kill-to-rescue     longest {'-' if longest is None else f'{longest:.1f}s'} over "
            f"{held} held jobs (bound: lease {self.lease:g}s + rescue interval "
            f"{self.rescue_interval:g}s = {bound:g}s)"
        )
        yield f"elapsed            {self.elapsed:.0f}s"


def _ids(ids: list[int]) -> str:
    return f" {ids[:10]}{'...' if len(ids) > 10 else ''}" if ids else ""


# -- Postgres ------------------------------------------------------------------------


def restart_postgres(server: _embedded.EmbeddedServer, mode: str, down: float) -> None:
    """Stop the server (``-m fast`` or ``-m immediate``: a crash, recovered from WAL) and
    start it again after ``down`` seconds."""
    owner = server.data_dir.stat()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    cmd = [str(server.bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-m", mode, "-w", "stop"]
    subprocess.run(
        cmd,
        env=env,
        cwd="/",
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        user=owner.st_uid if os.geteuid() == 0 else None,
        group=owner.st_gid if os.geteuid() == 0 else None,
        timeout=120,
    )
    time.sleep(down)
    _embedded.ensure_server(server.data_dir)


# -- worker processes ---------------------------------------------------------------------


class Workers:
    def __init__(self, cfg: Config, dsn: str, schema: str, logs: Path) -> None:
        self.cfg = cfg
        self.env = dict(os.environ)
        self.env.update(
            TASKQ_DSN=dsn,
            TASKQ_SCHEMA=schema,
            CHAOS_SLEEP=cfg.sleep,
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
        )
        self.logs = logs
        self.live: list[subprocess.Popen[bytes]] = []
        self.files: list[TextIO] = []
        self.started = 0

    def start(self) -> None:
        log = (self.logs / f"worker{self.started}.log").open("w")
        self.files.append(log)
        self.started += 1
        # DEBUG: a worker that exits on an unexpected error leaves its traceback.
        cmd = [
            sys.executable,
            "-m",
            "taskq",
            "--log-level",
            "DEBUG",
            "worker",
            "tests.chaosapp:app",
        ]
        cmd += ["--concurrency", str(self.cfg.concurrency), "--lease-seconds", str(self.cfg.lease)]
        cmd += ["--poll-interval", "0.5", "--shutdown-timeout", "2", "--no-cron"]
        self.live.append(
            subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        )

    def reap(self) -> int:
        """Forget workers that exited by themselves; return how many."""
        gone = [p for p in self.live if p.poll() is not None]
        self.live = [p for p in self.live if p.poll() is None]
        return len(gone)

    def kill_one(self) -> int:
        victim = random.choice(self.live)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        self.live.remove(victim)
        return victim.pid

    def stop(self) -> None:
        for p in self.live:
            p.send_signal(signal.SIGTERM)
        for p in self.live:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.live = []
        for f in self.files:
            f.close()


# -- the run --------------------------------------------------------------------------------


class Driver:
    """The chaos loop's connection to the database: reconnects, and never fails the loop."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.s = f'"{schema}"'
        self.schema = schema
        self.conn: asyncpg.Connection | None = None

    async def fetch(self, sql: str, *args: Any) -> list[Any] | None:
        try:
            if self.conn is None or self.conn.is_closed():
                self.conn = await asyncpg.connect(
                    self.dsn, timeout=5, server_settings={"application_name": "chaos-driver"}
                )
            return list(await self.conn.fetch(sql.replace("{s}", self.s), *args))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            if self.conn is not None:
                self.conn.terminate()
            self.conn = None
            return None

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None


async def prepare(cfg: Config, dsn: str, schema: str) -> tuple[list[int], list[int]]:
    """Schema, tables and jobs: (ids of at-least-once jobs, ids of ctx.transaction() jobs)."""
    app = taskq.App(dsn, schema=schema)
    app.task(name="chaos.work")(lambda n: n)
    app.task(name="chaos.effect")(lambda n: n)
    work_ids: list[int] = []
    effect_ids: list[int] = []
    async with app:
        async with app.pool.acquire() as conn:
            await conn.execute(TABLES.format(schema=f'"{schema}"'))
        numbers = list(range(cfg.jobs))
        for start in range(0, cfg.jobs, 1000):
            batch = numbers[start : start + 1000]
            effects = [{"n": n} for n in batch if n % cfg.effect_share == 0]
            works = [{"n": n} for n in batch if n % cfg.effect_share != 0]
            effect_ids += [j.id for j in await app.tasks["chaos.effect"].enqueue_many(effects)]
            work_ids += [j.id for j in await app.tasks["chaos.work"].enqueue_many(works)]
    return work_ids, effect_ids


async def run(cfg: Config, server: _embedded.EmbeddedServer, logs: Path) -> Report:
    rng_seed = cfg.seed if cfg.seed is not None else secrets.randbits(32)
    random.seed(rng_seed)
    schema = f"chaos_{secrets.token_hex(4)}"
    report = Report(lease=cfg.lease, rescue_interval=cfg.lease / 2)
    work_ids, effect_ids = await prepare(cfg, server.dsn, schema)
    report.jobs, report.transactional = cfg.jobs, len(effect_ids)
    db = Driver(server.dsn, schema)
    workers = Workers(cfg, server.dsn, schema, logs)
    for _ in range(cfg.workers):
        workers.start()
    started = time.monotonic()
    next_kill = started + cfg.kill_every * random.uniform(0.8, 1.2)
    next_terminate = started + cfg.terminate_every
    restart_after = max(cfg.kills // 2, 1) if cfg.restart else -1
    restart_at: float | None = None
    try:
        while True:
            now = time.monotonic()
            if now - started > cfg.timeout:
                break
            report.worker_exits += workers.reap()
            while len(workers.live) < cfg.workers:
                workers.start()
            if len(report.kills) < cfg.kills and now >= next_kill:
                pid = workers.kill_one()
                killed_at = time.time()
                workers.start()
                report.kills.append(Kill(pid, killed_at, []))
                next_kill = now + cfg.kill_every * random.uniform(0.8, 1.2)
                if len(report.kills) == restart_after:
                    restart_at = now + cfg.kill_every / 2  # between two kills
            if restart_at is not None and now >= restart_at:
                restart_at = None
                await db.close()
                down_at = time.time()
                await asyncio.to_thread(
                    restart_postgres, server, str(cfg.restart), cfg.restart_down
                )
                report.restarts.append((down_at, time.time()))
            if now >= next_terminate:
                rows = await db.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name IN ($1, $2) AND pid <> pg_backend_pid()",
                    f"taskq ({schema})",
                    f"taskq-listener ({schema})",
                )
                if rows:
                    victim = random.choice(rows)["pid"]
                    if await db.fetch("SELECT pg_terminate_backend($1)", victim) is not None:
                        report.terminated.append(time.time())
                next_terminate = now + cfg.terminate_every * random.uniform(0.5, 1.5)
            await track_rescues(db, report)
            left = await db.fetch(
                "SELECT (SELECT count(*) FROM {s}.jobs) AS live, "
                "(SELECT count(*) FROM {s}.history) AS done"
            )
            if left and left[0]["live"] == 0 and left[0]["done"] == cfg.jobs:
                pending = [k for k in report.kills if k.held and k.rescued_after is None]
                if not pending and len(report.kills) >= min(cfg.kills, 1):
                    break
            await asyncio.sleep(0.1)
    finally:
        report.elapsed = time.monotonic() - started
        workers.stop()
        await db.close()
    await analyse(server.dsn, schema, work_ids, effect_ids, report)
    print(f"seed {rng_seed}; schema {schema}; worker logs in {logs}", flush=True)
    return report


async def track_rescues(db: Driver, report: Report) -> None:
    """Note the jobs each killed worker held, then when the last of them was taken from it."""
    for kill in report.kills:
        if kill.rescued_after is not None:
            continue
        rows = await db.fetch(
            "SELECT id FROM {s}.jobs WHERE state = 'running' "
            "AND split_part(worker_id, ':', 2) = $1",
            str(kill.pid),
        )
        if rows is None:
            continue  # Postgres is down: nothing can have been rescued meanwhile
        ids = [r["id"] for r in rows]
        if not kill.held and ids:
            kill.held = ids
        if not ids:
            kill.rescued_after = time.time() - kill.at


async def analyse(
    dsn: str, schema: str, work_ids: list[int], effect_ids: list[int], report: Report
) -> None:
    conn = await asyncpg.connect(dsn)
    s = f'"{schema}"'
    try:
        live = {r["id"] for r in await conn.fetch(f"SELECT id FROM {s}.jobs")}
        finished = {
            r["id"]: (r["state"], r["type"])
            for r in await conn.fetch(f"SELECT id, state, error->>'type' AS type FROM {s}.history")
        }
        all_ids = work_ids + effect_ids
        report.lost = sorted(i for i in all_ids if i not in live and i not in finished)
        report.stuck = sorted(live)
        report.succeeded = sum(1 for state, _ in finished.values() if state == "succeeded")
        for state, kind in finished.values():
            if state != "succeeded":
                key = str(kind or state)
                report.failed[key] = report.failed.get(key, 0) + 1
        runs = await conn.fetch(
            f"SELECT n, kind, pid, extract(epoch FROM started_at) AS started, "
            f"extract(epoch FROM ended_at) AS ended FROM {s}.chaos_runs ORDER BY started_at"
        )
        effects = await conn.fetch(f"SELECT n, count(*) AS c FROM {s}.chaos_effects GROUP BY n")
        succeeded_n = {
            r["n"]
            for r in await conn.fetch(
                f"SELECT (args->>'n')::int AS n FROM {s}.history "
                "WHERE state = 'succeeded' AND task = 'chaos.effect'"
            )
        }
    finally:
        await conn.close()
    classify_runs(runs, report)
    counts = {r["n"]: r["c"] for r in effects}
    report.duplicate_effects = sorted(n for n, c in counts.items() if c > 1)
    report.missing_effects = sorted(n for n in succeeded_n if counts.get(n, 0) == 0)
    # An effect whose job did not succeed would be an effect without its job.
    report.missing_effects += sorted(n for n in counts if n not in succeeded_n)


def classify_runs(runs: list[Any], report: Report) -> None:
    """Every run but a job's last must have been cut off (or had its outcome lost) by a fault.

    A run's cause is the first fault that could have cut it: a SIGKILL of its
    process, or a Postgres restart or terminated backend, after it started
    and before it ended or shortly after (its outcome may still have been
    waiting to be written). A run with no end was cut by the first such
    fault after its start: a run that failed at a restart is not blamed on a
    kill of its worker a minute later.
    """
    kills_by_pid: dict[int, list[float]] = {}
    for k in report.kills:
        kills_by_pid.setdefault(k.pid, []).append(k.at)
    windows = list(report.restarts) + [(t, t) for t in report.terminated]

    def cause(run: Any) -> str | None:
        start = float(run["started"])
        end = None if run["ended"] is None else float(run["ended"]) + WRITE_BACK_GRACE
        faults = [
            (at, "kill")
            for at in kills_by_pid.get(run["pid"], [])
            if start <= at and (end is None or at <= end)
        ]
        faults += [(a, "db") for a, b in windows if start <= b and (end is None or a <= end)]
        return min(faults)[1] if faults else None

    by_job: dict[int, list[Any]] = {}
    for r in runs:
        by_job.setdefault(r["n"], []).append(r)
    for n, job_runs in by_job.items():
        if len(job_runs) > 1:
            report.ran_again += 1
            causes = [cause(r) for r in job_runs[:-1]]
            if None in causes:
                report.unexplained.append(n)
            elif "kill" in causes:
                report.in_flight_at_kill += 1
            else:
                report.in_flight_at_db_fault += 1
        completed = [r for r in job_runs if r["ended"] is not None]
        if len(completed) > 1 and job_runs[0]["kind"] == "work":
            report.completed_twice += 1
            if any(cause(r) is None for r in completed[:-1]):
                report.completed_twice_unexplained.append(n)


def own_server(workdir: Path) -> _embedded.EmbeddedServer:
    return _embedded.ensure_server(workdir / "pg")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos", description=__doc__.split("\n")[0]
    )
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--lease", type=float, default=5.0, help="worker lease seconds (default 5)")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--kill-every", type=float, default=5.0, help="seconds between SIGKILLs")
    p.add_argument(
        "--restart", choices=["none", "fast", "immediate"], default="immediate",
        help="how Postgres is stopped for its one restart (default immediate: a crash)",
    )  # fmt: skip
    p.add_argument("--terminate-every", type=float, default=2.0)
    p.add_argument("--sleep", default="0.05:0.2", help="seconds each job sleeps, min:max")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--workdir", type=Path, help="Postgres data and worker logs (default: temp)")
    args = p.parse_args(argv)
    cfg = Config(
        jobs=args.jobs,
        workers=args.workers,
        concurrency=args.concurrency,
        lease=args.lease,
        kills=args.kills,
        kill_every=args.kill_every,
        restart=None if args.restart == "none" else args.restart,
        terminate_every=args.terminate_every,
        sleep=args.sleep,
        timeout=args.timeout,
        seed=args.seed,
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="taskq-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    server = own_server(workdir)
    try:
        report = asyncio.run(run(cfg, server, workdir))
    finally:
        server.stop()
    for line in report.lines():
        print(line)
    print("OK" if report.ok else "FAILED: see the must-be-zero lines above")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
