"""The benchmark runner (``python -m benchmarks``): its options, and a short run of the
workloads issue 17 added (G, Q, H) that goes through every step of each.

The figures themselves are recorded in docs/benchmarks.md, never asserted here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks import __main__ as bench
from benchmarks import report, runner
from benchmarks.systems.taskq_system import _explained


def test_default_workloads_leave_out_the_long_ones() -> None:
    cfg, _ = bench.parse_args([])
    assert "G" in cfg.workloads
    assert not {"Q", "H"} & set(cfg.workloads)
    assert (cfg.backlog, cfg.backlog_drain, cfg.big_history) == (1_000_000, 20_000, 10_000_000)

    quick, _ = bench.parse_args(["--quick"])
    assert quick.workloads == cfg.workloads
    assert (quick.jobs, quick.backlog, quick.backlog_drain) == (5_000, 50_000, 5_000)
    assert quick.big_history == 100_000


def test_large_table_options() -> None:
    cfg, _ = bench.parse_args(
        ["--workloads", "q,h,g", "--jobs", "300", "--backlog", "4000", "--backlog-drain",
         "2000", "--backlog-seconds", "5", "--big-history", "7000"]
    )  # fmt: skip
    assert cfg.workloads == ["G", "H", "Q"]
    assert (cfg.jobs, cfg.backlog, cfg.backlog_drain) == (300, 4_000, 2_000)
    assert (cfg.backlog_seconds, cfg.big_history) == (5.0, 7_000)
    # The deep drain defaults to A's count.
    cfg, _ = bench.parse_args(["--workloads", "Q", "--jobs", "300", "--backlog", "4000"])
    assert cfg.backlog_drain == 300


@pytest.mark.parametrize(
    "argv",
    [
        ["--workloads", "Q", "--backlog", "100", "--backlog-drain", "200"],
        ["--workloads", "Q", "--backlog", "100", "--jobs", "200"],
        ["--big-history", "-5"],
        ["--backlog-seconds", "-1"],
        ["--workloads", "A,Z"],
    ],
)
def test_bad_options(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_plans_belong_to_the_call_logged_after_them() -> None:
    def notice(query: str, node: dict[str, object]) -> str:
        import json

        return "duration: 0.1 ms  plan:\n" + json.dumps({"Query Text": query, "Plan": node})

    scan = {"Node Type": "Index Scan", "Index Name": "jobs_claim", "Relation Name": "jobs",
            "Shared Hit Blocks": 3, "Actual Rows": 10, "Actual Loops": 1}  # fmt: skip
    update = {"Node Type": "ModifyTable", "Operation": "Update", "Relation Name": "jobs",
              "Shared Hit Blocks": 40, "Plans": [scan]}  # fmt: skip
    call = {"Node Type": "Function Scan", "Function Name": "claim", "Shared Hit Blocks": 45}
    entries = _explained(
        {"claim": "SELECT * FROM claim($1)", "finish": "SELECT finish($1)"},
        [
            notice("UPDATE jobs  SET ...", update),
            notice("SELECT *\n FROM claim($1)", call),
            notice("SELECT finish($1)", {"Node Type": "Result"}),
        ],
    )
    assert [(e["call"], e["top"]) for e in entries] == [
        ("claim", False),
        ("claim", True),
        ("finish", True),
    ]
    assert entries[0]["shape"] == ["Update on jobs", "  Index Scan using jobs_claim on jobs"]
    assert entries[1]["buffers"]["hit"] == 45
    assert runner.statement_buffers(entries) == {"claim": 45, "finish": 0}
    assert runner.same_plans(entries, entries)
    assert not runner.same_plans(entries, entries[1:])


def test_two_processes_deep_backlog_and_big_history_run(
    pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """G, Q and H in --quick form at a small size: each step runs, each check passes."""
    status = bench.main(
        ["--quick", "--dsn", pg_dsn, "--systems", "minimal,taskq", "--workloads", "G,Q,H",
         "--jobs", "200", "--backlog", "2000", "--big-history", "3000"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    assert "## G. 2 worker processes: A's drain (200 jobs)" in out
    assert "## Q. A deep backlog: 200 of 2,000 queued jobs against 200 of 200" in out
    assert "## H. A big history: 3,000 finished jobs (taskq)" in out
    g = out.split("## G.")[1].split("\n## ")[0]
    assert "| minimal |" in g and "| taskq |" in g
    q = out.split("## Q.")[1].split("\n## ")[0]
    assert "| minimal |" in q and "| taskq |" in q
    assert "| G drain |" in out.split("## Ratios")[1]
    # Every statement of the claim and the write-back kept its plan with 3,000 rows.
    assert "| H claim and write-back plans unchanged | in every run | yes |" in out


def test_render_adds_the_workloads_a_later_run_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--render full.json long.json``: one report, each workload from the run that has it."""
    here = sys.executable
    plan = runner.Plan(
        subjects=[runner.Subject("minimal", "", "minimal", here),
                  runner.Subject("taskq", "", "taskq", here)],
        features=[], skipped={}, versions={}, settings={},
    )  # fmt: skip

    def data(argv: list[str], when: str, runs: dict[str, Any]) -> Path:
        cfg, _ = bench.parse_args(["--systems", "minimal,taskq", *argv])
        path = tmp_path / f"{when}.json"
        path.write_bytes(orjson.dumps(
            {"measured": when, "command": "python -m benchmarks " + " ".join(argv),
             "config": cfg, "plan": plan, "summary": report.summary(runs), "runs": runs,
             "environment": {"server": {}, "machine": {}}},
            option=orjson.OPT_SERIALIZE_DATACLASS, default=str,
        ))  # fmt: skip
        return path

    def a(drain: float, cpu: float) -> list[dict[str, float]]:
        return [{"drain_per_s": drain, "enqueue_per_s": 1_000.0, "server_cpu_us_per_job": cpu}]

    full = data(["--workloads", "A"], "first", {
        "minimal": {"A": a(1_000.0, 40.0)}, "taskq": {"A": a(800.0, 50.0)}})  # fmt: skip
    q = {"drain_per_s_shallow": 500.0, "drain_per_s_deep": 450.0, "ratio": 0.9}
    # A feature row and a peer that only the second run has, with their versions.
    plan.features.append(runner.Subject("taskq", runner.FEATURES[0][0] or "", "(1) base", here))
    plan.subjects.append(runner.Subject("pgqueuer", "", "pgqueuer (x)", here))
    plan.versions["pgqueuer"] = {"packages": {"pgqueuer": "9.9"}}
    long = data(["--workloads", "A,Q,F", "--backlog", "60000"], "second", {
        "minimal": {"A": a(10.0, 1.0), "Q": [q]},
        "taskq": {"A": a(1.0, 1.0), "Q": [q]},
        "(1) base": {"F": [{"drain_per_s": 700.0}]},
        "pgqueuer (x)": {"A": a(100.0, 9.0)}})  # fmt: skip

    assert bench.main(["--render", str(full), str(long)]) == 0
    out = capsys.readouterr().out
    assert "Measured first with `python -m benchmarks --workloads A`." in out
    assert "Workloads A, F, Q: measured second with `python -m benchmarks --workloads A,Q" in out
    # A from the first run only (0.80x, 1.25x), Q and its setting from the second.
    assert "| A drain ≥ 0.7× minimal | 0.80× | yes |" in out
    assert "| A drain's Postgres CPU per job ≤ 1.5× minimal's | 1.25× | yes |" in out
    assert "| Q 20,000 of 60,000 queued ≥ 0.8× 20,000 of 20,000 | 0.90× | yes |" in out
    assert "## Q. A deep backlog: 20,000 of 60,000 queued jobs" in out
    assert "## F. taskq: the cost of each feature" in out and "| 700 |" in out
    assert "| pgqueuer (x) | 1,000 | 100 |" in out

    assert bench.main(["--render", str(tmp_path / "missing.json")]) == 1
