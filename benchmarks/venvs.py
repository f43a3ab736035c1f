"""Each peer's own virtualenv, made on demand from pinned versions.

A peer (pgqueuer, procrastinate) runs in ``<cache>/<name>-<version>``, where
the cache is ``$TASKQ_BENCH_VENVS`` or ``~/.cache/taskq-bench/venvs``. The
virtualenv gets the peer's pinned requirements plus the harness's own imports
(asyncpg, orjson, uvloop, psutil) pinned to the versions the runner uses. A
``requirements.txt`` written last marks a complete virtualenv; one without it,
or with other requirements, is made again. Nothing here ever fails a run: a
virtualenv that cannot be made (no network, a timeout) is reported, and the
peer skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .systems import Venv

CACHE_ENV = "TASKQ_BENCH_VENVS"
#: The agent's imports, at the runner's versions.
HARNESS = ("asyncpg", "orjson", "uvloop", "psutil")


class VenvUnavailable(Exception):
    """The virtualenv does not exist and could not be made."""


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "taskq-bench" / "venvs"


def requirements(spec: Venv) -> list[str]:
    return [*spec.requirements, *(f"{n}=={importlib.metadata.version(n)}" for n in HARNESS)]


def ensure(
    spec: Venv, *, timeout: float, log: Callable[[str], None], pip_args: tuple[str, ...] = ()
) -> str:
    """The virtualenv's interpreter, making the virtualenv first if needed."""
    root = cache_dir() / spec.dirname
    python = root / "bin" / "python"
    stamp = root / "requirements.txt"
    wanted = "\n".join(requirements(spec)) + "\n"
    if _complete(python, stamp, wanted):
        return str(python)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.with_name(root.name + ".lock")):
        if _complete(python, stamp, wanted):  # another run made it meanwhile
            return str(python)
        log(f"making the {spec.dirname} virtualenv in {root} (at most {timeout:.0f} s)")
        started = time.monotonic()
        shutil.rmtree(root, ignore_errors=True)
        try:
            _run([sys.executable, "-m", "venv", str(root)], timeout)
            left = timeout - (time.monotonic() - started)
            pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
            pip += pip_args
            _run([*pip, *requirements(spec)], left)
        except VenvUnavailable:
            shutil.rmtree(root, ignore_errors=True)
            raise
        stamp.write_text(wanted)
        log(f"made {spec.dirname} in {time.monotonic() - started:.0f} s")
    return str(python)


def _complete(python: Path, stamp: Path, wanted: str) -> bool:
    try:
        return python.exists() and stamp.read_text() == wanted
    except OSError:
        return False


def _run(cmd: list[str], timeout: float) -> None:
    if timeout <= 0:
        raise VenvUnavailable("out of time")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VenvUnavailable(f"`{' '.join(cmd[:4])} ...` took over {timeout:.0f} s") from None
    except OSError as exc:
        raise VenvUnavailable(f"cannot run {cmd[0]}: {exc}") from None
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise VenvUnavailable(f"`{' '.join(cmd[:4])} ...` failed: {' / '.join(tail)}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
