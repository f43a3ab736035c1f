"""Three worker hosts against one Postgres, each in network and UTS namespaces of its own.

Each "host" is a ``python -m taskq worker`` process in a network namespace of
this test's (``ip netns``), joined to the root namespace by a veth pair with
addresses in 10.232.<n>.0/30, and in a UTS namespace (``unshare --uts``) with
a host name of its own, which the worker records as its host and the jobs
return. Each reaches the suite's Postgres through a TCP relay on the root
side of its link (as in tests/test_partition.py). The test shows:

- jobs spread over all three hosts;
- a cron entry that fires every second, on the three schedulers, makes
  exactly one job per slot, with no slot missing, also while one host is
  cut off and after it comes back;
- a cluster-wide concurrency limit (3, above one host's concurrency of 2)
  holds across the hosts: at no moment more jobs run than the limit, on the
  database clock, and the limit is reached (which takes two hosts);
- a host cut off (every packet dropped, both ways) while it holds jobs: it
  finishes them during the cut, the other two rescue them once the lease
  expired and finish them, each exactly once in history; after the link
  heals, the cut-off host's late outcomes are fenced off (no history row
  changes, not even its xmin).

Network safety as in tests/test_partition.py: only traffic between the root
namespace and the namespaces made here; a blackhole route for all of
10.232.0.0/16 in the root namespace while they exist; namespaces, links and
the route removed in a ``finally`` (and leftovers of a crashed run, by their
exact names, first); runs of this test on one machine take turns on a lock.
The host names are set only inside the new UTS namespaces: ``unshare``
runs ``hostname`` only once it has made one.

Also here: the KEDA query of docs/guides/scaling.md, read from the page and
run against a real schema (its count and its plan).

Needs root and iproute2 (``ip``, ``tc``) and util-linux's ``unshare``;
skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import ipaddress
import itertools
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

import taskq

from .conftest import PYTHON, ROOT, subprocess_env, until
from .test_partition import (
    Opener,
    Relay,
    Worker,
    missing_requirement,
    upstream_of,
)

pytestmark = pytest.mark.anyio

SUBNET = "10.232.0.0/16"
LOCK = Path("/tmp/taskq-multihost-test.lock")
LEASE = 3.0  # renewed every second; given up at 2.25 s without renewal; rescued after 3 s
CONCURRENCY = 2  # per host
LIMIT = 3  # on mh-limited: more than one host can run, fewer than three can


@dataclass(frozen=True)
class Host:
    name: str  # its host name, in its own UTS namespace
    netns: str
    veth_root: str
    veth_ns: str
    root_addr: str
    ns_addr: str


HOSTS = [
    Host(f"mh-{x}", f"taskq-mh-{x}", f"tqmh0{x}", f"tqmh1{x}", f"10.232.{n}.1", f"10.232.{n}.2")
    for n, x in enumerate("abc", start=1)
]
NAMES = [h.name for h in HOSTS]


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def _remove_leftovers() -> None:
    """Everything a crashed run of this test may have left, by its exact name."""
    for h in HOSTS:
        _run("ip", "netns", "delete", h.netns, check=False)
        _run("ip", "link", "delete", h.veth_root, check=False)
    while _run("ip", "route", "delete", "blackhole", SUBNET, check=False).returncode == 0:
        pass


class Network:
    """Three namespaces, each linked to the root namespace; cutting and healing a link."""

    def build(self) -> None:
        # The safety net first: test-subnet traffic that finds no veth route
        # is dropped here instead of leaving by the default route.
        _run("ip", "route", "add", "blackhole", SUBNET)
        for h in HOSTS:
            made = _run("ip", "netns", "add", h.netns, check=False)
            if made.returncode != 0:
                pytest.skip(f"cannot make a network namespace here: {made.stderr.strip()}")
            _run("ip", "link", "add", h.veth_root, "type", "veth",
                 "peer", "name", h.veth_ns, "netns", h.netns)  # fmt: skip
            _run("ip", "addr", "add", f"{h.root_addr}/30", "dev", h.veth_root)
            _run("ip", "link", "set", h.veth_root, "up")
            _run("ip", "-n", h.netns, "addr", "add", f"{h.ns_addr}/30", "dev", h.veth_ns)
            _run("ip", "-n", h.netns, "link", "set", h.veth_ns, "up")
            _run("ip", "-n", h.netns, "link", "set", "lo", "up")

    def cut(self, h: Host) -> None:
        """Drop every packet both ways (a root queue that holds none, on each end);
        the link stays up, as in a real partition. Without such a qdisc: link down."""
        ends = [("dev", h.veth_root), ("-n", h.netns, "dev", h.veth_ns)]
        for end in ends:
            if _run("tc", *end[:-2], "qdisc", "add", *end[-2:], "root", "pfifo", "limit", "0",
                    check=False).returncode != 0:  # fmt: skip
                self.heal(h)
                _run("ip", "-n", h.netns, "link", "set", h.veth_ns, "down")
                return

    def heal(self, h: Host) -> None:
        _run("tc", "qdisc", "del", "dev", h.veth_root, "root", check=False)
        _run("tc", "-n", h.netns, "qdisc", "del", "dev", h.veth_ns, "root", check=False)
        _run("ip", "-n", h.netns, "link", "set", h.veth_ns, "up", check=False)


@contextlib.contextmanager
def network() -> Iterator[Network]:
    reason = missing_requirement() or (
        None if shutil.which("unshare") else "no `unshare` command (Debian package util-linux)"
    )
    if reason:
        pytest.skip(reason)
    LOCK.touch()
    with LOCK.open("r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run of this test uses the same names
        _remove_leftovers()
        try:
            net = Network()
            net.build()
            yield net
        finally:
            _remove_leftovers()
            netns = _run("ip", "netns", "list").stdout
            assert not [h for h in HOSTS if h.netns in netns], netns
            assert "10.232." not in _run("ip", "route", "show").stdout
            assert "tqmh0" not in _run("ip", "link", "show").stdout


class HostRelay(Relay):
    """The relay of tests/test_partition.py, on one host's root-side address."""

    def __init__(self, upstream: Opener, address: str) -> None:
        super().__init__(upstream)
        self.address = address

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.address, 0)
        self.port = self.server.sockets[0].getsockname()[1]


def host_command(h: Host) -> list[str]:
    """The worker in the host's network namespace, in a UTS namespace named for the host.

    ``ip netns exec``, ``unshare`` and ``sh`` each exec the next, so the
    worker keeps the PID of the process started here.
    """
    return [
        "ip", "netns", "exec", h.netns, "unshare", "--uts", "--",
        "sh", "-c", 'hostname "$0" && exec "$@"', h.name,
        PYTHON, "-m", "taskq", "worker", "multihostapp:app",
        "--concurrency", str(CONCURRENCY), "--lease-seconds", str(LEASE),
        "--poll-interval", "0.5", "--shutdown-timeout", "1",
    ]  # fmt: skip


def relayed_dsn(pg_dsn: str, h: Host, port: int) -> str:
    parts = urllib.parse.urlsplit(pg_dsn)
    user = parts.netloc.rpartition("@")[0] or "postgres"
    return f"postgresql://{user}@{h.root_addr}:{port}{parts.path}"


# -- the test ------------------------------------------------------------------------------


async def test_three_hosts_share_jobs_cron_and_a_limit_and_finish_a_cut_off_hosts_jobs(
    pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    upstream = upstream_of(pg_dsn)
    if upstream is None:
        pytest.skip("the test database is not on this machine; the relays only forward locally")
    app = taskq.App(pg_dsn, schema=schema)
    for name, queue in [("spread", "mh-spread"), ("limited", "mh-limited"), ("hold", "mh-hold")]:
        app.task(name=f"mh.{name}", queue=queue)(lambda n: n)
    db = await asyncpg.connect(pg_dsn)
    try:
        async with app:
            await app.queue("mh-limited").configure(concurrency_limit=LIMIT)
            with network() as net:
                relays = [HostRelay(upstream, h.root_addr) for h in HOSTS]
                try:
                    for relay in relays:
                        await relay.start()
                    dsns = [
                        relayed_dsn(pg_dsn, h, r.port) for h, r in zip(HOSTS, relays, strict=True)
                    ]
                    await run_hosts(app, net, dsns, schema, db, tmp_path)
                finally:
                    for relay in relays:
                        await relay.close()
    finally:
        await db.close()


async def run_hosts(
    app: taskq.App, net: Network, dsns: list[str], schema: str, db: Any, tmp: Path
) -> None:
    s = f'"{schema}"'
    flag = tmp / "flag"
    workers: list[Worker] = []
    try:
        for h, dsn in zip(HOSTS, dsns, strict=True):
            env = subprocess_env(dsn, TASKQ_SCHEMA=schema, MH_FLAG=str(flag))
            workers.append(Worker(host_command(h), env, tmp / f"{h.name}.log"))
        # One worker per host, known by its host name and by the PID started here.
        await until(
            lambda: db.fetchval(
                f"SELECT array_agg(hostname || ':' || pid ORDER BY hostname) = $1 FROM {s}.workers",
                [f"{h.name}:{w.pid}" for h, w in zip(HOSTS, workers, strict=True)],
            ),
            60,
            "a worker on each of the three hosts",
        )
        await check_spread(app, db, s)
        await check_limit(app, db, s)
        cut, healed = await check_cut_off_host(app, net, db, s, workers, flag)
        for h, w in zip(HOSTS, workers, strict=True):
            assert await w.stop() == 0, (h.name, w.text())
        await check_cron(db, s, workers, cut, healed)
    finally:
        for h in HOSTS:
            net.heal(h)
        for w in workers:
            await w.stop()


async def finished(db: Any, s: str, task: str, n: int) -> bool:
    return bool(
        await db.fetchval(f"SELECT count(*) = $2 FROM {s}.history WHERE task = $1", task, n)
    )


async def check_spread(app: taskq.App, db: Any, s: str) -> None:
    """Jobs go to all three hosts, and each ran where its worker row says."""
    await app.tasks["mh.spread"].enqueue_many([{"n": n} for n in range(24)])
    await until(lambda: finished(db, s, "mh.spread", 24), 60, "24 spread jobs")
    rows = await db.fetch(
        f"SELECT state, result #>> '{{}}' AS ran_on, split_part(worker_id, ':', 1) AS host "
        f"FROM {s}.history WHERE task = 'mh.spread'"
    )
    assert {r["state"] for r in rows} == {"succeeded"}
    assert all(r["ran_on"] == r["host"] for r in rows), [dict(r) for r in rows]
    per_host = collections.Counter(r["ran_on"] for r in rows)
    assert sorted(per_host) == NAMES, per_host


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment (one that ends as another starts: not both)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


async def check_limit(app: taskq.App, db: Any, s: str) -> None:
    """A cluster-wide concurrency limit holds across the hosts, and is reached."""
    await app.tasks["mh.limited"].enqueue_many([{"n": n} for n in range(12)])
    await until(lambda: finished(db, s, "mh.limited", 12), 60, "12 limited jobs")
    rows = await db.fetch(
        f"SELECT state, result->>'host' AS host, (result->>'start')::float8 AS t0, "
        f"(result->>'end')::float8 AS t1 FROM {s}.history WHERE task = 'mh.limited'"
    )
    assert {r["state"] for r in rows} == {"succeeded"}
    intervals = [(r["t0"], r["t1"]) for r in rows]
    # Reaching the limit takes two hosts (each runs at most CONCURRENCY); a
    # limit counted per worker would let all three run two each.
    assert most_at_once(intervals) == LIMIT, sorted((r["t0"], r["t1"], r["host"]) for r in rows)
    assert len({r["host"] for r in rows}) >= 2


async def held_history(db: Any, s: str) -> list[Any]:
    """The held jobs' history rows with their xmin: a write of any kind, even a no-op, shows."""
    return list(
        await db.fetch(
            f"SELECT id, xmin::text AS x, to_jsonb(h)::text AS row FROM {s}.history AS h "
            "WHERE task = 'mh.hold' ORDER BY id"
        )
    )


def dropped(log: str) -> set[int]:
    """Ids the worker logged as outcomes dropped for a lost lease."""
    ids: set[int] = set()
    for found in re.finditer(r"lease lost for job\(s\) \[([\d, ]+)\]", log):
        ids.update(int(i) for i in found[1].split(","))
    return ids


async def check_cut_off_host(
    app: taskq.App, net: Network, db: Any, s: str, workers: list[Worker], flag: Path
) -> tuple[Any, Any]:
    """Cut one host off while it holds jobs; the others finish them, exactly once.

    Returns the database's time of the cut and of the heal."""
    victim, victim_worker = HOSTS[0], workers[0]
    n_jobs = CONCURRENCY * len(HOSTS)  # every slot of every host
    await app.tasks["mh.hold"].enqueue_many([{"n": n} for n in range(n_jobs)])
    await until(
        lambda: db.fetchval(
            f"SELECT count(*) = $1 FROM {s}.jobs WHERE task = 'mh.hold' AND state = 'running'",
            n_jobs,
        ),
        60,
        "every host to hold two of the jobs",
    )
    held = await db.fetch(
        f"SELECT id, split_part(worker_id, ':', 1) AS host FROM {s}.jobs WHERE task = 'mh.hold'"
    )
    assert collections.Counter(r["host"] for r in held) == dict.fromkeys(NAMES, CONCURRENCY)
    victims = sorted(r["id"] for r in held if r["host"] == victim.name)

    net.cut(victim)
    cut_at = await db.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
    await asyncio.to_thread(
        flag.touch
    )  # every held job returns now; the cut-off host's outcomes cannot get out
    await until(
        lambda: finished(db, s, "mh.hold", n_jobs),
        60,
        "the other hosts to finish their jobs, and the cut-off host's once its lease expired",
    )
    assert victim_worker.proc.poll() is None, victim_worker.text()
    rows = await db.fetch(
        f"SELECT id, state, attempts, rescues, result #>> '{{}}' AS ran_on, "
        f"split_part(worker_id, ':', 1) AS host FROM {s}.history WHERE task = 'mh.hold'"
    )
    for r in rows:
        assert r["state"] == "succeeded" and r["ran_on"] == r["host"], dict(r)
        if r["id"] in victims:  # rescued once, then run again elsewhere
            assert (r["attempts"], r["rescues"]) == (2, 1) and r["host"] != victim.name, dict(r)
        else:
            assert (r["attempts"], r["rescues"]) == (1, 0), dict(r)
    before = await held_history(db, s)
    assert not dropped(victim_worker.text())

    net.heal(victim)
    healed_at = await db.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")

    async def refused() -> bool:
        return set(victims) <= dropped(victim_worker.text())

    await until(
        refused,
        60,
        "the healed host to send its stale outcomes and have them refused",
    )
    assert await held_history(db, s) == before
    assert "had committed" not in victim_worker.text()  # not taken for its own outcomes
    await until(
        lambda: db.fetchval(
            f"SELECT extract(epoch FROM heartbeat_at) > $2 FROM {s}.workers WHERE hostname = $1",
            victim.name,
            healed_at,
        ),
        60,
        "the healed host's heartbeat",
    )
    return cut_at, healed_at


async def check_cron(
    db: Any, s: str, workers: list[Worker], cut_at: float, healed_at: float
) -> None:
    """One job per slot, every slot from the first to the last, during the cut too."""
    rows = await db.fetch(
        f"SELECT id, 'live' AS state, extract(epoch FROM run_at)::float8 AS slot FROM {s}.jobs "
        f"WHERE task = 'mh.tick' UNION ALL "
        f"SELECT id, state, (result->>'slot')::float8 FROM {s}.history WHERE task = 'mh.tick' "
        "ORDER BY slot"
    )
    assert {r["state"] for r in rows} <= {"live", "succeeded"}, [dict(r) for r in rows]
    slots = [r["slot"] for r in rows]
    assert len(slots) >= 5, slots  # the test runs for about 8 s
    assert [b - a for a, b in itertools.pairwise(slots)] == [1.0] * (len(slots) - 1), slots
    assert [t for t in slots if cut_at < t < healed_at], (cut_at, healed_at, slots)
    # Which scheduler made each job, as its log says: none twice. (A job whose
    # reply was lost, or cut short by the shutdown, may be in no log.)
    made: dict[int, list[str]] = collections.defaultdict(list)
    for h, w in zip(HOSTS, workers, strict=True):
        for found in re.finditer(r"cron mh\.tick: slot \S+ -> job (\d+)", w.text()):
            made[int(found[1])].append(h.name)
    assert set(made) <= {r["id"] for r in rows}
    assert all(len(hosts) == 1 for hosts in made.values()), made


def test_the_network_names_are_this_tests_own() -> None:
    """The blackhole covers every address here, in a private range of its own."""
    net = ipaddress.ip_network(SUBNET)
    assert net.is_private
    assert not net.overlaps(ipaddress.ip_network("10.231.0.0/16"))  # tests/test_partition.py
    for h in HOSTS:
        link = ipaddress.ip_network(f"{h.root_addr}/30", strict=False)
        assert link.subnet_of(net) and ipaddress.ip_address(h.ns_addr) in link
    assert len({h.netns for h in HOSTS}) == len({h.veth_root for h in HOSTS}) == 3
    assert all(len(h.veth_root) <= 15 and len(h.veth_ns) <= 15 for h in HOSTS)  # IFNAMSIZ


# -- the KEDA query of the scaling guide -----------------------------------------------------


def keda_query() -> str:
    """The query of the PostgreSQL trigger in docs/guides/scaling.md, as the page has it."""
    page = (ROOT / "docs" / "guides" / "scaling.md").read_text()
    found = []
    for block in re.findall(r"```yaml\n(.*?)```", page, flags=re.DOTALL):
        doc = yaml.safe_load(block)
        if isinstance(doc, dict) and doc.get("kind") == "ScaledObject":
            found += [t["metadata"]["query"] for t in doc["spec"]["triggers"]
                      if t["type"] == "postgresql"]  # fmt: skip
    assert len(found) == 1, found
    return str(found[0])


async def test_the_keda_query_of_the_scaling_guide_counts_runnable_jobs_by_the_workers_indexes(
    app: taskq.App, conn: asyncpg.Connection, schema: str
) -> None:
    query = keda_query()
    assert query.count("taskq.jobs") == 2, query
    query = query.replace("taskq.jobs", f'"{schema}".jobs')
    job = app.task(name="keda.job")(lambda n: n)
    async with app:
        # A backlog in a queue the Deployment does not serve, and in the two it does:
        # due now, due later, running.
        await job.options(queue="other").enqueue_many([{"n": n} for n in range(20_000)])
        await job.options(queue="default").enqueue_many([{"n": n} for n in range(70)])
        await job.options(queue="emails").enqueue_many([{"n": n} for n in range(30)])
        await job.options(queue="default", delay=3600).enqueue_many([{"n": 0}] * 40)
    s = f'"{schema}"'
    await conn.execute(
        f"UPDATE {s}.jobs SET state = 'running', attempts = 1, worker_id = 'w', "
        "lease_token = gen_random_uuid(), lease_expires_at = now() + interval '1 minute', "
        "started_at = now() WHERE id IN (SELECT id FROM "
        f"(SELECT id, queue, row_number() OVER (PARTITION BY queue ORDER BY id) AS k "
        f"FROM {s}.jobs WHERE run_at <= now()) AS q "
        "WHERE (queue = 'default' AND k <= 20) OR (queue = 'other' AND k <= 500))"
    )
    await conn.execute(f"VACUUM ANALYZE {s}.jobs")
    assert await conn.fetchval(query) == 70 + 30  # 50 + 30 due, 20 running
    plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {query}"))
    assert "jobs_claim" in plan and "jobs_running" in plan, plan
    assert "Seq Scan" not in plan, plan
