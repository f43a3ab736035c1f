"""Workers and producers through a real PgBouncer (Debian's), in each pool mode.

One ``pgbouncer`` process, started as a subprocess of the test (as the
``postgres`` system user when the tests run as root: it refuses root), sits in
front of the test Postgres with one database alias per pool mode. Worker
processes (``python -m taskq worker pgbouncerapp:app``) and the test's own App
(the producer) connect through it; ``$TASKQ_LISTEN_DSN`` / ``listen_dsn``
points straight at Postgres, or is left out to see what goes wrong.

Workers run with ``--poll-interval 600``, so a job enqueued after a worker
started can only start within the test's timeouts if a notification woke the
worker; with ``--lease-seconds 300`` a cancel request can only reach a running
job by its notification (the lease renewal that also reports it comes every
100 s). docs/guides/pgbouncer.md's table of pooler modes states what these
tests observe.

Needs Debian's ``pgbouncer`` (``.ci/run`` installs it): missing, the tests are
skipped with the reason, and fail under ``CI``.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import getpass
import io
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import asyncpg
import pytest

import taskq
from taskq import _embedded

from .conftest import PYTHON, subprocess_env, until
from .pgbouncerapp import CONNECT_KWARGS, EFFECTS_SQL, Tasks, register
from .worker_process import WorkerProcess

pytestmark = pytest.mark.anyio

#: Database aliases of the one PgBouncer: name -> pool mode. ``fresh`` is used
#: by one test only, so its pool starts without server connections.
ALIASES = {
    "transaction": "transaction",
    "session": "session",
    "statement": "statement",
    "fresh": "transaction",
}
APP = "pgbouncerapp:app"
#: A worker that neither polls nor renews a lease during a test: what it does
#: in time, a notification made it do.
DEAF = ("--poll-interval", "600", "--lease-seconds", "300")
#: The deaf worker without cron (a cron job's notification would not wake it
#: either, but keeps the test to one job), stopping 1 s after SIGTERM.
DEAF_STOP = ("--no-cron", "--shutdown-timeout", "1")
IN_STATEMENT_MODE = "transaction blocks not allowed in statement pooling mode"


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )


def need_pgbouncer() -> str:
    """The binary; a skip with the reason locally, a failure under CI."""
    binary = pgbouncer_binary()
    if binary is not None:
        return binary
    reason = "pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(f"the PgBouncer tests cannot run: {reason}")
    pytest.skip(reason)


def pgbouncer_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    found = re.search(r"PgBouncer (\d+)\.(\d+)", out.stdout)
    assert found, out.stdout
    return tuple(int(n) for n in found.groups())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def psql_binary() -> str:
    return shutil.which("psql") or str(_embedded.find_postgres_bin_dir() / "psql")


class PgBouncer:
    """``pgbouncer`` in front of the test Postgres, one alias per pool mode."""

    def __init__(self, binary: str, pg_dsn: str) -> None:
        self.binary = binary
        self.version = pgbouncer_version(binary)
        url = urlsplit(pg_dsn)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.user = unquote(url.username or "") or query.get("user") or getpass.getuser()
        server = {
            "host": url.hostname or query.get("host") or "127.0.0.1",
            "port": str(url.port or query.get("port") or 5432),
            "dbname": unquote(url.path.lstrip("/")) or query.get("dbname") or self.user,
            "user": self.user,
        }
        if url.password:
            server["password"] = unquote(url.password)
        self.server = " ".join(f"{k}={v}" for k, v in server.items())
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="taskq-pgbouncer-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def dsn(self, alias: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{alias}"

    @property
    def prepared_statements(self) -> bool:
        """Whether this PgBouncer can track prepared statements (1.21 and later)."""
        return self.version >= (1, 21)

    def start(self) -> None:
        databases = "\n".join(
            f"{alias} = {self.server} pool_mode={mode}" for alias, mode in ALIASES.items()
        )
        settings = [
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =",
            f"auth_type = trust\nauth_file = {self.dir / 'users.txt'}\nadmin_users = {self.user}",
            "pool_mode = transaction\ndefault_pool_size = 20\nmax_client_conn = 500",
            f"logfile = {self.dir / 'pgbouncer.log'}",
        ]
        if self.prepared_statements:
            settings.append("max_prepared_statements = 100")
        (self.dir / "pgbouncer.ini").write_text(
            f"[databases]\n{databases}\n\n[pgbouncer]\n" + "\n".join(settings) + "\n"
        )
        (self.dir / "users.txt").write_text(f'"{self.user}" ""\n')
        command = [self.binary]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            account = pwd.getpwnam("postgres" if _has_user("postgres") else "nobody")
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
            command += ["-u", account.pw_name]
        self.err = (self.dir / "stderr.txt").open("wb")
        self.proc = subprocess.Popen(
            [*command, str(self.dir / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=self.err,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                self.stats()
                # Through to Postgres (as PgBouncer's OS user, for a socket).
                self.psql("SELECT 1", "-d", "session")
                return
            except (subprocess.CalledProcessError, OSError) as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    said = getattr(exc, "stderr", "")
                    raise AssertionError(
                        f"pgbouncer did not start: {exc} {said}\n{self.log()}"
                    ) from exc
                time.sleep(0.1)

    def stats(self) -> dict[str, int]:
        """Transactions PgBouncer has passed on, by alias (its admin console's SHOW STATS)."""
        out = self.psql("SHOW STATS", "-d", "pgbouncer")  # its admin console
        rows = csv.DictReader(io.StringIO("\n".join(out.splitlines()[:-1])))  # no "(n rows)"
        return {row["database"]: int(row["total_xact_count"]) for row in rows}

    def psql(self, sql: str, *options: str) -> str:
        command = [psql_binary(), "-X", "-A", "-F,", "-c", sql, "-h", "127.0.0.1"]
        command += ["-p", str(self.port), "-U", self.user, *options]
        done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=10)
        return done.stdout

    def log(self) -> str:
        parts = [self.dir / "pgbouncer.log", self.dir / "stderr.txt"]
        return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # PgBouncer's immediate shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.err.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def bouncer(pg_dsn: str) -> Iterator[PgBouncer]:
    proxy = PgBouncer(need_pgbouncer(), pg_dsn)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.stop()


@contextlib.asynccontextmanager
async def worker(
    dsn: str, schema: str, log: Path, listen_dsn: str, *options: str, **env: str
) -> AsyncIterator[WorkerProcess]:
    """A worker process of pgbouncerapp, stopped (SIGTERM, then SIGKILL) at the end."""
    # "" (not unset): the App then has no listen DSN even if the environment had one.
    proc = WorkerProcess(dsn, schema, APP, log, *options, TASKQ_LISTEN_DSN=listen_dsn, **env)
    try:
        await anyio.to_thread.run_sync(proc.wait_for_output, "started: concurrency")
        yield proc
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(proc.stop)


async def history_count(pg_dsn: str, schema: str, task: str, state: str) -> int:
    conn = await asyncpg.connect(pg_dsn)
    try:
        return int(
            await conn.fetchval(
                f'SELECT count(*) FROM "{schema}".history WHERE task = $1 AND state = $2',
                task,
                state,
            )
        )
    finally:
        await conn.close()


async def everything_works(
    app: taskq.App, t: Tasks, proc: WorkerProcess, pg_dsn: str, *, notified: bool
) -> None:
    """Enqueue (delayed, in a transaction), claim, results, retries, ctx.transaction(),
    a workflow, cron and cancel.

    ``notified``: whether ``job.result()`` hears that a job finished (else it
    learns it at its 5 s re-check, after a 4 s timeout has run out).
    """
    added = await t.add.enqueue(a=2, b=3)
    flaky = await t.flaky.enqueue()
    paid = await t.pay.enqueue(order=7)
    wf = taskq.Workflow(name="squares")
    wf.add(t.total, parts=[wf.add(t.square, x=x) for x in range(5)])
    run = await wf.enqueue()
    later = await t.add.options(delay=1).enqueue(a=1, b=1)  # its due time is announced
    async with app.pool.acquire() as conn:  # enqueues in the caller's transaction
        async with conn.transaction():
            joined = await t.add.options(connection=conn).enqueue(a=10, b=20)
        rollback = conn.transaction()
        await rollback.start()
        gone = await t.add.options(connection=conn).enqueue(a=0, b=0)
        await rollback.rollback()
        assert (
            await conn.fetchval(f'SELECT count(*) FROM "{app.schema}".jobs WHERE id = $1', gone.id)
            == 0
        )
    # Together: each result() may wait for its 5 s re-check. Not paid.result():
    # it can return None for a job that ctx.transaction() ended, if it reads
    # the job between the commit and the result's write (a race of its own,
    # without PgBouncer too), so its status is read until the result is there.
    waits = (added, flaky, run, later, joined)
    results = await asyncio.gather(*(w.result(timeout=20) for w in waits))
    assert results == [5, 2, sum(x * x for x in range(5)), 2, 30]
    assert (await flaky.status()).attempts == 2  # failed once, retried

    async def paid_result() -> bool:
        return (await paid.status()).result == "paid order 7"

    await until(paid_result, 20, "the ctx.transaction() job's result")
    async with app.pool.acquire() as conn:
        effects = await conn.fetch(f'SELECT order_id, job_id FROM "{app.schema}".effects')
    assert [tuple(r) for r in effects] == [(7, paid.id)]

    async def ticked() -> bool:
        return await history_count(pg_dsn, app.schema, "pgb.tick", "succeeded") > 0

    await until(ticked, 20, "a cron job (every second) to run")

    # job.result() of a job that finishes while it waits.
    napping = await t.nap.enqueue(seconds=1.0)
    await anyio.to_thread.run_sync(proc.wait_for_output, f"nap started: job {napping.id}")
    if notified:
        assert await napping.result(timeout=4) == 1.0
    else:
        with pytest.raises(TimeoutError):
            await napping.result(timeout=4)
        # It had finished: result() just was not told.
        status = await napping.status()
        assert status.state is taskq.JobState.SUCCEEDED
        assert await napping.result(timeout=0.5) == 1.0

    # Cancel a running job.
    stuck = await t.nap.enqueue(seconds=3600.0)
    await anyio.to_thread.run_sync(proc.wait_for_output, f"nap started: job {stuck.id}")
    assert await stuck.cancel()

    async def cancelled() -> bool:
        return (await stuck.status()).state is taskq.JobState.CANCELLED

    await until(cancelled, 20, "the running job to be cancelled")


async def test_transaction_mode_with_a_direct_listen_dsn_does_everything(
    bouncer: PgBouncer, pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    dsn = bouncer.dsn("transaction")
    before = bouncer.stats()
    app = taskq.App(dsn, schema=schema, listen_dsn=pg_dsn, connect_kwargs=CONNECT_KWARGS)
    tasks = register(app)
    async with app:  # migrates the new schema through PgBouncer
        await app.pool.execute(EFFECTS_SQL.format(schema=schema))
        async with worker(dsn, schema, tmp_path / "worker.log", pg_dsn, *DEAF) as proc:
            await everything_works(app, tasks, proc, pg_dsn, notified=True)
    assert bouncer.stats()["transaction"] - before.get("transaction", 0) > 50
    assert "notifier" not in proc.text(), proc.text()


async def test_transaction_mode_without_listen_dsn_hears_nothing_and_polls(
    bouncer: PgBouncer, pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    dsn = bouncer.dsn("transaction")
    app = taskq.App(dsn, schema=schema, listen_dsn="", connect_kwargs=CONNECT_KWARGS)
    tasks = register(app)
    async with app:
        await app.pool.execute(EFFECTS_SQL.format(schema=schema))
        stuck = await tasks.nap.enqueue(seconds=3600.0)
        # A deaf worker: its first claim (at start) takes `stuck`; after that
        # only a notification could make it claim `waiting` or cancel `stuck`.
        async with worker(dsn, schema, tmp_path / "deaf.log", "", *DEAF, *DEAF_STOP) as deaf:
            await anyio.to_thread.run_sync(deaf.wait_for_output, f"nap started: job {stuck.id}")
            waiting = await tasks.add.enqueue(a=1, b=1)
            assert await stuck.cancel()
            await anyio.sleep(3)
            assert (await waiting.status()).state is taskq.JobState.QUEUED
            assert (await stuck.status()).state is taskq.JobState.RUNNING
            # Its listener is connected and healthy: it just hears nothing.
            assert "notifier" not in deaf.text(), deaf.text()
        # Polling every second and renewing leases every second, everything
        # works: the notifications are still lost.
        options = ("--poll-interval", "1", "--lease-seconds", "3")
        async with worker(dsn, schema, tmp_path / "polling.log", "", *options) as proc:
            await everything_works(app, tasks, proc, pg_dsn, notified=False)
            assert await waiting.result(timeout=1) == 2  # taken by the worker's first claim
        # Cancelled when the deaf worker stopped: it never heard the request
        # while it ran, but saw the flag when it put the job back.
        assert (await stuck.status()).state is taskq.JobState.CANCELLED


async def test_session_mode_does_everything_without_listen_dsn(
    bouncer: PgBouncer, pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    dsn = bouncer.dsn("session")
    before = bouncer.stats()
    app = taskq.App(dsn, schema=schema, listen_dsn="")  # asyncpg's statement cache on
    tasks = register(app)
    async with app:
        await app.pool.execute(EFFECTS_SQL.format(schema=schema))
        cache = {"PGBAPP_STATEMENT_CACHE": "on"}
        async with worker(dsn, schema, tmp_path / "worker.log", "", *DEAF, **cache) as proc:
            await everything_works(app, tasks, proc, pg_dsn, notified=True)
    assert bouncer.stats()["session"] - before.get("session", 0) > 50


async def test_statement_mode_enqueues_but_cannot_migrate_or_run_a_worker(
    bouncer: PgBouncer, pg_dsn: str, schema: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = bouncer.dsn("statement")
    app = taskq.App(
        dsn, schema=schema, listen_dsn=pg_dsn, connect_kwargs=CONNECT_KWARGS, connect_retry=1
    )
    tasks = register(app)
    with (
        caplog.at_level(logging.WARNING, "taskq"),
        pytest.raises(taskq.DatabaseError, match=IN_STATEMENT_MODE),
    ):
        await app.open()  # a new schema: the migration is one transaction
    # PgBouncer closes the connection, so taskq takes it for a lost one and tries again.
    assert "trying again for up to 1s" in caplog.text, caplog.text
    async with taskq.App(pg_dsn, schema=schema):  # migrated directly
        pass
    async with app:
        job = await tasks.add.enqueue(a=1, b=2)
        assert (await job.status()).state is taskq.JobState.QUEUED
        for listen_dsn in (pg_dsn, ""):
            # DEBUG: the CLI reports this error as an unexpected ExceptionGroup,
            # with the DatabaseError inside only in the traceback.
            command = [PYTHON, "-m", "taskq", "--log-level", "DEBUG", "worker", APP]
            env = subprocess_env(dsn, TASKQ_SCHEMA=schema, TASKQ_LISTEN_DSN=listen_dsn)
            done = await anyio.run_process(command, env=env, check=False, stderr=subprocess.STDOUT)
            output = done.stdout.decode(errors="replace")
            assert done.returncode != 0, output
            assert "registering a worker failed" in output, output
            assert IN_STATEMENT_MODE in output, output
        assert (await job.status()).state is taskq.JobState.QUEUED


async def test_asyncpg_statement_cache_needs_session_mode(bouncer: PgBouncer) -> None:
    """Why the App behind transaction pooling needs ``statement_cache_size=0``.

    asyncpg prepares a statement on the server connection it has at the time
    (the first of the ``fresh`` pool); while another client holds that one in a
    transaction, PgBouncer runs the next execution on another server connection.
    """

    async def run_twice(alias: str, **kwargs: int) -> int:
        first = await asyncpg.connect(bouncer.dsn(alias), **kwargs)
        second = await asyncpg.connect(bouncer.dsn(alias), **kwargs)
        try:
            await first.fetchval("SELECT $1::int", 1)
            async with second.transaction():
                await second.fetchval("SELECT 2")
                return int(await first.fetchval("SELECT $1::int", 1))
        finally:
            await first.close()
            await second.close()

    if bouncer.prepared_statements:  # max_prepared_statements is set
        assert await run_twice("fresh") == 1
    else:
        with pytest.raises(asyncpg.InvalidSQLStatementNameError, match="does not exist"):
            await run_twice("fresh")
    assert await run_twice("fresh", statement_cache_size=0) == 1
    assert await run_twice("session") == 1
