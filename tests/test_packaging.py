"""taskq as its users get it.

Every install instruction names the distribution (``taskq-pg``; the import
package is ``taskq``); the version has one source; the sdist and the wheel
hold the whole package; and the wheel, installed (not editable) in a fresh
virtualenv and run from outside the checkout, answers ``--version``, runs the
demo, and runs a real job in a ``worker`` process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import taskq
from taskq._version import DISTRIBUTION

from .conftest import ROOT

# -- the install name ------------------------------------------------------------------

# The old spellings: extras on the bare name (`taskq[metrics]`), a requirement
# with a version (`"taskq>=0.1"`), and metadata looked up by the bare name.
_OLD_EXTRAS = re.compile(r"(?<![\w.-])taskq\[")
_OLD_REQUIREMENT = re.compile(r"""["']taskq(?:\[[^\]]*\])?\s*(?:[<>=!~]=?|@)""")
_OLD_METADATA = re.compile(
    r"""\b(?:version|distribution|metadata|requires|files)\(\s*["']taskq["']\s*\)"""
)
# `pip install A B ...` up to the end of the shell command.
_PIP_INSTALL = re.compile(r"pip3? install\b([^\n`&;|)]*)")
_BARE_NAME = re.compile(r"taskq(?:\[[^\]]*\])?(?:[<>=!~].*)?")

# Where install instructions, messages and metadata lookups live.
_SCANNED = [
    "README.md",
    "CHANGELOG.md",
    "pyproject.toml",
    ".ci/run",
    "docs/**/*.md",
    "examples/**/*",
    "taskq/**/*.py",
    "benchmarks/**/*.py",
]


def old_install_names(text: str) -> list[tuple[int, str]]:
    """(line number, line) of each place that installs or looks up ``taskq`` by its old name."""
    hits = []
    for number, line in enumerate(text.splitlines(), start=1):
        found = any(p.search(line) for p in (_OLD_EXTRAS, _OLD_REQUIREMENT, _OLD_METADATA))
        for command in _PIP_INSTALL.finditer(line):
            words = [w.strip("'\"") for w in command[1].split()]
            found = found or any(_BARE_NAME.fullmatch(w) for w in words if not w.startswith("-"))
        if found:
            hits.append((number, line.strip()))
    return hits


def scanned_files() -> Iterator[Path]:
    for pattern in _SCANNED:
        for path in sorted(ROOT.glob(pattern)):
            if path.is_file() and "__pycache__" not in path.parts:
                yield path


def test_install_instructions_use_the_distribution_name() -> None:
    hits = []
    for path in scanned_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        name = path.relative_to(ROOT)
        hits += [f"{name}:{number}: {line}" for number, line in old_install_names(text)]
    assert not hits, f"install with '{DISTRIBUTION}', not 'taskq':\n" + "\n".join(hits)


@pytest.mark.parametrize(
    "line",
    [
        "pip install taskq",
        "$ pip install 'taskq[metrics]'",
        'pip install --upgrade "taskq[embedded,otel]>=0.1"',
        "python -m pip install -q taskq==0.1.0 && python -m taskq demo",
        "Needs the ``otel`` extra (``pip install 'taskq[otel]'``).",
        "needs `taskq[embedded]`, `fastapi` and `uvicorn`",
        'dependencies = ["taskq>=0.1"]',
        'dev = ["taskq[embedded,metrics,otel]"]',
        'importlib.metadata.version("taskq")',
        "pip install fastapi taskq uvicorn",
    ],
)
def test_the_old_name_is_caught(line: str) -> None:
    assert old_install_names(f"first line\n{line}\n") == [(2, line.strip())]


@pytest.mark.parametrize(
    "line",
    [
        "pip install taskq-pg",
        "pip install 'taskq-pg[metrics]'",
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[embedded]' && "
        "python -m taskq demo",
        'dependencies = ["taskq-pg[embedded]>=0.1"]',
        'importlib.metadata.version("taskq-pg")',
        "import taskq",
        'logging.getLogger("taskq")',
        "python -m taskq worker myproject.jobs:app",
        "pip install fastapi uvicorn",
    ],
)
def test_the_new_name_and_other_uses_of_taskq_pass(line: str) -> None:
    assert old_install_names(line) == []


def test_the_version_has_one_source() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["name"] == DISTRIBUTION == "taskq-pg"
    assert project["project"]["dynamic"] == ["version"]
    assert "version" not in project["project"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "taskq._version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", taskq.__version__)
    assert f"## [{taskq.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


# -- the built distributions -----------------------------------------------------------

# Left out of the copy that is built: nothing in them goes into a distribution.
_NOT_COPIED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "site",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".benchmarks",
)


@dataclass(frozen=True)
class Built:
    wheel: Path
    sdist: Path
    #: Paths of the package's files in the source tree, relative to ROOT.
    package_files: frozenset[str]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The sdist, and the wheel built from it, of a copy of the checkout.

    A copy, so that building writes nothing (egg-info) into the checkout.
    ``--no-isolation``: the dev extra brings setuptools and build, so nothing
    is downloaded.
    """
    base = tmp_path_factory.mktemp("build")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_COPIED)
    out = base / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    package_files = frozenset(
        str(p.relative_to(source))
        for p in (source / "taskq").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return Built(wheel, sdist, package_files)


def test_wheel_holds_every_module_the_migrations_and_py_typed(built: Built) -> None:
    version = taskq.__version__
    assert built.wheel.name == f"taskq_pg-{version}-py3-none-any.whl"
    info = f"taskq_pg-{version}.dist-info"
    with zipfile.ZipFile(built.wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    missing = built.package_files - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert {p for p in names if p.startswith("taskq/migrations/") and p.endswith(".sql")} == {
        p for p in built.package_files if p.startswith("taskq/migrations/") and p.endswith(".sql")
    }
    assert len([p for p in names if p.endswith(".sql")]) >= 3
    for needed in [
        "taskq/py.typed",
        "taskq/__main__.py",
        "taskq/cli/__init__.py",
        "taskq/cli/demo_jobs.py",
        "taskq/_embedded.py",
        "taskq/_version.py",
        "taskq/contrib/__init__.py",
        "taskq/contrib/fastapi.py",
        "taskq/contrib/prometheus.py",
    ]:
        assert needed in names
    assert f"{info}/licenses/LICENSE" in names
    assert "\nName: taskq-pg\n" in metadata
    assert f"\nVersion: {version}\n" in metadata
    assert "\nLicense-Expression: MIT\n" in metadata
    assert "Provides-Extra: embedded" in metadata
    assert "taskq = taskq.cli:main" in entry_points
    # Only the package: no tests, examples or benchmarks installed beside it.
    assert {n.split("/")[0] for n in names} == {"taskq", info}


def test_sdist_holds_the_package_readme_changelog_and_license(built: Built) -> None:
    top = f"taskq_pg-{taskq.__version__}"
    assert built.sdist.name == f"{top}.tar.gz"
    with tarfile.open(built.sdist) as archive:
        names = {n.removeprefix(f"{top}/") for n in archive.getnames()}
    missing = built.package_files - names
    assert not missing, f"not in the sdist: {sorted(missing)}"
    for needed in ["README.md", "CHANGELOG.md", "LICENSE", "pyproject.toml", "PKG-INFO"]:
        assert needed in names
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "Copyright (c) 2026 the taskq authors" in (ROOT / "LICENSE").read_text()


# -- the wheel installed in a fresh virtualenv -----------------------------------------


@dataclass(frozen=True)
class Installed:
    venv: Path
    python: Path
    #: A directory outside the checkout to run from.
    workdir: Path
    #: The environment to run with: no PYTHONPATH, no virtualenv of ours.
    env: dict[str, str]


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """``pip install '<wheel>[embedded]'`` into a new virtualenv (dependencies from the index)."""
    base = tmp_path_factory.mktemp("installed")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        and not k.startswith("TASKQ_")
    }
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"{built.wheel}[embedded]"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    workdir = base / "work"
    workdir.mkdir()
    return Installed(venv, python, workdir, env)


def run_in(
    installed: Installed, *args: str, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args),
        cwd=installed.workdir,
        env={**installed.env, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_installed_package_comes_from_the_virtualenv(installed: Installed) -> None:
    assert not str(installed.workdir.resolve()).startswith(str(ROOT))
    done = run_in(
        installed,
        str(installed.python),
        "-c",
        "import importlib.metadata as m, json, taskq; "
        "print(json.dumps([taskq.__file__, taskq.__version__, m.version('taskq-pg')]))",
    )
    assert done.returncode == 0, done.stderr
    where, version, dist_version = json.loads(done.stdout)
    assert Path(where).resolve().is_relative_to(installed.venv.resolve())
    assert Path(where).parent.joinpath("migrations", "0001_initial.sql").is_file()
    assert version == dist_version == taskq.__version__


def test_installed_cli_prints_the_version(installed: Installed) -> None:
    expected = f"taskq-pg {taskq.__version__}\n"
    by_module = run_in(installed, str(installed.python), "-m", "taskq", "--version")
    assert (by_module.returncode, by_module.stdout) == (0, expected), by_module.stderr
    by_script = run_in(installed, str(installed.venv / "bin" / "taskq"), "--version")
    assert (by_script.returncode, by_script.stdout) == (0, expected), by_script.stderr


def test_installed_demo_runs_on_the_embedded_postgres(installed: Installed) -> None:
    # As on a fresh machine: no DSN anywhere, so the demo starts the embedded
    # Postgres that the installed `embedded` extra ships (in a home of its own).
    home = installed.workdir / "taskq-home"
    try:
        done = run_in(
            installed,
            str(installed.python),
            "-m",
            "taskq",
            "demo",
            "--jobs",
            "60",
            timeout=300,
            TASKQ_HOME=str(home),
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"embedded Postgres: data in {home / 'postgres'}" in done.stdout
        assert "60 jobs in" in done.stdout
        assert "summary" in done.stdout and "dead letter" in done.stdout
        assert "Traceback" not in done.stderr
    finally:
        stopped = run_in(
            installed,
            str(installed.python),
            "-m",
            "taskq",
            "embedded",
            "stop",
            TASKQ_HOME=str(home),
        )
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


_JOBS_MODULE = '''\
"""Tasks of the packaging test, run by the installed `python -m taskq worker`."""

import os

import taskq

app = taskq.App()  # $TASKQ_DSN and $TASKQ_SCHEMA


@app.task(name="pkg.where")
async def where(n: int) -> dict:
    return {"n": n, "taskq": taskq.__file__, "pid": os.getpid()}
'''

_ENQUEUE_AND_WAIT = """\
import asyncio, json, pkgjobs

async def main():
    async with pkgjobs.app:
        job = await pkgjobs.where.enqueue(n=7)
        print(json.dumps(await job.result(timeout=60)))

asyncio.run(main())
"""


def test_installed_worker_runs_a_job_and_stops_on_sigterm(
    installed: Installed, pg_dsn: str, schema: str
) -> None:
    (installed.workdir / "pkgjobs.py").write_text(_JOBS_MODULE)
    env = {**installed.env, "TASKQ_DSN": pg_dsn, "TASKQ_SCHEMA": schema}
    log = installed.workdir / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [str(installed.python), "-m", "taskq", "worker", "pkgjobs:app", "-c", "2"],
            cwd=installed.workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        done = run_in(installed, str(installed.python), "-c", _ENQUEUE_AND_WAIT, timeout=120, **env)
        assert done.returncode == 0, done.stderr + log.read_text()
        result = json.loads(done.stdout)
        assert result["n"] == 7
        assert result["pid"] == worker.pid
        assert Path(result["taskq"]).resolve().is_relative_to(installed.venv.resolve())
        # It ran the job, so it is up, with its signal handlers installed.
        assert " started: concurrency 2" in log.read_text()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    output = log.read_text()
    assert "SIGTERM received" in output
    assert "worker stopped: 1 succeeded, 0 failed" in output
