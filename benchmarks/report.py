"""Summaries of the runs: a Markdown report and the JSON it is made from."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .runner import FEATURES, FLOOR, G_PROCESSES, Config, Plan, Subject
from .workflows import PICKUP_INTERVAL

TASKQ = "taskq"
PGQ_TUNED = "pgqueuer (tuned)"
Stats = dict[str, float]


def summarize(values: list[float | None]) -> Stats | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return {"median": statistics.median(known), "min": min(known), "max": max(known)}


def summary(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per row, workload and metric: median, min and max over the repetitions.

    Metrics are the numbers; other values (workload H's plans) stay in the runs.
    """
    out: dict[str, Any] = {}
    for label, workloads in runs.items():
        for workload, results in workloads.items():
            if results:
                metrics = {k for r in results for k, v in r.items() if _is_number(v)}
                out.setdefault(label, {})[workload] = {
                    m: summarize([r.get(m) for r in results]) for m in sorted(metrics)
                }
    return out


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _num(value: float) -> str:
    if abs(value) >= 1000 or float(value).is_integer():
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(stats: Stats | None, repeat: int) -> str:
    if stats is None:
        return "n/a"
    if repeat == 1 or stats["min"] == stats["max"]:
        return _num(stats["median"])
    return f"{_num(stats['median'])} ({_num(stats['min'])}–{_num(stats['max'])})"


def _table(header: list[str], rows: list[list[str]], *, numbers: bool = True) -> list[str]:
    align = "---:" if numbers else "---"
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + [align] * (len(header) - 1)) + "|",
    ]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


class Report:
    def __init__(self, cfg: Config, plan: Plan, summ: dict[str, Any]) -> None:
        self.cfg, self.plan, self.summ = cfg, plan, summ

    def stats(self, label: str, workload: str, key: str) -> Stats | None:
        found: Stats | None = self.summ.get(label, {}).get(workload, {}).get(key)
        return found

    def median(self, label: str, workload: str, key: str) -> float | None:
        s = self.stats(label, workload, key)
        return None if s is None else s["median"]

    def rows(self, workload: str, keys: list[str]) -> list[list[str]]:
        return [
            [s.label] + [_cell(self.stats(s.label, workload, k), self.cfg.repeat) for k in keys]
            for s in self.plan.subjects
            if workload in self.summ.get(s.label, {})
        ]


def markdown(
    cfg: Config,
    plan: Plan,
    summ: dict[str, Any],
    env: dict[str, dict[str, str]],
    when: str,
    command: str,
    runs: dict[str, dict[str, list[dict[str, Any]]]] | None = None,
    also: list[tuple[str, str, list[str]]] | None = None,
) -> str:
    """The report; ``runs`` (the results of each run) for what is not a number (H's plans).

    ``also`` names the runs merged into this one (see :func:`merge`): when, command, and
    the workloads taken from it.
    """
    r = Report(cfg, plan, summ)
    rep = cfg.repeat
    cells = "one run" if rep == 1 else f"the median (min–max) of {rep} runs"
    merged = "".join(
        f" Workload{'s' if len(w) > 1 else ''} {', '.join(w)}: measured {at} with `{cmd}`."
        for at, cmd, w in also or []
    )
    out = [
        "# taskq benchmarks",
        "",
        f"Measured {when} with `{command}`.{merged} Each cell is {cells}, each run in a fresh "
        "database of one Postgres server, with the server's durability settings (below) for "
        f"every system. `{FLOOR}` is the floor: a hand-written asyncpg queue "
        "(`benchmarks/minimal_queue.py`) with batched claim and acknowledgement. Every "
        "system runs in its own processes (`python -m benchmarks.agent`) on uvloop; peers "
        "run in their own virtualenvs. After every run the runner checks that each job "
        "ran exactly once, in the worker's count and in the system's own tables.",
    ]
    out += _systems(r)
    if "A" in cfg.workloads:
        out += _bulk(r)
    if "B" in cfg.workloads:
        out += _stream(r)
    if "C" in cfg.workloads:
        out += _latency(r)
    if "D" in cfg.workloads:
        out += _scaling(r)
    if "E" in cfg.workloads:
        out += _sleepers(r)
    if "F" in cfg.workloads and plan.features:
        out += _features(r)
    if "G" in cfg.workloads:
        out += _two_processes(r)
    if "Q" in cfg.workloads:
        out += _backlog(r)
    if "H" in cfg.workloads:
        out += _history(r, (runs or {}).get(TASKQ, {}).get("H", []))
    if "W" in cfg.workloads:
        out += _workflows(r)
    out += _ratios(r)
    out += _targets(r)
    out += ["", "## Environment", ""]
    out += [f"- {k}: {v}" for k, v in env["server"].items()]
    out += [f"- {k}: {v}" for k, v in env["machine"].items()]
    return "\n".join(out) + "\n"


def _systems(r: Report) -> list[str]:
    out = ["", "## Systems", ""]
    rows = []
    for s in r.plan.subjects:
        v = r.plan.versions.get(s.system, {})
        pkgs = ", ".join(f"{k} {ver}" for k, ver in v.get("packages", {}).items())
        where = "runner's venv" if s.cls.venv is None else f"own venv (`{s.cls.venv.dirname}`)"
        rows.append(
            [
                s.label,
                f"{pkgs}; Python {v.get('python', '?')}, {where}",
                r.plan.settings.get(s.label, ""),
            ]
        )
    out += _table(["system", "versions", "settings"], rows, numbers=False)
    for name, why in r.plan.skipped.items():
        out += ["", f"**Skipped {name}**: {why}"]
    return out


def _bulk(r: Report) -> list[str]:
    cfg = r.cfg
    out = [
        "",
        f"## A. Bulk: {cfg.jobs:,} no-op jobs",
        "",
        f"Enqueued with the system's batch API in batches of {cfg.batch:,}; then one worker "
        f"process (concurrency {cfg.concurrency}) drains them, timed from its readiness until "
        "Postgres shows no job left. CPU is user + system time of the worker process and of "
        "all Postgres processes during the drain; cores = CPU seconds per second of drain. "
        "Planner statistics: "
        + (
            "`ANALYZE` ran after the enqueue (`--analyze`)."
            if cfg.analyze
            else "left to autovacuum, as a fresh install has them."
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
    out += _table(["system"] + [h for _, h in keys], r.rows("A", [k for k, _ in keys]))
    out += _fewer(r, "A", cfg.jobs)
    analyzed = [
        s.label
        for s in r.plan.subjects
        if (st := r.stats(s.label, "A", "autoanalyze_during_drain")) and st["max"] > 0
    ]
    if analyzed:
        out += ["", f"Autovacuum analyzed tables during some drains of: {', '.join(analyzed)}."]
    return out


def _fewer(r: Report, workload: str, full: int | None) -> list[str]:
    """Notes: rows that ran fewer jobs than the workload's count; peers left out."""
    out = []
    peers = r.cfg.peer_workloads
    if peers is not None and workload not in peers and any(s.peer for s in r.plan.subjects):
        out += ["", f"Quick run: the peers run workload {', '.join(peers)} only."]
    fewer = []
    for s in r.plan.subjects:
        jobs = r.median(s.label, workload, "jobs")
        if full is not None and jobs is not None and round(jobs) != full:
            fewer.append(f"{s.label} {jobs:,.0f}")
    if fewer:
        out += [
            "",
            "Fewer jobs, to keep the run's length in bounds (rates are per second all the "
            f"same): {'; '.join(fewer)}.",
        ]
    return out


def _stream(r: Report) -> list[str]:
    cfg = r.cfg
    out = [
        "",
        f"## B. Streaming: one job per enqueue call for {cfg.stream_seconds:g} s",
        "",
        "One producer process enqueues one job per call, back to back, with the system's "
        "single-job API (as a web handler would: for taskq `await task.enqueue(...)` on its "
        f"App), while one worker process (concurrency {cfg.concurrency}) runs them. Executed/s "
        "counts the jobs finished (per the system's tables) by the time the producer stopped; "
        "backlog is what was still unfinished then, and the last column how long the worker "
        "took to finish it.",
        "",
    ]
    keys = [
        ("enqueue_per_s", "enqueue jobs/s"),
        ("executed_per_s", "executed jobs/s"),
        ("backlog", "backlog at end"),
        ("backlog_drain_seconds", "backlog drained in s"),
    ]
    out += _table(["system"] + [h for _, h in keys], r.rows("B", [k for k, _ in keys]))
    return out + _fewer(r, "B", None)


def _latency(r: Report) -> list[str]:
    cfg = r.cfg
    n = round(cfg.rate * cfg.latency_seconds)
    out = [
        "",
        "## C. Latency: enqueue to start",
        "",
        f"One idle worker process (concurrency {cfg.concurrency}); one producer process "
        f"enqueues one job every {1000 / cfg.rate:g} ms for {cfg.latency_seconds:g} s "
        f"({n:,} jobs). Both ends are read on the database clock: the enqueue "
        "statement's `now()` (as stored in, or returned from, the system's rows) and "
        "`clock_timestamp()` written by the job as it starts.",
        "",
    ]
    keys = [("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"), ("max_ms", "max ms")]
    out += _table(["system"] + [h for _, h in keys], r.rows("C", [k for k, _ in keys]))
    return out + _fewer(r, "C", None)


def _scaling(r: Report) -> list[str]:
    cfg = r.cfg
    out = [
        "",
        f"## D. Scaling: A's drain with several worker processes ({cfg.jobs:,} jobs)",
        "",
        f"Each worker process at concurrency {cfg.concurrency}; all are connected first, then "
        "released together, and the clock starts when the first is ready. The 1-process "
        f"column is A's drain. The machine has {_cpus()} cores, shared with Postgres.",
        "",
    ]
    header = ["system", "1 process (A)"]
    header += [f"{k} processes" for k in cfg.processes]
    header += [f"{k} vs 1" for k in cfg.processes]
    rows = []
    for s in r.plan.subjects:
        if "D" not in r.summ.get(s.label, {}):
            continue
        one = r.median(s.label, "A", "drain_per_s")
        row = [s.label, _cell(r.stats(s.label, "A", "drain_per_s"), cfg.repeat)]
        row += [_cell(r.stats(s.label, "D", f"drain_per_s_{k}"), cfg.repeat) for k in cfg.processes]
        for k in cfg.processes:
            many = r.median(s.label, "D", f"drain_per_s_{k}")
            row.append("n/a" if not one or many is None else f"{many / one:.2f}×")
        rows.append(row)
    return out + _table(header, rows) + _fewer(r, "D", cfg.jobs)


def _cpus() -> str:
    import os

    return str(os.cpu_count())


def _sleepers(r: Report) -> list[str]:
    cfg = r.cfg
    out = [
        "",
        f"## E. {cfg.sleep_jobs:,} sleeping jobs at concurrency {cfg.sleep_concurrency:,}",
        "",
        "Each job's body is a 10 ms sleep (`anyio.sleep` in taskq, `asyncio.sleep` in the "
        f"others); one worker process at concurrency {cfg.sleep_concurrency:,} drains them. "
        "Memory is the worker process's resident set from /proc (MB = 10⁶ bytes): VmRSS when "
        "it was ready, and VmHWM (its peak) when the drain ended. The worker also holds the "
        "benchmark's own tally of the ids it ran (a set of ints, the same in every system).",
        "",
    ]
    keys = [
        ("drain_per_s", "drain jobs/s"),
        ("drain_seconds", "drain s"),
        ("rss_ready_mb", "RSS at ready MB"),
        ("rss_peak_mb", "peak RSS MB"),
    ]
    out += _table(["system"] + [h for _, h in keys], r.rows("E", [k for k, _ in keys]))
    return out + _fewer(r, "E", cfg.sleep_jobs)


def _features(r: Report) -> list[str]:
    cfg = r.cfg
    out = [
        "",
        "## F. taskq: the cost of each feature",
        "",
        f"A's shape ({cfg.jobs:,} jobs enqueued in batches, one worker at concurrency "
        f"{cfg.concurrency}) with one feature in use per row. A job retried once runs twice; "
        "jobs/s counts jobs, not attempts. The history rows are finished jobs of another task "
        "inserted with one `INSERT ... SELECT generate_series` after the schema, then "
        "`VACUUM ANALYZE`, all before the enqueue. Rows (4a)–(4c) set a limit on the drained "
        "queue with `app.queue(...).configure(...)` before the enqueue. (4a)'s global "
        f"concurrency limit equals the worker's concurrency ({cfg.concurrency}), which the "
        "worker's own slots already enforce, so it holds (next to) nothing back and the row is "
        "the cost of the machinery: each claim takes the lock on the queue's settings row and "
        "counts the queue's running jobs. (4b)'s limit of half the worker's concurrency binds: "
        "the drain with at most that many jobs running. (4c)'s rate limit is far above any "
        "drain, so the row is the cost of the sliding window each claim reads and rewrites "
        "(at most about 64 entries per period: entries younger than a 64th of it merge).",
        "",
    ]
    base = r.plan.features[0].label if r.plan.features else ""
    base_rate = r.median(base, "F", "drain_per_s")
    header = ["taskq with", "drain jobs/s", "vs (1)", "worker CPU µs/job", "Postgres CPU µs/job"]
    rows = []
    labels = {s.variant: s.label for s in r.plan.features}
    for variant, what in FEATURES:
        if variant is None:
            rows.append([what, "not built yet", "", "", ""])
            continue
        label = labels.get(variant)
        if label is None or "F" not in r.summ.get(label, {}):
            continue
        rate = r.median(label, "F", "drain_per_s")
        rows.append(
            [
                label,
                _cell(r.stats(label, "F", "drain_per_s"), cfg.repeat),
                "n/a" if not base_rate or rate is None else f"{rate / base_rate:.2f}×",
                _cell(r.stats(label, "F", "worker_cpu_us_per_job"), cfg.repeat),
                _cell(r.stats(label, "F", "server_cpu_us_per_job"), cfg.repeat),
            ]
        )
    return out + _table(header, rows)


def _two_processes(r: Report) -> list[str]:
    cfg = r.cfg
    out = [
        "",
        f"## G. {G_PROCESSES} worker processes: A's drain ({cfg.jobs:,} jobs)",
        "",
        f"A's run (the jobs enqueued with the batch API in batches of {cfg.batch:,}, then "
        f"drained) with {G_PROCESSES} worker processes at concurrency {cfg.concurrency} each, "
        "all connected first and then released together; the clock starts when the first is "
        "ready and stops when Postgres shows no job left. Worker CPU is the user + system "
        f"time of the {G_PROCESSES} worker processes together, Postgres CPU that of all its "
        "processes; cores = CPU seconds per second of drain. The ratios divide medians: by "
        f"the row's own A drain (one process), and by `{FLOOR}`'s G drain.",
        "",
    ]
    header = ["system", "drain jobs/s", "vs A (1 process)", f"vs {FLOOR}", "worker CPU µs/job",
              "worker CPU cores", "Postgres CPU µs/job", "Postgres CPU cores"]  # fmt: skip
    keys = ["worker_cpu_us_per_job", "worker_cpu_cores"]
    keys += ["server_cpu_us_per_job", "server_cpu_cores"]
    floor = r.median(FLOOR, "G", "drain_per_s")
    rows = []
    for s in r.plan.subjects:
        if "G" not in r.summ.get(s.label, {}):
            continue
        rate = r.median(s.label, "G", "drain_per_s")
        rows.append(
            [s.label, _cell(r.stats(s.label, "G", "drain_per_s"), cfg.repeat)]
            + [_ratio(rate, r.median(s.label, "A", "drain_per_s")), _ratio(rate, floor)]
            + [_cell(r.stats(s.label, "G", k), cfg.repeat) for k in keys]
        )
    return out + _table(header, rows) + _fewer(r, "G", cfg.jobs)


def _backlog(r: Report) -> list[str]:
    cfg = r.cfg
    n, m, k = cfg.jobs, cfg.backlog, cfg.backlog_drain
    out = [
        "",
        f"## Q. A deep backlog: {k:,} of {m:,} queued jobs against {n:,} of {n:,}",
        "",
        f"Two cases per repetition, each in a fresh database: {n:,} jobs queued (A's size, "
        f"the shallow case) and {m:,} (the deep case), enqueued with the system's batch API "
        f"in batches of {cfg.batch:,}, then `VACUUM ANALYZE` (a backlog that grew over time "
        "has been vacuumed and analyzed by autovacuum) and a checkpoint. Then one worker "
        f"process (concurrency {cfg.concurrency}) runs {n:,} jobs of the shallow backlog and "
        f"{k:,} of the deep one, timed from its readiness until it has run that many (its "
        "own count; unlike A, whose clock stops when Postgres shows no job left, so the "
        "last write-back is outside both clocks), or for at most "
        f"{cfg.backlog_seconds:g} s: a drain stopped then is timed by the jobs it ran (counted "
        "when it stopped). The two cases alternate in order between repetitions. Afterwards "
        "the runner checks that no job ran twice and that the system's table holds exactly "
        "the jobs that did not run. Deep / shallow is the median (range) of each "
        "repetition's ratio. The A column, when A ran too, is A's drain: the same "
        f"{n:,} jobs without the `VACUUM ANALYZE` (statistics left to autovacuum).",
        "",
    ]
    header = ["system", "A drain jobs/s", f"enqueue of {m:,} jobs/s", f"{n:,} of {n:,} jobs/s",
              f"{k:,} of {m:,} jobs/s", "deep / shallow", "Postgres CPU µs/job, shallow",
              "Postgres CPU µs/job, deep", "worker CPU µs/job, shallow",
              "worker CPU µs/job, deep"]  # fmt: skip
    keys = ["enqueue_per_s_deep", "drain_per_s_shallow", "drain_per_s_deep", "ratio"]
    keys += ["server_cpu_us_per_job_shallow", "server_cpu_us_per_job_deep"]
    keys += ["worker_cpu_us_per_job_shallow", "worker_cpu_us_per_job_deep"]
    rows = r.rows("Q", keys)
    for row in rows:
        row.insert(1, _cell(r.stats(row[0], "A", "drain_per_s"), cfg.repeat))
    out += _table(header, rows)
    for s in r.plan.subjects:
        for case, what in (("shallow", f"{n:,} of {n:,}"), ("deep", f"{k:,} of {m:,}")):
            st = r.stats(s.label, "Q", f"reached_{case}")
            if st is not None and st["min"] < 1:
                ran = r.stats(s.label, "Q", f"jobs_{case}")
                out += ["", f"{s.label}'s drain of {what} was stopped after "
                        f"{cfg.backlog_seconds:g} s in some run(s), having run "
                        f"{_cell(ran, cfg.repeat)} jobs."]  # fmt: skip
    analyzed = [
        s.label
        for s in r.plan.subjects
        for case in ("shallow", "deep")
        if (st := r.stats(s.label, "Q", f"autoanalyze_during_drain_{case}")) and st["max"] > 0
    ]
    if analyzed:
        out += ["", f"Autovacuum analyzed tables during some drains of: {', '.join(analyzed)}."]
    return out


def _history(r: Report, runs: list[dict[str, Any]]) -> list[str]:
    from .systems.taskq_system import PLAN_BATCH, PLAN_ROUNDS

    cfg = r.cfg
    big = cfg.big_history
    out = [
        "",
        f"## H. A big history: {big:,} finished jobs (taskq)",
        "",
        "Two cases per repetition, each in a fresh database: an empty history, and one "
        f"with {big:,} finished jobs of another task, inserted with one `INSERT ... SELECT "
        "generate_series` after the schema (spread over the 5.8 days before the run, inside "
        "the default retention, so pruning deletes none; history partitioned by time, as "
        "since schema version 12, gets the partitions a worker's upkeep would have made, "
        "daily, in both cases), then `VACUUM ANALYZE`. Then A's "
        f"run: {cfg.jobs:,} jobs enqueued in batches of {cfg.batch:,}, a checkpoint, one "
        f"worker process at concurrency {cfg.concurrency}, timed until Postgres shows no job "
        "left. Before the drain, auto_explain records `EXPLAIN (ANALYZE, BUFFERS)` of every "
        "statement that a worker's look-up of the queues holding jobs (`queues`, once per "
        f"poll interval), its claim of {PLAN_BATCH} jobs (`claim()`) and the write-back of "
        "their success (`finish()`) run, nested ones included, with taskq's own statements, "
        f"in a transaction rolled back: the last of {PLAN_ROUNDS} rounds in one session (warm "
        "caches, and past the five custom plans after which plpgsql may switch a statement "
        "to a generic plan, as in a worker's session). The two cases alternate in order "
        "between repetitions.",
        "",
    ]
    header = ["history", "fill s", "history MB", "drain jobs/s", "vs empty", "worker CPU µs/job",
              "Postgres CPU µs/job", "queues buffers", "claim() buffers",
              "finish() buffers"]  # fmt: skip
    rows = []
    for case, what in (("empty", "empty"), ("big", f"{big:,} rows")):
        keys = ["fill_seconds", "history_mb", "drain_per_s"]
        cells = [_cell(r.stats(TASKQ, "H", f"{key}_{case}"), cfg.repeat) for key in keys]
        cells.append("1" if case == "empty" else _cell(r.stats(TASKQ, "H", "ratio"), cfg.repeat))
        keys = ["worker_cpu_us_per_job", "server_cpu_us_per_job", "queues_buffers"]
        keys += ["claim_buffers", "finish_buffers"]
        cells += [_cell(r.stats(TASKQ, "H", f"{key}_{case}"), cfg.repeat) for key in keys]
        rows.append([what, *cells])
    out += _table(header, rows)
    same = r.stats(TASKQ, "H", "plans_same")
    if same is None or not runs:
        return out
    alike = sum(1 for run in runs if run.get("plans_same"))
    out += [
        "",
        "Buffers are shared buffers hit + read by the whole call (its top-level node, which "
        "includes everything the function ran). Plans: every statement the two calls ran "
        f"had the same plan shape with {big:,} rows as with none in {alike} of {len(runs)} "
        "repetition(s). Per statement (the last repetition), the shared buffers hit + read "
        "(dirtied) of its plan's top node:",
        "",
    ]
    last = runs[-1]["plans"]
    rows = []
    for empty, full in zip(last["empty"], last["big"], strict=False):
        rows.append(
            [
                full["call"] if full["call"] == "queues" else f"{full['call']}()",
                f"`{_clip(full['query'], 70)}`",
                _buffers(empty),
                _buffers(full),
                "yes" if empty["shape"] == full["shape"] else "**no**",
            ]
        )
    out += _table(["call", "statement", "empty", f"{big:,} rows", "same plan"], rows, numbers=False)
    out += ["", f"The plans with {big:,} rows in history (last repetition):", "", "```"]
    for entry in last["big"]:
        out += [f"-- {entry['call']}: {_clip(entry['query'], 90)}", *entry["nodes"]]
    return [*out, "```"]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _buffers(entry: dict[str, Any]) -> str:
    b = entry["buffers"]
    return f"{b['hit'] + b['read']:,} ({b['dirtied']:,})"


def _workflows(r: Report) -> list[str]:
    cfg = r.cfg
    n = cfg.workflow_steps
    rep = cfg.repeat
    out = [
        "",
        "## W. taskq: workflows against plain jobs",
        "",
        f"Throughput: one workflow of {n:,} steps (a root, {n - 2:,} parallel steps that each "
        "take the root's result, a join that takes the list of all of theirs) against "
        f"{n:,} no-op jobs enqueued with one `enqueue_many()` call, each in a fresh database "
        f"with one worker process at concurrency {cfg.concurrency}; jobs/s from the enqueue "
        "to the last job finished, on the database clock (`clock_timestamp()` before the "
        "workflow is built or the jobs' arguments bound; the newest `finished_at`). Build "
        "and enqueue are the producer's seconds (the workflow's steps named explicitly).",
        "",
    ]
    w = "W"
    label = TASKQ
    if w not in r.summ.get(label, {}):
        return [*out, "Not run."]

    def cell(key: str) -> str:
        return _cell(r.stats(label, w, key), rep)

    rows = [
        [
            what,
            cell(f"{mode}_jobs_per_s"),
            cell(f"{mode}_build_seconds") if mode == "workflow" else "",
            cell(f"{mode}_enqueue_seconds"),
            cell(f"{mode}_worker_cpu_us_per_job"),
            cell(f"{mode}_server_cpu_us_per_job"),
        ]
        for mode, what in (("plain", "plain jobs"), ("workflow", "fan-out/fan-in workflow"))
    ]
    header = ["jobs", "jobs/s", "build s", "enqueue s", "worker CPU µs/job", "Postgres CPU µs/job"]
    out += _table(header, rows)
    out += ["", f"Workflow / plain: {cell('ratio')}×."]
    k = cfg.workflow_chains
    out += [
        "",
        f"Pickup: an idle worker (concurrency {cfg.concurrency}); every "
        f"{1000 * PICKUP_INTERVAL:g} ms the producer submits, in turn, a plain no-op job "
        f"or a two-step workflow A → B (B takes A's result), {k:,} of each. History's "
        "timestamps (database clock): the plain job's `started_at - enqueued_at`, and "
        "B's `started_at` minus A's `finished_at`. Task bodies: `clock_timestamp()` "
        "written by the tasks (unlogged table) as the plain job's and B's bodies start "
        "and as A's body returns; the plain job's from its `enqueued_at`.",
        "",
    ]
    rows = [
        ["history: plain job, enqueued → started", cell("plain_p50_ms"), cell("plain_p95_ms")],
        ["history: B, A finished → B started", cell("child_p50_ms"), cell("child_p95_ms")],
        ["bodies: plain job, enqueued → body starts", cell("body_plain_p50_ms"),
         cell("body_plain_p95_ms")],
        ["bodies: A's body returns → B's body starts", cell("body_child_p50_ms"),
         cell("body_child_p95_ms")],
    ]  # fmt: skip
    out += _table(["gap", "p50 ms", "p95 ms"], rows)
    out += [
        "",
        f"B claimed in the transaction that recorded A's end (same `now()`): "
        f"{cell('child_in_parents_transaction')} of {k:,}.",
    ]
    return out


def _ratio(mine: float | None, floor: float | None) -> str:
    return "n/a" if not mine or not floor else f"{mine / floor:.2f}×"


def _ratios(r: Report) -> list[str]:
    """Each row / the floor: throughput (higher is better), latency and memory (lower)."""
    labels = [s.label for s in r.plan.subjects]
    if FLOOR not in labels or len(labels) < 2:
        return []
    cols: list[tuple[str, str, str, Callable[[float | None, float | None], str]]] = [
        ("A", "enqueue_per_s", "A enqueue", _ratio),
        ("A", "drain_per_s", "A drain", _ratio),
        ("B", "enqueue_per_s", "B enqueue/s", _ratio),
        ("B", "executed_per_s", "B executed/s", _ratio),
        ("C", "p50_ms", "C p50 (Δ ms)", _delta),
        ("C", "p99_ms", "C p99", _ratio),
        ("D", f"drain_per_s_{r.cfg.processes[0]}", f"D {r.cfg.processes[0]} processes", _ratio),
        ("G", "drain_per_s", "G drain", _ratio),
        ("E", "drain_per_s", "E drain", _ratio),
        ("E", "rss_peak_mb", "E peak RSS", _ratio),
    ]
    cols = [c for c in cols if c[0] in r.summ.get(FLOOR, {})]
    if not cols:
        return []
    rows = []
    for label in labels:
        if label == FLOOR:
            continue
        rows.append(
            [label] + [fn(r.median(label, w, k), r.median(FLOOR, w, k)) for w, k, _, fn in cols]
        )
    out = ["", f"## Ratios to `{FLOOR}` (medians)", ""]
    out += _table(["system", *(c[2] for c in cols)], rows)
    if TASKQ in labels and "A" in r.summ.get(TASKQ, {}):
        peers = [lb for lb in labels if lb not in (TASKQ, FLOOR)]
        mine = r.median(TASKQ, "A", "drain_per_s")
        if peers:
            out += ["", "taskq's A drain against each peer's (medians): " + ", ".join(
                f"{_ratio(mine, r.median(p, 'A', 'drain_per_s'))} {p}" for p in peers
            ) + "."]  # fmt: skip
    return out


def _delta(mine: float | None, floor: float | None) -> str:
    return "n/a" if mine is None or floor is None else f"{mine - floor:+.2f}"


def _targets(r: Report) -> list[str]:
    """taskq's targets, each against the measured medians."""
    if TASKQ not in r.summ:
        return []
    m = r.median
    rows: list[list[str]] = []

    def add(target: str, value: float | None, shown: str, ok: bool | None) -> None:
        verdict = "n/a" if value is None or ok is None else ("yes" if ok else "**no**")
        rows.append([target, shown if value is not None else "n/a", verdict])

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    q = ratio(m(TASKQ, "A", "drain_per_s"), m(FLOOR, "A", "drain_per_s"))
    add("A drain ≥ 0.7× minimal", q, f"{q or 0:.2f}×", q is not None and q >= 0.7)
    q = ratio(m(TASKQ, "A", "drain_per_s"), m(PGQ_TUNED, "A", "drain_per_s"))
    add("A drain ≥ 2× pgqueuer (tuned)", q, f"{q or 0:.2f}×", q is not None and q >= 2)
    q = ratio(m(TASKQ, "A", "server_cpu_us_per_job"), m(FLOOR, "A", "server_cpu_us_per_job"))
    add("A drain's Postgres CPU per job ≤ 1.5× minimal's", q, f"{q or 0:.2f}×",
        q is not None and q <= 1.5)  # fmt: skip
    q = ratio(m(TASKQ, "A", "enqueue_per_s"), m(FLOOR, "A", "enqueue_per_s"))
    add("A enqueue ≥ 0.9× minimal", q, f"{q or 0:.2f}×", q is not None and q >= 0.9)
    q = ratio(m(TASKQ, "B", "enqueue_per_s"), m(FLOOR, "B", "enqueue_per_s"))
    add("B enqueue/s ≥ 0.9× minimal", q, f"{q or 0:.2f}×", q is not None and q >= 0.9)
    backlog, jobs = m(TASKQ, "B", "backlog"), m(TASKQ, "B", "jobs")
    add(
        "B backlog near zero (≤ 1% of the jobs enqueued)",
        backlog,
        f"{backlog or 0:,.0f} of {jobs or 0:,.0f} (minimal: {m(FLOOR, 'B', 'backlog') or 0:,.0f})",
        None if backlog is None or not jobs else backlog <= 0.01 * jobs,
    )
    mine, floor = m(TASKQ, "C", "p50_ms"), m(FLOOR, "C", "p50_ms")
    d = None if mine is None or floor is None else mine - floor
    add("C p50 within 0.3 ms of minimal", d, f"{d or 0:+.2f} ms", d is not None and d <= 0.3)
    p99 = m(TASKQ, "C", "p99_ms")
    add("C p99 < 5 ms", p99, f"{p99 or 0:.2f} ms", p99 is not None and p99 < 5)
    two = r.cfg.processes[0]
    q = ratio(m(TASKQ, "D", f"drain_per_s_{two}"), m(TASKQ, "A", "drain_per_s"))
    add(f"D drain grows from 1 to {two} processes", q, f"{q or 0:.2f}×", q is not None and q > 1)
    rss = m(TASKQ, "E", "rss_peak_mb")
    add(
        f"E peak worker RSS < 150 MB at concurrency {r.cfg.sleep_concurrency:,}",
        rss,
        f"{rss or 0:.0f} MB",
        rss is not None and rss < 150,
    )
    q = m(TASKQ, "W", "ratio")
    add("W workflow jobs/s ≥ 0.7× plain", q, f"{q or 0:.2f}×", q is not None and q >= 0.7)
    d = m(TASKQ, "W", "pickup_p50_delta_ms")
    add("W released child's pickup p50 within 1 ms of a plain job's", d, f"{d or 0:+.2f} ms",
        d is not None and d <= 1.0)  # fmt: skip
    d = m(TASKQ, "W", "body_p50_delta_ms")
    add("W the same, seen from the task bodies", d, f"{d or 0:+.2f} ms",
        d is not None and d <= 1.0)  # fmt: skip
    cfg = r.cfg
    q = m(TASKQ, "Q", "ratio")
    add(f"Q {cfg.backlog_drain:,} of {cfg.backlog:,} queued ≥ 0.8× {cfg.jobs:,} of {cfg.jobs:,}",
        q, f"{q or 0:.2f}×", q is not None and q >= 0.8)  # fmt: skip
    q = m(TASKQ, "H", "ratio")
    add(f"H drain with {cfg.big_history:,} in history ≥ 0.9× with none", q, f"{q or 0:.2f}×",
        q is not None and q >= 0.9)  # fmt: skip
    same = r.stats(TASKQ, "H", "plans_same")
    add("H claim and write-back plans unchanged", same and same["min"],
        "in every run" if same and same["min"] == 1 else "changed in some run",
        same is not None and same["min"] == 1)  # fmt: skip
    out = ["", "## taskq's targets (medians)", ""]
    return out + _table(["target", "measured", "met"], rows, numbers=False)


def load(data: dict[str, Any]) -> tuple[Config, Plan]:
    """The configuration and plan of a run, from its ``latest.json``."""
    names = {f.name for f in dataclasses.fields(Config)}
    c = {k: v for k, v in data["config"].items() if k in names}
    c["processes"] = tuple(c.get("processes") or (2, 4))
    if c.get("peer_workloads") is not None:
        c["peer_workloads"] = tuple(c["peer_workloads"])
    if c.get("profile_dir") is not None:
        c["profile_dir"] = Path(c["profile_dir"])
    p = data["plan"]
    plan = Plan(
        subjects=[Subject(**s) for s in p["subjects"]],
        features=[Subject(**s) for s in p["features"]],
        skipped=p["skipped"],
        versions=p["versions"],
        settings=p["settings"],
    )
    return Config(**c), plan


#: Settings a workload's own rows depend on, taken with the runs of that workload.
_OWN = {"Q": ("backlog", "backlog_drain", "backlog_seconds"), "H": ("big_history",)}


def merge(datas: list[dict[str, Any]]) -> tuple[dict[str, Any], list[tuple[str, str, list[str]]]]:
    """One run's data with the workloads that only later runs measured added to it.

    A workload the first run has keeps the first run's results (so that every ratio
    in a table compares runs made side by side); the second and later runs only add
    rows and workloads. Returns the merged data and, for each later run that added
    something, when it ran, its command and what was taken from it.
    """
    first = datas[0]
    cfg, plan = load(first)
    also: list[tuple[str, str, list[str]]] = [
        (m["measured"], m["command"], m["workloads"]) for m in first.get("merged", [])
    ]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        label: dict(w) for label, w in first["runs"].items()
    }
    workloads = set(cfg.workloads)
    own: dict[str, Any] = {}
    env = {k: dict(v) for k, v in first["environment"].items()}
    for data in datas[1:]:
        c, p = load(data)
        taken: set[str] = set()
        for label, by_workload in data["runs"].items():
            for workload, results in by_workload.items():
                if results and workload not in runs.get(label, {}):
                    runs.setdefault(label, {})[workload] = results
                    taken.add(workload)
        known = {s.label for s in plan.subjects}
        plan.subjects += [s for s in p.subjects if s.label not in known]
        known = {s.label for s in plan.features}
        plan.features += [s for s in p.features if s.label not in known]
        for name, found in p.versions.items():
            plan.versions.setdefault(name, found)
        for name, text in p.settings.items():
            plan.settings.setdefault(name, text)
        for workload in taken:
            own.update({k: getattr(c, k) for k in _OWN.get(workload, ())})
        if taken:
            workloads |= taken
            also.append((data["measured"], data["command"], sorted(taken)))
            # The later run's own length and load, beside the first run's.
            what = ", ".join(sorted(taken))
            for key, value in data["environment"].get("machine", {}).items():
                if key.startswith(("wall time", "load average", "taskq_commit")):
                    env.setdefault("machine", {})[f"{key} ({what})"] = value
    cfg = dataclasses.replace(cfg, workloads=sorted(workloads), **own)
    merged = {**first, "config": cfg, "plan": plan, "runs": runs, "summary": summary(runs),
              "environment": env}  # fmt: skip
    if also:
        merged["merged"] = [{"measured": a, "command": b, "workloads": w} for a, b, w in also]
    return merged, also
