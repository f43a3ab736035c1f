"""Summaries of the runs: a Markdown report and the JSON it is made from."""

from __future__ import annotations

import statistics
from typing import Any

from .runner import Config

FLOOR = "minimal"


def summarize(values: list[float | None]) -> dict[str, float] | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return {"median": statistics.median(known), "min": min(known), "max": max(known)}


def summary(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per system, workload and metric: median, min and max over the repetitions."""
    out: dict[str, Any] = {}
    for system, workloads in runs.items():
        for workload, results in workloads.items():
            if results:
                metrics = {k for r in results for k in r}
                out.setdefault(system, {})[workload] = {
                    m: summarize([r.get(m) for r in results]) for m in sorted(metrics)
                }
    return out


def _num(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(stats: dict[str, float] | None, repeat: int) -> str:
    if stats is None:
        return "n/a"
    if repeat == 1:
        return _num(stats["median"])
    return f"{_num(stats['median'])} ({_num(stats['min'])}–{_num(stats['max'])})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(
    cfg: Config, summ: dict[str, Any], env: dict[str, dict[str, str]], when: str, command: str
) -> str:
    rep = cfg.repeat
    cells = "one run" if rep == 1 else f"the median (min–max) of {rep} runs"
    out = [
        "# taskq benchmarks",
        "",
        f"Measured {when} with `{command}`. Each cell is {cells}, each run in a fresh "
        f"database of one Postgres server. `{FLOOR}` is the floor: a hand-written asyncpg "
        "queue (`benchmarks/minimal_queue.py`) with batched claim and acknowledgement.",
    ]
    if "A" in cfg.workloads:
        out += [
            "",
            f"## A. Bulk: {cfg.jobs:,} no-op jobs",
            "",
            f"Enqueued with the system's batch API in batches of {cfg.batch:,}; then one worker "
            f"process (concurrency {cfg.concurrency}, uvloop) drains them, timed from its "
            "readiness until Postgres shows no job left. CPU is user + system time of the worker "
            "process and of all Postgres processes during the drain; cores = CPU seconds per "
            "second of drain.",
            "",
            "Planner statistics: "
            + (
                "`ANALYZE` ran after the enqueue (`--analyze`)."
                if cfg.analyze
                else "left to autovacuum, as a fresh install has them (none yet, for the drain "
                "that follows the first bulk enqueue)."
            ),
            "",
        ]
        keys = [
            ("enqueue_per_s", "enqueue jobs/s"),
            ("drain_per_s", "drain jobs/s"),
            ("worker_cpu_us_per_job", "worker CPU µs/job"),
            ("worker_cpu_cores", "worker CPU cores"),
            ("server_cpu_us_per_job", "Postgres CPU µs/job"),
            ("server_cpu_cores", "Postgres CPU cores"),
        ]
        rows = [
            [s] + [_cell(summ[s]["A"].get(k), rep) for k, _ in keys] for s in summ if "A" in summ[s]
        ]
        out += _table(["system"] + [h for _, h in keys], rows)
        analyzed = [
            s for s in summ if _max(summ[s].get("A", {}).get("autoanalyze_during_drain")) > 0
        ]
        if analyzed:
            out += ["", f"Autovacuum analyzed tables during some drains of: {', '.join(analyzed)}."]
    if "C" in cfg.workloads:
        n = round(cfg.rate * cfg.latency_seconds)
        out += [
            "",
            "## C. Latency: enqueue to start",
            "",
            f"One idle worker process (concurrency {cfg.concurrency}); one producer process "
            f"enqueues one job every {1000 / cfg.rate:g} ms for {cfg.latency_seconds:g} s "
            f"({n:,} jobs). Both ends are read on the database clock: the enqueue "
            "statement's `now()` (as stored in, or returned from, the job row) and "
            "`clock_timestamp()` written by the job as it starts.",
            "",
        ]
        keys = [
            ("p50_ms", "p50 ms"),
            ("p95_ms", "p95 ms"),
            ("p99_ms", "p99 ms"),
            ("max_ms", "max ms"),
        ]
        rows = [
            [s] + [_cell(summ[s]["C"].get(k), rep) for k, _ in keys] for s in summ if "C" in summ[s]
        ]
        out += _table(["system"] + [h for _, h in keys], rows)
    ratios = _ratios(summ)
    if ratios:
        out += ["", f"## Ratios to `{FLOOR}` (medians)", ""]
        out += _table(["system", *ratios[0]], ratios[1])
    out += ["", "## Environment", ""]
    out += [f"- {k}: {v}" for k, v in env["server"].items()]
    out += [f"- {k}: {v}" for k, v in env["machine"].items()]
    return "\n".join(out) + "\n"


def _max(stats: dict[str, float] | None) -> float:
    return 0.0 if stats is None else stats["max"]


def _ratios(summ: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """system / floor for throughput (higher is better) and latency (lower is better)."""
    if FLOOR not in summ or len(summ) < 2:
        return None
    cols = [("A", "enqueue_per_s", "A enqueue"), ("A", "drain_per_s", "A drain")]
    cols += [("C", "p50_ms", "C p50"), ("C", "p99_ms", "C p99")]
    cols = [c for c in cols if c[0] in summ[FLOOR]]
    rows = []
    for system in summ:
        if system == FLOOR:
            continue
        row = [system]
        for workload, key, _ in cols:
            mine = summ[system].get(workload, {}).get(key)
            floor = summ[FLOOR][workload].get(key)
            row.append(
                "n/a" if not mine or not floor else f"{mine['median'] / floor['median']:.2f}×"
            )
        rows.append(row)
    return [c[2] for c in cols], rows
