"""A Hypothesis state machine over the job path, on the real database, against a model.

The rules drive the Store's statements on one schema (enqueue, claim, renew,
write-backs of every kind, cancel, rescue, re-run) in any order Hypothesis
picks, and a pure-Python model says what each job should be after each step.
Time is moved by shifting ``run_at`` and ``lease_expires_at`` back in the
database ("clock advance"), never by waiting. Every lease ever handed out stays
available to the rules, so stale tokens are used as often as live ones.

After every step:

- the model and the database agree on every job (state, attempts, rescues,
  lease holder, pending cancel, error type);
- every job moved only along a legal edge of the lifecycle;
- attempts never exceed max_attempts; a job is in exactly one table; a running
  job has a lease (token, expiry, worker), a queued one has none;
- a write-back or renewal with a stale token touched no row at all (every
  row's xmin unchanged), and only the current token renews.

Time values are far apart (leases of 1000 s, clock steps of 350 s), so the
few seconds of real time an example takes never decide whether a lease has
expired or a job is due. A failure prints the seed and a reproduction blob.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

import taskq
from taskq._store import Outcome, Store, _outcome_arrays

LEASE = 1000.0
CLOCK_STEPS = (350.0, 1050.0)
DELAYS = (0.0, 1000.0, 3000.0)
#: Most new jobs are due at once: delayed ones wait for clock steps.
ENQUEUE_DELAYS = (0.0, 0.0, 0.0, 1000.0, 3000.0)
QUEUES = ("q1", "q2")
TASKS = ("t.a", "t.b")
#: Write-back rules use a lease from the bundle (None) or, about as often, a live one.
LIVE = st.one_of(st.none(), st.integers(0, 20))

#: The lifecycle's edges (a job may also stay where it is).
LEGAL = {
    (None, "queued"),  # enqueue
    ("queued", "running"),  # claim
    ("queued", "cancelled"),  # cancel while queued
    ("running", "queued"),  # retry, release, rescue
    ("running", "succeeded"),
    ("running", "failed"),  # failed for good, out of attempts, poison
    ("running", "cancelled"),  # cancelled while running, or rescued with a cancel pending
    ("failed", "queued"),  # job.retry()
    ("cancelled", "queued"),  # job.retry()
}


class Lease(NamedTuple):
    """A claim as the worker saw it: the job, its token, and the attempt number."""

    job_id: int
    token: uuid.UUID
    attempt: int


@dataclass
class ModelJob:
    id: int
    queue: str
    task: str
    priority: int
    max_attempts: int
    state: str = "queued"
    attempts: int = 0
    rescues: int = 0
    due_in: float = 0.0  # seconds until run_at (<= 0: due)
    lease_left: float = 0.0  # seconds until lease_expires_at, while running
    token: uuid.UUID | None = None
    cancel_requested: bool = False
    error_type: str | None = None
    #: Tokens of attempts whose own outcome was recorded (a resend may be
    #: recognised as done rather than lost).
    recorded: set[uuid.UUID] = field(default_factory=set)

    @property
    def due(self) -> bool:
        return self.state == "queued" and self.due_in <= 0

    @property
    def expired(self) -> bool:
        return self.state == "running" and self.lease_left < 0


class Harness:
    """One event loop, one connection and one migrated schema for all examples."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.schema = schema
        self.store = Store(schema)
        self.run(self._open(dsn))

    async def _open(self, dsn: str) -> None:
        app = taskq.App(dsn, schema=self.schema)
        await app.open()  # applies the migrations
        await app.close()
        self.conn: asyncpg.Connection = await asyncpg.connect(dsn)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def sql(self, text: str) -> str:
        return text.replace("{s}", f'"{self.schema}"')

    def close(self) -> None:
        self.run(self.conn.close())
        self.loop.close()


def error_json(kind: str) -> str:
    return orjson.dumps(
        {"type": kind, "message": "from the state machine", "traceback": ""}
    ).decode()


class JobMachine(RuleBasedStateMachine):
    h: Harness  # set by the test

    jobs = Bundle("jobs")
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[int, ModelJob] = {}
        self.seen_states: dict[int, str] = {}

    # -- helpers -------------------------------------------------------------

    def q(self, sql: str, *args: Any) -> Any:
        return self.h.run(self.h.conn.fetch(self.h.sql(sql), *args))

    def snapshot(self) -> list[Any]:
        """Every row of both tables with its xmin: any write, even a no-op UPDATE, shows."""
        return self.q(
            "SELECT 'j' AS t, id, xmin::text AS x, to_jsonb(j)::text AS row FROM {s}.jobs AS j "
            "UNION ALL SELECT 'h', id, xmin::text, to_jsonb(h)::text FROM {s}.history AS h "
            "ORDER BY 1, 2"
        )

    def pick(self, lease: Lease, live: int | None) -> Lease:
        """``lease`` from the bundle (often stale), or with ``live`` a current one if any."""
        if live is None:
            return lease
        running = sorted((j.id, j.token, j.attempts) for j in self.model.values() if j.token)
        return Lease(*running[live % len(running)]) if running else lease

    def live(self, lease: Lease) -> bool:
        job = self.model[lease.job_id]
        return job.state == "running" and job.token == lease.token

    def write_back(self, lease: Lease, outcome: Outcome, *, via_claim: bool) -> None:
        """Send one outcome; a stale token must change nothing and (unless it was this
        attempt's own recorded outcome) be reported lost."""
        before = None if self.live(lease) else self.snapshot()
        conn, store = self.h.conn, self.h.store
        if via_claim:
            # Workers up to schema version 10 send outcomes with a claim; claim()
            # still takes them (rolling deploys). Rows with lost = true: lost outcomes.
            rows = self.q(
                "SELECT id, lost FROM {s}.claim(NULL, $1, 0, 'w-sm', $2, $3, $4, $5, $6, $7, $8)",
                list(TASKS),
                LEASE,
                *_outcome_arrays([outcome]),
            )
            lost = [r["id"] for r in rows if r["lost"]]
            assert all(r["lost"] for r in rows), rows  # no job claimed
        else:
            lost = self.h.run(store.finish(conn, [outcome]))
        job = self.model[lease.job_id]
        if before is not None:
            assert self.snapshot() == before, f"stale token of job {job.id} changed a row"
            if lease.token not in job.recorded:
                assert lease.job_id in lost, f"stale outcome of job {job.id} not reported lost"
            return
        assert lost == [], f"live outcome of job {job.id} reported lost"
        job.recorded.add(lease.token)
        kind = outcome.kind
        job.token = None
        if kind in ("retry", "release") and job.cancel_requested:
            # A job that would go back while a cancel is pending ends cancelled.
            job.state, job.error_type = "cancelled", "taskq.JobCancelled"
        elif kind == "retry":
            job.state, job.due_in = "queued", outcome.delay
            job.error_type = orjson.loads(outcome.error or "null")["type"]
        elif kind == "release":
            job.state, job.due_in, job.attempts = "queued", 0.0, job.attempts - 1
        else:
            job.state = kind
            if kind != "succeeded" and outcome.error is not None:
                job.error_type = orjson.loads(outcome.error)["type"]

    # -- rules ---------------------------------------------------------------

    @initialize()
    def empty(self) -> None:
        self.h.run(
            self.h.conn.execute(
                self.h.sql("TRUNCATE {s}.jobs, {s}.history, {s}.queues RESTART IDENTITY")
            )
        )
        # claim() starts from a random queue; Hypothesis replays an example to
        # shrink it, so the session's random() must repeat itself.
        self.h.run(self.h.conn.execute("SELECT setseed(0.5)"))

    @precondition(
        lambda self: sum(j.state in ("queued", "running") for j in self.model.values()) < 6
    )
    @rule(
        target=jobs,
        count=st.integers(1, 3),
        queue=st.sampled_from(QUEUES),
        task=st.sampled_from(TASKS),
        priority=st.integers(-2, 2),
        max_attempts=st.integers(1, 4),
        delay=st.sampled_from(ENQUEUE_DELAYS),
    )
    def enqueue(
        self, count: int, queue: str, task: str, priority: int, max_attempts: int, delay: float
    ) -> Any:
        kwargs: dict[str, Any] = dict(
            queue=queue,
            task=task,
            priority=priority,
            run_at=None,
            delay=delay,
            max_attempts=max_attempts,
        )
        store, conn = self.h.store, self.h.conn
        if count == 1:
            ids = [self.h.run(store.insert_job(conn, args="{}", **kwargs))]
        else:
            args = orjson.dumps([{"i": i} for i in range(count)]).decode()
            ids = self.h.run(store.insert_jobs(conn, args=args, **kwargs))
        assert len(ids) == count and not set(ids) & set(self.model)
        for job_id in ids:
            self.model[job_id] = ModelJob(job_id, queue, task, priority, max_attempts, due_in=delay)
        return multiple(*ids)

    @rule(
        target=leases,
        limit=st.integers(1, 5),
        queues=st.sampled_from([None, ["q1", "q2"], ["q1"], ["q2"]]),
        tasks=st.sampled_from([list(TASKS), list(TASKS), ["t.a"], ["t.b"]]),
    )
    def claim(self, limit: int, queues: list[str] | None, tasks: list[str]) -> Any:
        eligible = {
            j.id: j
            for j in self.model.values()
            if j.due and j.task in tasks and (queues is None or j.queue in queues)
        }
        result = self.h.run(
            self.h.store.claim(
                self.h.conn,
                queues=queues,
                tasks=tasks,
                limit=limit,
                worker_id="w-sm",
                lease_seconds=LEASE,
            )
        )
        assert not result.held_back
        got = {c.id: c for c in result.jobs}
        assert len(got) == len(result.jobs) == min(limit, len(eligible)), (got, eligible)
        assert set(got) <= set(eligible), f"claimed jobs not due: {set(got) - set(eligible)}"
        # Within a queue, a higher priority is never passed over.
        for c in got.values():
            for u in eligible.values():
                if u.id not in got and u.queue == c.queue:
                    assert c.priority >= u.priority, (c, u)
        leases = []
        for c in result.jobs:
            job = self.model[c.id]
            job.state, job.attempts = "running", job.attempts + 1
            job.token, job.lease_left = c.token, LEASE
            assert c.attempts == job.attempts and c.max_attempts == job.max_attempts
            leases.append(Lease(c.id, c.token, c.attempts))
        return multiple(*leases)

    @rule(held=st.lists(leases, min_size=1, max_size=3, unique=True))
    def renew(self, held: list[Lease]) -> None:
        live = {lease.job_id for lease in held if self.live(lease)}
        stale_only = not live
        before = self.snapshot() if stale_only else None
        renewed = self.h.run(
            self.h.store.renew_leases(self.h.conn, [(x.job_id, x.token) for x in held], LEASE)
        )
        assert set(renewed) == live, (renewed, held)
        for job_id in live:
            assert renewed[job_id] is self.model[job_id].cancel_requested
            self.model[job_id].lease_left = LEASE
        if before is not None:
            assert self.snapshot() == before, "a renewal with stale tokens changed a row"

    @rule(lease=leases, live=LIVE, via_claim=st.booleans())
    def complete(self, lease: Lease, live: int | None, via_claim: bool) -> None:
        lease = self.pick(lease, live)
        self.write_back(
            lease, Outcome(lease.job_id, lease.token, "succeeded", result="1"), via_claim=via_claim
        )

    @rule(lease=leases, live=LIVE, delay=st.sampled_from(DELAYS), via_claim=st.booleans())
    def fail(self, lease: Lease, live: int | None, delay: float, via_claim: bool) -> None:
        """The attempt raised: retried while attempts are left (as a worker does), else failed."""
        lease = self.pick(lease, live)
        job = self.model[lease.job_id]
        if lease.attempt < job.max_attempts:
            outcome = Outcome(
                lease.job_id, lease.token, "retry", error=error_json("RetryMe"), delay=delay
            )
        else:
            outcome = Outcome(lease.job_id, lease.token, "failed", error=error_json("Boom"))
        self.write_back(lease, outcome, via_claim=via_claim)

    @rule(lease=leases, live=LIVE)
    def cancelled_by_worker(self, lease: Lease, live: int | None) -> None:
        lease = self.pick(lease, live)
        self.write_back(
            lease,
            Outcome(lease.job_id, lease.token, "cancelled", error=error_json("taskq.JobCancelled")),
            via_claim=False,
        )

    @rule(lease=leases, live=LIVE)
    def release(self, lease: Lease, live: int | None) -> None:
        """Shutdown interrupted the attempt: back at once, the attempt given back."""
        lease = self.pick(lease, live)
        self.write_back(lease, Outcome(lease.job_id, lease.token, "release"), via_claim=False)

    @rule(job_id=jobs)
    def cancel(self, job_id: int) -> None:
        """job.cancel(): a queued job ends at once; a running one is flagged."""
        job = self.model[job_id]
        store, conn = self.h.store, self.h.conn
        if self.h.run(store.cancel_queued(conn, job_id)):
            assert job.state == "queued", job
            job.state, job.error_type = "cancelled", "taskq.JobCancelled"
            return
        assert job.state != "queued", job
        flagged = self.h.run(store.request_cancel(conn, job_id))
        assert flagged is (job.state == "running"), job
        if flagged:
            job.cancel_requested = True

    @rule(max_rescues=st.integers(2, 3))
    def rescue(self, max_rescues: int) -> None:
        requeued, ended = self.h.run(self.h.store.rescue_expired(self.h.conn, max_rescues))
        expected_requeued, expected_ended = set(), set()
        for job in self.model.values():
            if not job.expired:
                continue
            job.token = None
            if job.cancel_requested:
                job.state, job.error_type = "cancelled", "taskq.JobCancelled"
            elif job.rescues + 1 >= max_rescues:  # poison, even when no attempt is left
                job.state, job.error_type = "failed", "taskq.PoisonJob"
            elif job.attempts >= job.max_attempts:
                job.state, job.error_type = "failed", "taskq.LeaseExpired"
            else:
                job.state, job.due_in = "queued", 0.0
                job.error_type = "taskq.LeaseExpired"
            job.rescues += 1
            (expected_requeued if job.state == "queued" else expected_ended).add(job.id)
        assert (set(requeued), set(ended)) == (expected_requeued, expected_ended)

    @rule(seconds=st.sampled_from(CLOCK_STEPS))
    def advance_clock(self, seconds: float) -> None:
        self.h.run(
            self.h.conn.execute(
                self.h.sql(
                    "UPDATE {s}.jobs SET run_at = run_at - make_interval(secs => $1), "
                    "lease_expires_at = lease_expires_at - make_interval(secs => $1)"
                ),
                seconds,
            )
        )
        for job in self.model.values():
            if job.state == "queued":
                job.due_in -= seconds
            elif job.state == "running":
                job.lease_left -= seconds
                job.due_in -= seconds

    @precondition(lambda self: any(j.state == "running" for j in self.model.values()))
    @rule(max_rescues=st.integers(2, 3))
    def worker_dies(self, max_rescues: int) -> None:
        """Every running job's lease runs out, then a live worker rescues them."""
        self.advance_clock(CLOCK_STEPS[-1])
        self.rescue(max_rescues)

    @precondition(lambda self: any(j.state in ("failed", "cancelled") for j in self.model.values()))
    @rule(job_id=jobs)
    def rerun(self, job_id: int) -> None:
        """job.retry() of a dead letter or a cancelled job: queued again, attempts from 0."""
        job = self.model[job_id]
        again = self.h.run(self.h.store.rerun(self.h.conn, job_id))
        assert again is (job.state in ("failed", "cancelled")), job
        if again:
            job.state, job.attempts, job.rescues, job.due_in = "queued", 0, 0, 0.0
            job.cancel_requested, job.token = False, None

    # -- invariants ----------------------------------------------------------

    @invariant()
    def database_matches_model(self) -> None:
        rows = self.q(
            "SELECT id, state, attempts, max_attempts, rescues, lease_token, worker_id, "
            "lease_expires_at IS NOT NULL AS has_expiry, cancel_requested, queue, task, "
            "priority, last_error->>'type' AS error_type, 'jobs' AS tbl FROM {s}.jobs "
            "UNION ALL SELECT id, state, attempts, max_attempts, rescues, NULL, NULL, false, "
            "false, queue, task, priority, error->>'type', 'history' FROM {s}.history"
        )
        seen: dict[int, str] = {}
        for r in rows:
            job_id = r["id"]
            assert job_id not in seen, f"job {job_id} is in both jobs and history"
            seen[job_id] = r["state"]
            job = self.model.get(job_id)
            assert job is not None, f"job {job_id} in the database, not in the model"
            assert r["attempts"] <= r["max_attempts"], dict(r)
            assert r["attempts"] >= 0, dict(r)
            actual = (
                r["state"],
                r["attempts"],
                r["max_attempts"],
                r["rescues"],
                r["lease_token"],
                r["queue"],
                r["task"],
                r["priority"],
            )
            expected = (
                job.state,
                job.attempts,
                job.max_attempts,
                job.rescues,
                job.token,
                job.queue,
                job.task,
                job.priority,
            )
            assert actual == expected, f"job {job_id}: database {actual}, model {expected}"
            if r["tbl"] == "jobs":
                assert r["cancel_requested"] is job.cancel_requested, (dict(r), job)
                running = r["state"] == "running"
                assert (r["lease_token"] is not None) is running, dict(r)
                assert (r["worker_id"] is not None) is running, dict(r)
                assert r["has_expiry"] is running, dict(r)
            if job.state != "succeeded" and job.error_type is not None:
                assert r["error_type"] == job.error_type, (dict(r), job)
        assert set(seen) == set(self.model), set(self.model) ^ set(seen)
        for job_id, state in seen.items():
            previous = self.seen_states.get(job_id)
            assert state == previous or (previous, state) in LEGAL, (
                f"job {job_id} moved {previous} -> {state}"
            )
        self.seen_states = seen

    @invariant()
    def no_job_runs_without_a_live_lease_in_the_model(self) -> None:
        for job in self.model.values():
            assert (job.token is not None) is (job.state == "running"), job
            assert job.attempts <= job.max_attempts, job


@pytest.fixture
def harness(pg_dsn: str, schema: str) -> Iterator[Harness]:
    h = Harness(pg_dsn, schema)
    try:
        yield h
    finally:
        h.close()


def test_job_lifecycle_state_machine(harness: Harness) -> None:
    JobMachine.h = harness
    run_state_machine_as_test(
        JobMachine,
        settings=settings(
            max_examples=300,
            stateful_step_count=50,
            deadline=None,
            database=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
