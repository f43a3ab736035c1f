"""The Postgres server the run uses, and the facts that make numbers comparable."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

ROOT = Path(__file__).resolve().parent.parent
DSN_ENV = "TASKQ_BENCH_DSN"
SETTINGS = (
    "shared_buffers",
    "synchronous_commit",
    "fsync",
    "full_page_writes",
    "wal_level",
    "max_wal_size",
    "max_connections",
)


class BenchmarkError(Exception):
    """The run cannot be trusted: a process failed, or jobs were lost or doubled."""


@dataclass
class Server:
    dsn: str  # maintenance database: benchmark databases are created from here
    embedded: bool
    data_dir: Path | None  # known when embedded, or readable on this machine


@contextlib.contextmanager
def server(dsn: str | None) -> Iterator[Server]:
    """The given server, or a throwaway embedded one in a temporary directory."""
    dsn = dsn or os.environ.get(DSN_ENV)
    if dsn:
        yield Server(dsn, embedded=False, data_dir=None)
        return
    from taskq import _embedded

    with tempfile.TemporaryDirectory(prefix="taskq-bench-") as tmp:
        srv = _embedded.ensure_server(Path(tmp) / "data")
        try:
            yield Server(srv.dsn, embedded=True, data_dir=srv.data_dir)
        finally:
            srv.stop()


def database_dsn(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise BenchmarkError("the DSN must be a postgresql:// URL (key=value DSNs unsupported)")
    return urlunsplit(parts._replace(path="/" + database))


async def server_facts(conn: asyncpg.Connection, srv: Server) -> dict[str, str]:
    facts = {"version": await conn.fetchval("SELECT version()")}
    for name in SETTINGS:
        facts[name] = await conn.fetchval(f"SHOW {name}")
    facts["embedded"] = "yes (temporary data directory)" if srv.embedded else "no (--dsn)"
    if srv.data_dir is None:
        # A local server we may be able to watch: needs pg_read_all_settings.
        with contextlib.suppress(asyncpg.PostgresError):
            data_dir = Path(await conn.fetchval("SHOW data_directory"))
            if (data_dir / "postmaster.pid").is_file():
                srv.data_dir = data_dir
    return facts


def machine_facts() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "taskq_commit": _git_revision(),
    }


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "taskq"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{rev or 'unknown'}{' + uncommitted changes in taskq/' if dirty else ''}"


def postmaster(srv: Server) -> psutil.Process | None:
    if srv.data_dir is None:
        return None
    try:
        pid = int((srv.data_dir / "postmaster.pid").read_text().split()[0])
        return psutil.Process(pid)
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def cpu_seconds(proc: psutil.Process | None, *, children: bool = False) -> float | None:
    """User + system CPU of a process (and its direct children: Postgres backends)."""
    if proc is None:
        return None
    total = 0.0
    procs = [proc, *proc.children()] if children else [proc]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total
