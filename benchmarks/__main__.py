"""``python -m benchmarks``: run the workloads against every system on one Postgres.

Examples::

    python -m benchmarks --quick           # CI, about 2 minutes: short runs; peers in A only
    python -m benchmarks --write           # full run (A-G, W); results/latest.{md,json}
    python -m benchmarks --dsn postgresql://... --systems taskq,pgqueuer:tuned --workloads A
    python -m benchmarks --systems minimal,taskq --workloads G        # two worker processes
    python -m benchmarks --systems minimal,taskq --workloads Q        # 1,000,000 queued jobs
    python -m benchmarks --systems taskq --workloads H                # 10,000,000 in history
    python -m benchmarks --render full.json long.json --write  # one report of both runs

Workloads (runner.py says more): A bulk enqueue and drain, B streaming, C latency,
D scaling with --processes, E sleeping jobs, F taskq's feature costs, G A's drain
with two worker processes, W taskq's workflows. The large-table workloads run only
when named in --workloads, never by default or in --quick's defaults: Q (taskq and
the floor) times the first --backlog-drain jobs (default: --jobs) out of --backlog
queued (default 1,000,000) against --jobs out of --jobs; H (taskq) drains with
--big-history finished jobs in history (default 10,000,000, a few GB of disk while
it runs) against an empty history, and compares the plans of the claim's and the
write-back's statements. Each takes minutes per repetition. With --quick they run
small: 50,000 queued, 100,000 in history.

Peers (pgqueuer, procrastinate) run in their own virtualenvs, made on first use
under ``$TASKQ_BENCH_VENVS`` (default ``~/.cache/taskq-bench/venvs``); a peer
whose virtualenv cannot be made is skipped with a note, never failing the run.
The exit status is non-zero only when a run cannot be trusted (a process
failed, or a job was lost or ran twice).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from . import report, runner, systems, venvs
from .environment import BenchmarkError, machine_facts, server, server_facts

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str]) -> tuple[runner.Config, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="1 run each, smaller and shorter; peers run A only")  # fmt: skip
    p.add_argument("--repeat", type=int, help="repetitions of each run (default 3; quick 1)")
    p.add_argument("--dsn", help="existing server (needs CREATEDB); default $TASKQ_BENCH_DSN, "
                   "else a throwaway embedded Postgres")  # fmt: skip
    p.add_argument("--systems", default=",".join(systems.SYSTEMS),
                   help="comma-separated names, NAME:VARIANT for one variant")  # fmt: skip
    p.add_argument("--workloads",
                   default=",".join(w for w in runner.WORKLOADS if w not in runner.LONG),
                   help="comma-separated: A bulk, B streaming, C latency, D scaling, "
                   "E sleeping jobs and memory, F taskq's feature costs, G two worker "
                   "processes, W workflows (default: these); long, only when named: "
                   "Q a deep backlog, H a big history")  # fmt: skip
    p.add_argument("--jobs", type=int,
                   help="jobs in A, D, F, G, H and Q's shallow case (default 20,000; "
                   "quick 5,000)")  # fmt: skip
    p.add_argument("--batch", type=int, default=1_000, help="jobs per batch enqueue call")
    p.add_argument("--concurrency", type=int, default=10, help="worker concurrency (A-D, F-H, Q)")
    p.add_argument("--rate", type=float, default=100.0, help="jobs/s enqueued in C")
    p.add_argument("--latency-seconds", type=float, help="length of C (default 15; quick 3)")
    p.add_argument("--stream-seconds", type=float, help="length of B (default 15; quick 3)")
    p.add_argument("--processes", default="2,4", help="worker processes in D, comma-separated")
    p.add_argument("--sleep-jobs", type=int, help="jobs in E (default 100,000; quick 20,000)")
    p.add_argument("--sleep-concurrency", type=int, default=1_000, help="concurrency in E")
    p.add_argument("--history-rows", type=int,
                   help="finished jobs in history in F (default 1e6; quick 1e5)")  # fmt: skip
    p.add_argument("--backlog", type=int,
                   help="jobs queued in Q's deep case (default 1e6; quick 50,000)")  # fmt: skip
    p.add_argument("--backlog-drain", type=int,
                   help="jobs Q's deep case runs out of its backlog (default: --jobs)")  # fmt: skip
    p.add_argument("--backlog-seconds", type=float, default=120.0,
                   help="longest a Q drain runs; one stopped then is timed by the jobs it "
                   "ran (default 120)")  # fmt: skip
    p.add_argument("--big-history", type=int,
                   help="finished jobs in history in H (default 1e7; quick 1e5)")  # fmt: skip
    p.add_argument("--workflow-steps", type=int,
                   help="steps of W's workflow (default 10,000; quick 1,000)")  # fmt: skip
    p.add_argument("--workflow-chains", type=int,
                   help="two-step workflows timed in W (default 500; quick 100)")  # fmt: skip
    p.add_argument("--analyze", action="store_true",
                   help="ANALYZE after A's enqueue (fresh planner statistics)")  # fmt: skip
    p.add_argument("--profile", type=Path, metavar="DIR", help="py-spy flame graphs of A drains")
    p.add_argument("--write", action="store_true", help=f"write {RESULTS}/latest.{{md,json}}")
    p.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                   help="run nothing: the report of earlier runs' latest.json files, the "
                   "later ones adding the workloads the first did not run")  # fmt: skip
    args = p.parse_args(argv)
    names = [s for s in args.systems.split(",") if s]
    workloads = [w.upper() for w in args.workloads.split(",") if w]
    if unknown := {n.partition(":")[0] for n in names} - set(systems.SYSTEMS):
        p.error(f"unknown system(s) {sorted(unknown)}; known: {sorted(systems.SYSTEMS)}")
    for n in names:
        name, _, variant = n.partition(":")
        if variant and variant not in systems.load(name).variants:
            p.error(f"{name} has no variant {variant!r}: {sorted(systems.load(name).variants)}")
    if unknown := set(workloads) - set(runner.WORKLOADS):
        p.error(f"unknown workload(s) {sorted(unknown)}; known: {sorted(runner.WORKLOADS)}")
    workloads.sort()
    quick = args.quick
    jobs = args.jobs or (5_000 if quick else 20_000)
    cfg = runner.Config(
        systems=names,
        workloads=workloads,
        repeat=args.repeat or (1 if quick else 3),
        jobs=jobs,
        batch=args.batch,
        concurrency=args.concurrency,
        rate=args.rate,
        latency_seconds=args.latency_seconds or (3.0 if quick else 15.0),
        stream_seconds=args.stream_seconds or (3.0 if quick else 15.0),
        processes=tuple(int(k) for k in args.processes.split(",") if k),
        sleep_jobs=args.sleep_jobs or (20_000 if quick else 100_000),
        sleep_concurrency=args.sleep_concurrency,
        history_rows=args.history_rows or (100_000 if quick else 1_000_000),
        backlog=args.backlog or (50_000 if quick else 1_000_000),
        backlog_drain=args.backlog_drain or jobs,
        backlog_seconds=args.backlog_seconds,
        big_history=args.big_history or (100_000 if quick else 10_000_000),
        quick=quick,
        peer_workloads=("A",) if quick else None,
        analyze=args.analyze,
        profile_dir=args.profile,
        workflow_steps=args.workflow_steps or (1_000 if quick else 10_000),
        workflow_chains=args.workflow_chains or (100 if quick else 500),
    )
    numbers = (cfg.repeat, cfg.jobs, cfg.batch, cfg.concurrency, cfg.rate, cfg.latency_seconds,
               cfg.stream_seconds, cfg.sleep_jobs, cfg.sleep_concurrency, cfg.history_rows,
               cfg.workflow_steps - 2, cfg.workflow_chains, cfg.backlog, cfg.backlog_drain,
               cfg.backlog_seconds, cfg.big_history, *cfg.processes)  # fmt: skip
    if min(numbers) <= 0 or not cfg.processes:
        p.error("counts, rates and durations must be positive")
    if "Q" in workloads and not cfg.jobs <= cfg.backlog >= cfg.backlog_drain:
        p.error("Q drains --jobs and --backlog-drain out of --backlog: neither may exceed it")
    return cfg, args


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


async def bench(cfg: runner.Config, args: argparse.Namespace) -> str:
    started = time.monotonic()
    load_before = _load()
    plan = await runner.plan(cfg, log)
    with server(args.dsn) as srv:
        conn = await asyncpg.connect(srv.dsn)
        try:
            env = {"server": await server_facts(conn, srv), "machine": machine_facts()}
        finally:
            await conn.close()
        env["machine"]["peer virtualenvs"] = str(venvs.cache_dir())
        log(f"Postgres: {env['server']['version']}")
        log("rows: " + ", ".join(s.label for s in plan.subjects + plan.features))
        runs = await runner.run(cfg, srv, plan, log)
    env["machine"]["wall time of the run"] = f"{time.monotonic() - started:.0f} s"
    # Other work on the machine disturbs the numbers: the load says whether there was any.
    env["machine"]["load average before the run"] = load_before
    env["machine"]["load average after the run"] = _load()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]])
    summ = report.summary(runs)
    md = report.markdown(cfg, plan, summ, env, when, command, runs)
    if args.write:
        data = {"measured": when, "command": command, "config": cfg, "plan": plan,
                "environment": env, "summary": summ, "runs": runs}  # fmt: skip
        _write(md, data)
    return md


def render(paths: list[Path], write: bool) -> str:
    """The report of earlier runs, merged (``--render``)."""
    try:
        datas = [orjson.loads(path.read_bytes()) for path in paths]
    except (OSError, orjson.JSONDecodeError) as exc:
        raise BenchmarkError(f"cannot read a run's results: {exc}") from exc
    data, also = report.merge(datas)
    md = report.markdown(
        data["config"], data["plan"], data["summary"], data["environment"], data["measured"],
        data["command"], data["runs"], also,
    )  # fmt: skip
    if write:
        _write(md, data)
    return md


def _write(md: str, data: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.md").write_text(md)
    opts = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_DATACLASS
    (RESULTS / "latest.json").write_bytes(orjson.dumps(data, option=opts, default=str) + b"\n")
    log(f"wrote {RESULTS / 'latest.md'} and latest.json")


def main(argv: list[str]) -> int:
    cfg, args = parse_args(argv)
    try:
        if args.render:
            print(render(args.render, args.write), end="")
            return 0
        print(asyncio.run(bench(cfg, args)), end="")
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
