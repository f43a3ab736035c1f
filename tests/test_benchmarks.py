"""The benchmark runner (``python -m benchmarks``): its options, and a short run of the
workloads issue 17 added (G, Q, H) that goes through every step of each.

The figures themselves are recorded in docs/benchmarks.md, never asserted here.
"""

from __future__ import annotations

import pytest

from benchmarks import __main__ as bench
from benchmarks import runner
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
