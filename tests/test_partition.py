"""A real network partition: a worker in its own network namespace, cut off past its lease.

The worker runs in a network namespace of the test's own (``ip netns``),
joined to the root namespace by a veth pair with addresses in 10.231.7.0/30.
It reaches the suite's Postgres through a small TCP relay that this test runs
on the root side's address. Once it holds ten jobs, the link is cut (every
packet dropped, in both directions, by a zero-length queue on each end; the
link stays up, as in a real partition) for longer than the lease, while a
second worker in the root namespace runs. Then:

- the cut-off worker cancels its long jobs itself, at 75% of the lease,
  before the other worker starts any of them;
- the other worker rescues every job once the lease expired and finishes it,
  each job exactly once in history;
- after the link heals, the cut-off worker's late writes (outcomes of the
  short jobs it finished while cut off, lease renewals) are fenced off: no
  row of history changes, not even its xmin.

Network safety: the only traffic is between this machine's root namespace
and the namespace made here. While the namespace exists a blackhole route
covers all of 10.231.0.0/16 in the root namespace, so no packet for the test
subnet can leave through the default route while the link is down. The
namespace, the veth pair and the route are removed in a ``finally`` (and
leftovers of a crashed run, by their exact names, before starting). Runs of
this test on one machine take turns on a lock file.

Needs root and iproute2 (``ip``, ``tc``); skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import taskq

from .conftest import PYTHON, ROOT, subprocess_env, until
from .partitionapp import read_events

pytestmark = pytest.mark.anyio

NETNS = "taskq-part"
VETH_ROOT, VETH_NS = "tqpart0", "tqpart1"
SUBNET = "10.231.0.0/16"
ROOT_ADDR, NS_ADDR, PREFIX = "10.231.7.1", "10.231.7.2", 30
LOCK = Path("/tmp/taskq-partition-test.lock")

LEASE = 6.0  # renewed every 2 s; given up at 4.5 s without renewal; rescued after 6 s
HANGING, SHORT = range(0, 5), range(5, 10)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", *args], capture_output=True, text=True, check=check, timeout=30)


def missing_requirement() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command (Debian package iproute2)"
    return None


def _remove_leftovers() -> None:
    """Everything a crashed run of this test may have left, by its exact name."""
    _ip("netns", "delete", NETNS, check=False)
    _ip("link", "delete", VETH_ROOT, check=False)
    while _ip("route", "delete", "blackhole", SUBNET, check=False).returncode == 0:
        pass


class Partition:
    """The namespace, its link to the root namespace, and the cut."""

    def __init__(self) -> None:
        self.cut_with_tc = True

    def build(self) -> None:
        # First the safety net: from here on, test-subnet traffic that finds
        # no veth route is dropped here instead of going out by the default route.
        _ip("route", "add", "blackhole", SUBNET)
        made = _ip("netns", "add", NETNS, check=False)
        if made.returncode != 0:
            pytest.skip(f"cannot make a network namespace here: {made.stderr.strip()}")
        _ip("link", "add", VETH_ROOT, "type", "veth", "peer", "name", VETH_NS, "netns", NETNS)
        _ip("addr", "add", f"{ROOT_ADDR}/{PREFIX}", "dev", VETH_ROOT)
        _ip("link", "set", VETH_ROOT, "up")
        _ip("-n", NETNS, "addr", "add", f"{NS_ADDR}/{PREFIX}", "dev", VETH_NS)
        _ip("-n", NETNS, "link", "set", VETH_NS, "up")
        _ip("-n", NETNS, "link", "set", "lo", "up")

    def cut(self) -> None:
        """Drop every packet both ways: a root queue that holds none, on each end."""
        ends = [("dev", VETH_ROOT), ("-n", NETNS, "dev", VETH_NS)]
        for end in ends:
            if _tc(*end[:-2], "qdisc", "add", *end[-2:], "root", "pfifo", "limit", "0",
                   check=False).returncode != 0:  # fmt: skip
                self.cut_with_tc = False
        if not self.cut_with_tc:  # no usable qdisc: take the namespace's end down instead
            self.heal()
            _ip("-n", NETNS, "link", "set", VETH_NS, "down")

    def heal(self) -> None:
        _tc("qdisc", "del", "dev", VETH_ROOT, "root", check=False)
        _tc("-n", NETNS, "qdisc", "del", "dev", VETH_NS, "root", check=False)
        _ip("-n", NETNS, "link", "set", VETH_NS, "up", check=False)

    def remove(self) -> None:
        _remove_leftovers()


@contextlib.contextmanager
def partition() -> Iterator[Partition]:
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    LOCK.touch()
    with LOCK.open("r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run of this test uses the same names
        _remove_leftovers()
        p = Partition()
        try:
            p.build()
            yield p
        finally:
            p.remove()
            assert NETNS not in _ip("netns", "list").stdout
            assert "10.231." not in _ip("route", "show").stdout
            assert VETH_ROOT not in _ip("link", "show").stdout


# -- the relay -----------------------------------------------------------------------------


Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


def upstream_of(dsn: str) -> Opener | None:
    """How to reach the suite's Postgres from this process: its unix socket, or loopback."""
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qs(parts.query)
    host = query.get("host", [parts.hostname or ""])[0]
    port = int(query.get("port", [parts.port or 5432])[0])
    if host.startswith("/"):
        path = f"{host}/.s.PGSQL.{port}"
        return lambda: asyncio.open_unix_connection(path)
    with contextlib.suppress(ValueError):
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return lambda: asyncio.open_connection(host, port)
    return None


class Relay:
    """TCP on the root side of the veth pair, each connection piped to Postgres."""

    def __init__(self, upstream: Opener) -> None:
        self.upstream = upstream
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, ROOT_ADDR, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await self.upstream()
        except OSError:
            writer.close()
            return
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                writer.close()
                up_writer.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.close()


# -- helpers -------------------------------------------------------------------------------


class Worker:
    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.out = log.open("w")
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text()

    async def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


def worker_command() -> list[str]:
    return [
        PYTHON, "-m", "taskq", "worker", "partitionapp:app",
        "--concurrency", "20", "--lease-seconds", str(LEASE),
        "--poll-interval", "0.5", "--shutdown-timeout", "1", "--no-cron",
    ]  # fmt: skip


@contextlib.asynccontextmanager
async def workers() -> AsyncIterator[list[Worker]]:
    started: list[Worker] = []
    try:
        yield started
    finally:
        for w in started:
            await w.stop()


# -- the test ------------------------------------------------------------------------------


async def test_a_partitioned_worker_gives_up_its_jobs_and_its_late_writes_change_nothing(
    pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    upstream = upstream_of(pg_dsn)
    if upstream is None:
        pytest.skip("the test database is not on this machine; the relay only forwards locally")
    app = taskq.App(pg_dsn, schema=schema)
    app.task(name="part.work")(lambda n, hang: n)
    db = await asyncpg.connect(pg_dsn)
    s = f'"{schema}"'
    try:
        async with app:
            jobs = {
                n: await app.tasks["part.work"].enqueue(n=n, hang=n in HANGING) for n in range(10)
            }
        with partition() as net:
            relay = Relay(upstream)
            await relay.start()
            try:
                await run_partition(net, relay, pg_dsn, schema, s, db, jobs, tmp_path)
            finally:
                await relay.close()
    finally:
        await db.close()


async def run_partition(
    net: Partition,
    relay: Relay,
    pg_dsn: str,
    schema: str,
    s: str,
    db: asyncpg.Connection,
    jobs: dict[int, taskq.Job],
    tmp: Path,
) -> None:
    parts = urllib.parse.urlsplit(pg_dsn)
    relayed = f"postgresql://{parts.username or 'postgres'}@{ROOT_ADDR}:{relay.port}{parts.path}"
    events = tmp / "events"
    events.mkdir()
    async with workers() as started:
        cut_off = Worker(
            ["ip", "netns", "exec", NETNS, *worker_command()],
            subprocess_env(relayed, TASKQ_SCHEMA=schema, PART_ROLE="cut", PART_EVENTS=str(events)),
            tmp / "cut.log",
        )
        started.append(cut_off)
        await until(
            lambda: db.fetchval(
                f"SELECT count(*) = 10 FROM {s}.jobs WHERE state = 'running' "
                "AND split_part(worker_id, ':', 2) = $1",
                str(cut_off.pid),
            ),
            60,
            "the worker in the namespace to hold all ten jobs (through the relay)",
        )
        net.cut()
        cut_at = time.time()
        rescuer = Worker(
            worker_command(),
            subprocess_env(
                pg_dsn, TASKQ_SCHEMA=schema, PART_ROLE="rescuer", PART_EVENTS=str(events)
            ),
            tmp / "rescuer.log",
        )
        started.append(rescuer)
        await until(
            lambda: db.fetchval(f"SELECT count(*) = 10 FROM {s}.history"),
            60,
            "the other worker to rescue and finish all ten jobs",
        )
        assert cut_off.proc.poll() is None and rescuer.proc.poll() is None

        # While still cut off: the long jobs were given up before anyone else started them.
        mine = read_events(events / f"cut-{cut_off.pid}.events")
        theirs = read_events(events / f"rescuer-{rescuer.pid}.events")
        gave_up = {n: at for kind, n, at in mine if kind == "cancelled"}
        finished_here = {n for kind, n, _ in mine if kind == "done"}
        started_there = {n: at for kind, n, at in theirs if kind == "start"}
        assert set(gave_up) == set(HANGING), mine
        assert finished_here == set(SHORT), mine  # outcomes stuck behind the cut
        assert set(started_there) == set(range(10)), theirs
        for n in HANGING:
            assert gave_up[n] < started_there[n], (n, gave_up[n], started_there[n])
            # Within 75% of the lease after the last renewal, which came before the cut.
            assert gave_up[n] - cut_at <= LEASE * 0.75 + 1.5, gave_up[n] - cut_at
        assert "could not renew its leases" in cut_off.text()
        rows = await db.fetch(
            f"SELECT id, state, attempts, rescues, split_part(worker_id, ':', 2) AS pid "
            f"FROM {s}.history ORDER BY id"
        )
        assert [r["id"] for r in rows] == sorted(j.id for j in jobs.values())
        for r in rows:
            assert (r["state"], r["attempts"], r["rescues"], r["pid"]) == (
                "succeeded",
                2,
                1,
                str(rescuer.pid),
            ), dict(r)
        assert await db.fetchval(f"SELECT count(*) FROM {s}.jobs") == 0
        before = await history_snapshot(db, s)

        # Heal: the cut-off worker comes back, and everything it sends late is fenced off.
        net.heal()
        healed_at = time.time()
        short_ids = sorted(jobs[n].id for n in SHORT)
        await until(
            lambda: _dropped_all(cut_off.text(), short_ids),
            90,
            "the healed worker to try its stale outcomes and drop them",
        )
        await until(
            lambda: db.fetchval(
                f"SELECT extract(epoch FROM heartbeat_at) > $2 FROM {s}.workers "
                "WHERE split_part(id, ':', 2) = $1",
                str(cut_off.pid),
                healed_at,
            ),
            60,
            "the healed worker's heartbeat",
        )
        await asyncio.sleep(LEASE / 2)  # a renewal round and more write-back attempts
        assert await history_snapshot(db, s) == before
        assert await db.fetchval(f"SELECT count(*) FROM {s}.jobs") == 0
        assert "had committed" not in cut_off.text()  # not mistaken for its own outcome
        # Nor did it start anything again.
        late = read_events(events / f"cut-{cut_off.pid}.events")
        assert not [e for e in late if e[0] == "start" and e[2] > cut_at], late
        assert await cut_off.stop() == 0, cut_off.text()
        assert await rescuer.stop() == 0, rescuer.text()


async def history_snapshot(db: asyncpg.Connection, s: str) -> list[Any]:
    """Every history row with its xmin: a write of any kind, even a no-op UPDATE, shows."""
    return list(
        await db.fetch(
            f"SELECT id, xmin::text AS x, to_jsonb(h)::text AS row FROM {s}.history AS h "
            "ORDER BY id"
        )
    )


async def _dropped_all(log: str, ids: list[int]) -> bool:
    """Whether the worker logged every one of ``ids`` as an outcome dropped for a lost lease."""
    dropped: set[int] = set()
    for found in re.finditer(r"lease lost for job\(s\) \[([\d, ]+)\]", log):
        dropped.update(int(i) for i in found[1].split(","))
    return set(ids) <= dropped


def test_the_partition_names_are_this_tests_own() -> None:
    """The blackhole covers the test subnet, and the subnet is a private one."""
    net = ipaddress.ip_network(SUBNET)
    assert net.is_private and ipaddress.ip_address(ROOT_ADDR) in net
    assert ipaddress.ip_address(NS_ADDR) in ipaddress.ip_network(
        f"{ROOT_ADDR}/{PREFIX}", strict=False
    )
