"""``python -m benchmarks``: run the workloads against every system on one Postgres.

Examples::

    python -m benchmarks --quick           # CI: one run each, short latency phase
    python -m benchmarks --write           # full run; results/latest.{md,json}
    python -m benchmarks --dsn postgresql://... --systems taskq --workloads A
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson

from . import report, runner, systems
from .environment import BenchmarkError, machine_facts, server, server_facts

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str]) -> tuple[runner.Config, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 repetition, 3 s latency phase")
    p.add_argument("--repeat", type=int, help="repetitions of each run (default 3; quick 1)")
    p.add_argument("--dsn", help="existing server (needs CREATEDB); default $TASKQ_BENCH_DSN, "
                   "else a throwaway embedded Postgres")  # fmt: skip
    p.add_argument("--systems", default=",".join(systems.SYSTEMS), help="comma-separated")
    p.add_argument("--workloads", default="A,C", help="comma-separated: A (bulk), C (latency)")
    p.add_argument("--jobs", type=int, default=20_000, help="jobs in workload A")
    p.add_argument("--batch", type=int, default=1_000, help="jobs per enqueue call in A")
    p.add_argument("--concurrency", type=int, default=10, help="worker concurrency")
    p.add_argument("--rate", type=float, default=100.0, help="jobs/s enqueued in C")
    p.add_argument("--latency-seconds", type=float, help="length of C (default 15; quick 3)")
    p.add_argument("--analyze", action="store_true",
                   help="ANALYZE after A's enqueue (fresh planner statistics)")  # fmt: skip
    p.add_argument("--profile", type=Path, metavar="DIR", help="py-spy flame graphs of A drains")
    p.add_argument("--write", action="store_true", help=f"write {RESULTS}/latest.{{md,json}}")
    args = p.parse_args(argv)
    names = [s for s in args.systems.split(",") if s]
    workloads = [w.upper() for w in args.workloads.split(",") if w]
    if unknown := set(names) - set(systems.SYSTEMS):
        p.error(f"unknown system(s) {sorted(unknown)}; known: {sorted(systems.SYSTEMS)}")
    if unknown := set(workloads) - set(runner.WORKLOADS):
        p.error(f"unknown workload(s) {sorted(unknown)}; known: {sorted(runner.WORKLOADS)}")
    # The floor first, so that every system's numbers print after the one they compare to.
    names.sort(key=lambda s: s != report.FLOOR)
    cfg = runner.Config(
        systems=names,
        workloads=workloads,
        repeat=args.repeat or (1 if args.quick else 3),
        jobs=args.jobs,
        batch=args.batch,
        concurrency=args.concurrency,
        rate=args.rate,
        latency_seconds=args.latency_seconds or (3.0 if args.quick else 15.0),
        analyze=args.analyze,
        profile_dir=args.profile,
    )
    if min(cfg.repeat, cfg.jobs, cfg.batch, cfg.concurrency, cfg.rate, cfg.latency_seconds) <= 0:
        p.error("counts, rates and durations must be positive")
    return cfg, args


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def bench(cfg: runner.Config, args: argparse.Namespace) -> str:
    with server(args.dsn) as srv:
        conn = await asyncpg.connect(srv.dsn)
        try:
            env = {"server": await server_facts(conn, srv), "machine": machine_facts()}
        finally:
            await conn.close()
        log(f"Postgres: {env['server']['version']}")
        runs = await runner.run(cfg, srv, log)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]])
    summ = report.summary(runs)
    md = report.markdown(cfg, summ, env, when, command)
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "latest.md").write_text(md)
        data = {"measured": when, "command": command, "config": cfg, "environment": env,
                "summary": summ, "runs": runs}  # fmt: skip
        opts = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_DATACLASS
        (RESULTS / "latest.json").write_bytes(orjson.dumps(data, option=opts, default=str) + b"\n")
        log(f"wrote {RESULTS / 'latest.md'} and latest.json")
    return md


def main(argv: list[str]) -> int:
    cfg, args = parse_args(argv)
    try:
        print(asyncio.run(bench(cfg, args)), end="")
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
