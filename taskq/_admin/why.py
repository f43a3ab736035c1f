"""Why is this job not running? The reasons, computed by the rules that ``claim()`` applies.

``objects/claim.sql`` is the truth this module follows: a job starts when it is
queued and due, its queue is not paused, its queue's concurrency limit and
rate window and its task's rate window have room, and a live worker that has
its task and serves its queue has a free slot; within a queue, jobs start in
``jobs_claim`` order (priority, then due time, then id). In a queue with a
per-key limit (``objects/claim_keyed.sql``) the job's concurrency key must
also be under that limit, keys take turns, and only the key's own jobs are
ahead of it. A workflow step waits (state ``waiting``) until its parents
have ended.

Everything is read in one read-only repeatable-read transaction, so the
reasons describe one instant: a job cannot look both running and queued.
Every statement reads by index (``tests/test_plans.py`` checks the plans on
a million rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from .._errors import JobNotFound
from .._names import quote_schema
from .._results import LIVE_WORKER_SECONDS, is_bigint
from .._serialization import decode
from .wording import are, attempts, iso, plural, span, when

if TYPE_CHECKING:
    from .._database import Database

#: Jobs ahead of a job in its queue are counted up to this many ("more than 10,000").
AHEAD_CAP = 10_000
#: How far into a queue's claim order claim_keyed() looks for a job without a
#: concurrency key (its c_window; tests/test_why_not_running.py checks they agree).
KEY_WINDOW = 100
#: Parent steps listed by name in a reason (the counts cover all of them).
MAX_PARENTS_LISTED = 20


@dataclass(frozen=True)
class Reason:
    """One thing that holds a job back (or, for ``running``/``finished``/``ready``, why
    nothing does). ``details`` holds JSON-ready values only: timestamps as ISO 8601
    strings, durations in seconds."""

    code: str
    message: str
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {"code": self.code, "message": self.message, "details": self.details}


@dataclass(frozen=True)
class Explanation:
    """Every reason that holds for one job at one instant, most important first (never empty)."""

    job_id: int
    state: str
    reasons: list[Reason]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "job_id": self.job_id,
            "state": self.state,
            "reasons": [r.to_dict() for r in self.reasons],
        }


class WhyStatements:
    """The SQL of :func:`why_not_running` for one schema (quoted in one place)."""

    def __init__(self, schema: str) -> None:
        s = quote_schema(schema)
        self.live_job = (
            "SELECT id, queue, task, state, priority, run_at, attempts, max_attempts, worker_id, "
            "started_at, lease_expires_at, cancel_requested, workflow_id, step, concurrency_key, "
            "last_error::text AS error, extract(epoch FROM run_at - now())::float8 AS due_in, "
            "extract(epoch FROM lease_expires_at - now())::float8 AS lease_left "
            f"FROM {s}.jobs WHERE id = $1"
        )
        self.finished_job = (
            "SELECT id, queue, task, state, attempts, max_attempts, worker_id, finished_at, "
            f"error::text AS error, workflow_id, step FROM {s}.history WHERE id = $1"
        )
        # The queue's settings, its running jobs (jobs_running) when it has a
        # concurrency limit, those of the job's concurrency key ($2; NULL: the
        # jobs without one) when it has a per-key limit, and its rate window as
        # rate_budget() judges one more start now. used: starts still in the window.
        _window = (
            "(SELECT coalesce(sum(u.n), 0) FROM unnest(x.rate_log_at, x.rate_log_n) AS u(at, n) "
            "WHERE u.at > now() - make_interval(secs => x.rate_period))::integer AS used, "
            "b.allowed, b.wait"
        )
        _budget = (
            f"LEFT JOIN LATERAL {s}.rate_budget(x.rate_limit, x.rate_period, x.rate_log_at, "
            "x.rate_log_n, now(), 1) AS b ON x.rate_limit IS NOT NULL"
        )
        self.queue = (
            "SELECT x.paused, x.concurrency_limit, x.rate_limit, x.rate_period, "
            f"CASE WHEN x.concurrency_limit IS NOT NULL THEN (SELECT count(*) FROM {s}.jobs AS j "
            "WHERE j.queue = x.name AND j.state = 'running') END AS running, x.per_key_limit, "
            f"CASE WHEN x.per_key_limit IS NOT NULL THEN (SELECT count(*) FROM {s}.jobs AS j "
            "WHERE j.queue = x.name AND j.state = 'running' "
            "AND j.concurrency_key IS NOT DISTINCT FROM $2::text) END AS key_running, "
            f"{_window} FROM {s}.queues AS x {_budget} WHERE x.name = $1"
        )
        self.task = (
            f"SELECT x.rate_limit, x.rate_period, {_window} FROM {s}.tasks AS x {_budget} "
            "WHERE x.name = $1 AND x.rate_limit IS NOT NULL"
        )
        # The workers table is tiny: one row per process.
        self.workers = (
            "SELECT w.id, w.hostname, w.pid, w.queues, w.concurrency, w.heartbeat_at, "
            "$1 = ANY(w.tasks) AS has_task, (w.queues IS NULL OR $2 = ANY(w.queues)) AS serves, "
            "w.heartbeat_at > now() - make_interval(secs => $3) AS live "
            f"FROM {s}.workers AS w ORDER BY w.hostname, w.pid, w.id"
        )
        # Running rows only, through the jobs_running partial index.
        self.running_by_worker = (
            f"SELECT worker_id, count(*) AS n FROM {s}.jobs WHERE state = 'running' "
            "AND worker_id = ANY($1::text[]) GROUP BY worker_id"
        )
        # Due jobs before this one in claim order: two ranges of jobs_claim
        # (higher priority; same priority and earlier in (run_at, id)), each
        # read in index order and cut at $5 + 1 rows, so a deep backlog costs
        # a bounded walk.
        self.ahead = (
            "SELECT count(*) FROM (("
            f"SELECT 1 FROM {s}.jobs WHERE state = 'queued' AND queue = $1 AND priority > $2 "
            "AND run_at <= now() ORDER BY queue, priority DESC, run_at, id LIMIT $5 + 1"
            ") UNION ALL ("
            f"SELECT 1 FROM {s}.jobs WHERE state = 'queued' AND queue = $1 AND priority = $2 "
            "AND (run_at, id) < ($3::timestamptz, $4::bigint) "
            "ORDER BY queue, priority DESC, run_at, id LIMIT $5 + 1"
            ") LIMIT $5 + 1) AS a"
        )
        # In a queue with a per-key limit, the order that matters is within the
        # job's key ($6): the same two ranges of jobs_keyed.
        self.ahead_in_key = (
            "SELECT count(*) FROM (("
            f"SELECT 1 FROM {s}.jobs WHERE state = 'queued' AND queue = $1 "
            "AND concurrency_key IS NOT NULL AND concurrency_key = $6 AND priority > $2 "
            "AND run_at <= now() ORDER BY queue, concurrency_key, priority DESC, run_at, id "
            "LIMIT $5 + 1) UNION ALL ("
            f"SELECT 1 FROM {s}.jobs WHERE state = 'queued' AND queue = $1 "
            "AND concurrency_key IS NOT NULL AND concurrency_key = $6 AND priority = $2 "
            "AND (run_at, id) < ($3::timestamptz, $4::bigint) "
            "ORDER BY queue, concurrency_key, priority DESC, run_at, id LIMIT $5 + 1"
            ") LIMIT $5 + 1) AS a"
        )
        # A job without a key in such a queue: claim_keyed() looks for it among
        # the queue's first KEY_WINDOW queued jobs in claim order (jobs_claim).
        # Whether this one is among them, and the due keyless jobs before it.
        self.key_window = (
            "SELECT coalesce(bool_or(w.id = $4), false) AS inside, count(*) FILTER ("
            "WHERE w.concurrency_key IS NULL AND w.run_at <= now() AND (w.priority > $2 "
            "OR (w.priority = $2 AND (w.run_at, w.id) < ($3::timestamptz, $4::bigint)))) AS ahead "
            f"FROM (SELECT id, concurrency_key, priority, run_at FROM {s}.jobs "
            "WHERE state = 'queued' AND queue = $1 ORDER BY queue, priority DESC, run_at, id "
            "LIMIT $5) AS w"
        )
        self.step = f"SELECT kind, expanded FROM {s}.workflow_steps WHERE job_id = $1"
        # A step's edges from its parents (position NULL) and, for a map that
        # expanded, from its items. An ended parent's outcome is on the edge.
        self.edge_counts = (
            "SELECT count(*) FILTER (WHERE position IS NULL) AS parents, "
            "count(*) FILTER (WHERE position IS NULL AND outcome IS NULL) AS parents_pending, "
            "count(*) FILTER (WHERE position IS NOT NULL) AS items, "
            "count(*) FILTER (WHERE position IS NOT NULL AND outcome IS NULL) AS items_pending "
            f"FROM {s}.workflow_edges WHERE child_id = $1"
        )
        self.parents = (
            "SELECT e.parent_step AS name, e.parent_id AS job_id, "
            "coalesce(e.outcome, j.state, 'unknown') AS state, e.outcome IS NOT NULL AS ended "
            f"FROM {s}.workflow_edges AS e LEFT JOIN {s}.jobs AS j ON j.id = e.parent_id "
            "WHERE e.child_id = $1 AND e.position IS NULL "
            "ORDER BY e.outcome IS NULL DESC, e.parent_id LIMIT $2"
        )


@lru_cache(maxsize=16)
def why_statements(schema: str) -> WhyStatements:
    """The statements of one schema, built once."""
    return WhyStatements(schema)


async def why_not_running(database: Database, schema: str, job_id: int) -> Explanation:
    """Why job ``job_id`` is not running now: every reason that holds, most important first.

    A running or finished job gets one reason saying so (``running``,
    ``finished``); a job nothing holds back gets ``ready``. Reasons that
    change from one claim to the next (limits, busy workers, jobs ahead) are
    given only for a job the claim would consider now (queued and due);
    a scheduled job or a waiting step also gets the lasting ones (a paused
    queue, no worker for its task or queue).

    Raises:
        JobNotFound: no job with that id (or it was pruned from history).
    """
    if not is_bigint(job_id):
        raise JobNotFound(f"no job with id {job_id} in schema {schema!r}")
    sql = why_statements(schema)
    # One snapshot: the job, its queue, the workers and the counts agree.
    async with (
        database.acquire("explaining a job") as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        now: datetime = await conn.fetchval("SELECT now()")
        job = await conn.fetchrow(sql.live_job, job_id)
        if job is None:
            done = await conn.fetchrow(sql.finished_job, job_id)
            if done is None:
                raise JobNotFound(f"no job with id {job_id} in schema {schema!r}")
            return Explanation(job_id, done["state"], [_finished(done)])
        queue, task, state = job["queue"], job["task"], job["state"]
        workers = await conn.fetch(sql.workers, task, queue, LIVE_WORKER_SECONDS)
        if state == "running":
            return Explanation(job_id, state, _running(job, workers))
        reasons: list[Reason] = []
        if state == "waiting":
            reasons += await _waiting(conn, sql, job)
        elif job["due_in"] > 0:
            reasons.append(_not_due(job, now))
        q = await conn.fetchrow(sql.queue, queue, job["concurrency_key"])
        if q is not None and q["paused"]:
            reasons.append(_paused(queue))
        live = [w for w in workers if w["live"]]
        reasons += _no_worker(schema, task, queue, workers, live)
        if not reasons:
            # Queued, due, and a worker could take it: what the claim weighs next.
            reasons += _limits(job, q, await conn.fetchrow(sql.task, task), now)
            able = [w["id"] for w in live if w["has_task"] and w["serves"]]
            rows = await conn.fetch(sql.running_by_worker, able)
            running = {r["worker_id"]: int(r["n"]) for r in rows}
            reasons += _busy(live, running)
            reasons += await _order(conn, sql, job, q)
            if not reasons:
                free = sum(
                    max(0, w["concurrency"] - running.get(w["id"], 0))
                    for w in live
                    if w["has_task"] and w["serves"]
                )
                reasons.append(_ready(job_id, queue, free))
    return Explanation(job_id, state, reasons)


# -- finished and running ---------------------------------------------------------


def _finished(row: Any) -> Reason:
    error = _error(row["error"])
    tail = f": {error['type']}: {error['message']}" if error and row["state"] == "failed" else ""
    return Reason(
        "finished",
        f"job {row['id']} has finished: it {row['state']} at {when(row['finished_at'])} "
        f"after {attempts(row['attempts'], row['max_attempts'])}{tail}",
        {
            "state": row["state"],
            "finished_at": row["finished_at"].isoformat(),
            "attempts": row["attempts"],
            "max_attempts": row["max_attempts"],
            "worker_id": row["worker_id"],
            "error_type": error.get("type") if error else None,
            "error_message": error.get("message") if error else None,
        },
    )


def _running(job: Any, workers: list[Any]) -> list[Reason]:
    worker = next((w for w in workers if w["id"] == job["worker_id"]), None)
    host = worker["hostname"] if worker else None
    worker_live = bool(worker and worker["live"])
    left = float(job["lease_left"])
    on = f"worker {job['worker_id']}" + (f" on host {host}" if host else "")
    cancel = "; a cancel was requested and the worker is stopping it"
    cancel = cancel if job["cancel_requested"] else ""
    running = Reason(
        "running",
        f"job {job['id']} is running: attempt {job['attempts']} of {job['max_attempts']} "
        f"on {on}, its lease runs until {when(job['lease_expires_at'])}{cancel}",
        {
            "worker_id": job["worker_id"],
            "hostname": host,
            "pid": worker["pid"] if worker else None,
            "worker_live": worker_live,
            "started_at": iso(job["started_at"]),
            "lease_expires_at": iso(job["lease_expires_at"]),
            "lease_seconds_left": round(left, 3),
            "attempts": job["attempts"],
            "max_attempts": job["max_attempts"],
            "cancel_requested": bool(job["cancel_requested"]),
        },
    )
    if left > 0:
        return [running]
    # A worker renews its leases every lease/3: an expired lease means it
    # died or lost the database; the rescue puts the job back.
    gone = "is still registered" if worker_live else "has no recent heartbeat"
    expired = Reason(
        "lease_expired",
        f"the lease of job {job['id']} expired {span(-left)} ago and its worker "
        f"{job['worker_id']} {gone}: the next rescue by a live worker puts it back in "
        "the queue (or fails it when its attempts are spent)",
        {
            "worker_id": job["worker_id"],
            "worker_live": worker_live,
            "lease_expires_at": iso(job["lease_expires_at"]),
            "seconds_ago": round(-left, 3),
        },
    )
    return [expired, running]


# -- waiting steps and due times ----------------------------------------------------


async def _waiting(conn: Any, sql: WhyStatements, job: Any) -> list[Reason]:
    step = await conn.fetchrow(sql.step, job["id"])
    counts = await conn.fetchrow(sql.edge_counts, job["id"])
    where = f"job {job['id']} is step {job['step']!r} of workflow {job['workflow_id']}"
    base = {"workflow_id": job["workflow_id"], "step": job["step"]}
    if step is not None and step["kind"] == "map" and step["expanded"]:
        items, pending = int(counts["items"]), int(counts["items_pending"])
        return [
            Reason(
                "waiting_for_map_items",
                f"{where}, a map, and waits for {pending} of its {items} item steps to end",
                {**base, "items": items, "pending": pending},
            )
        ]
    rows = await conn.fetch(sql.parents, job["id"], MAX_PARENTS_LISTED)
    parents = [
        {"name": r["name"], "job_id": r["job_id"], "state": r["state"], "ended": r["ended"]}
        for r in rows
    ]
    total, pending = int(counts["parents"]), int(counts["parents_pending"])
    shown = ", ".join(f"{p['name']!r} ({p['state']})" for p in parents if not p["ended"])
    more = pending - sum(not p["ended"] for p in parents)
    shown += f" and {more} more" if more > 0 else ""
    return [
        Reason(
            "waiting_for_parents",
            f"{where} and waits for {pending} of its {total} parent steps to end: {shown}",
            {**base, "parents": parents, "pending": pending, "total": total},
        )
    ]


def _not_due(job: Any, now: datetime) -> Reason:
    left = float(job["due_in"])
    details = {
        "run_at": job["run_at"].isoformat(),
        "seconds_left": round(left, 3),
        "now": now.isoformat(),
        "attempts": job["attempts"],
        "max_attempts": job["max_attempts"],
    }
    due = f"at {when(job['run_at'])}, in {span(left)} (database clock)"
    error = _error(job["error"])
    if job["attempts"] > 0 and error:
        # Only a retry puts a job back due later with attempts spent (a
        # release or a rescue makes it due now).
        return Reason(
            "retry_backoff",
            f"job {job['id']} waits to be retried: attempt {job['attempts']} of "
            f"{job['max_attempts']} failed with {error.get('type')}: "
            f"{str(error.get('message'))[:200]}; the next attempt starts {due}",
            {**details, "error_type": error.get("type"), "error_message": error.get("message")},
        )
    return Reason("scheduled", f"job {job['id']} is scheduled to run {due}", details)


# -- the queue, its limits and the workers ----------------------------------------


def _paused(queue: str) -> Reason:
    return Reason(
        "queue_paused",
        f"queue {queue!r} is paused: none of its jobs starts until it is resumed "
        f"(python -m taskq queues resume {queue})",
        {"queue": queue},
    )


def _no_worker(
    schema: str, task: str, queue: str, workers: list[Any], live: list[Any]
) -> list[Reason]:
    if not live:
        last = max((w["heartbeat_at"] for w in workers), default=None)
        seen = f"; the last heartbeat was at {when(last)}" if last else ""
        return [
            Reason(
                "no_workers",
                f"no worker is running on schema {schema!r} (none has a heartbeat within "
                f"{LIVE_WORKER_SECONDS:g} s{seen}): start one with python -m taskq worker",
                {
                    "live_after_seconds": LIVE_WORKER_SECONDS,
                    "stale_workers": [w["id"] for w in workers],
                    "last_heartbeat_at": iso(last),
                },
            )
        ]
    with_task = [w["id"] for w in live if w["has_task"]]
    serving = [w["id"] for w in live if w["serves"]]
    reasons = []
    if not with_task:
        reasons.append(
            Reason(
                "no_worker_for_task",
                f"no live worker has task {task!r} ({plural(len(live), 'worker')} live): deploy "
                "a worker that registers it, or check the task name the job was enqueued under",
                {"task": task, "live_workers": [w["id"] for w in live]},
            )
        )
    if not serving:
        served = sorted({q for w in live for q in (w["queues"] or [])})
        reasons.append(
            Reason(
                "no_worker_for_queue",
                f"no live worker serves queue {queue!r} ({plural(len(live), 'worker')} live, "
                f"serving {', '.join(map(repr, served))}): start one with --queues {queue}",
                {"queue": queue, "live_workers": [w["id"] for w in live], "served": served},
            )
        )
    if with_task and serving and not set(with_task) & set(serving):
        reasons.append(
            Reason(
                "no_worker_for_task_in_queue",
                f"{plural(len(with_task), 'live worker')} with task {task!r} and "
                f"{plural(len(serving), 'live worker')} serving queue {queue!r}, but no worker "
                "does both",
                {"task": task, "queue": queue, "with_task": with_task, "serving_queue": serving},
            )
        )
    return reasons


def _limits(job: Any, q: Any, t: Any, now: datetime) -> list[Reason]:
    queue, reasons = job["queue"], []
    if q is not None and q["concurrency_limit"] is not None:
        limit, running = int(q["concurrency_limit"]), int(q["running"])
        if running >= limit:
            reasons.append(
                Reason(
                    "queue_limit_full",
                    f"queue {queue!r} has a concurrency limit of {limit} and "
                    f"{plural(running, 'job')} of it {are(running)} running: the next one starts "
                    "when one of them ends",
                    {"queue": queue, "limit": limit, "running": running},
                )
            )
    if q is not None and q["per_key_limit"] is not None:
        limit, running, key = int(q["per_key_limit"]), int(q["key_running"]), job["concurrency_key"]
        if running >= limit:
            whose = f"key {key!r}" if key is not None else "the jobs without a key"
            reasons.append(
                Reason(
                    "key_limit_full",
                    f"queue {queue!r} runs at most {plural(limit, 'job')} per concurrency key "
                    f"at once and {whose} {'has' if key is not None else 'have'} "
                    f"{running:,} running: the next one starts when one of them ends",
                    {"queue": queue, "concurrency_key": key, "limit": limit, "running": running},
                )
            )
    if q is not None and q["rate_limit"] is not None and q["allowed"] < 1:
        reasons.append(_rated("queue_rate_limited", f"queue {queue!r}", {"queue": queue}, q, now))
    if t is not None and t["allowed"] < 1:
        task = job["task"]
        reasons.append(_rated("task_rate_limited", f"task {task!r}", {"task": task}, t, now))
    return reasons


def _rated(code: str, what: str, names: dict[str, Any], row: Any, now: datetime) -> Reason:
    limit, period, used = int(row["rate_limit"]), float(row["rate_period"]), int(row["used"])
    wait = float(row["wait"])
    frees = now + timedelta(seconds=wait)
    return Reason(
        code,
        f"{what} allows {plural(limit, 'start')} per {span(period)} and {used} "
        f"{'was' if used == 1 else 'were'} used in the current window: the next start frees "
        f"at {when(frees)}, in {span(wait)}",
        {
            **names,
            "limit": limit,
            "period_seconds": period,
            "used": used,
            "next_start_at": frees.isoformat(),
            "seconds_left": round(wait, 3),
        },
    )


def _busy(live: list[Any], running: dict[str, int]) -> list[Reason]:
    able = [w for w in live if w["has_task"] and w["serves"]]
    slots = sum(int(w["concurrency"]) for w in able)
    used = sum(min(running.get(w["id"], 0), int(w["concurrency"])) for w in able)
    if not able or used < slots:
        return []
    return [
        Reason(
            "workers_busy",
            f"{'the' if len(able) == 1 else 'all'} {plural(len(able), 'live worker')} that can "
            f"run it {are(len(able))} full: {used} of {plural(slots, 'slot')} taken",
            {
                "workers": [
                    {
                        "id": w["id"],
                        "hostname": w["hostname"],
                        "concurrency": int(w["concurrency"]),
                        "running": running.get(w["id"], 0),
                    }
                    for w in able
                ],
                "slots": slots,
                "running": used,
            },
        )
    ]


async def _order(conn: Any, sql: WhyStatements, job: Any, q: Any) -> list[Reason]:
    """The jobs that start before this one: in its queue, or in its key when the queue
    shares by key (keys take turns, so only the key's own jobs are ahead)."""
    queue, key = job["queue"], job["concurrency_key"]
    order = (job["priority"], job["run_at"], job["id"])
    if q is None or q["per_key_limit"] is None:
        ahead = int(await conn.fetchval(sql.ahead, queue, *order, AHEAD_CAP))
        return [_ahead(queue, None, ahead)] if ahead else []
    if key is not None:
        ahead = int(await conn.fetchval(sql.ahead_in_key, queue, *order, AHEAD_CAP, key))
        return [_ahead(queue, key, ahead)] if ahead else []
    window = await conn.fetchrow(sql.key_window, queue, *order, KEY_WINDOW)
    if not window["inside"]:
        return [
            Reason(
                "beyond_key_window",
                f"it has no concurrency key, and queue {queue!r} shares by key (a per-key "
                f"limit): a job without a key starts only from among the first {KEY_WINDOW} "
                "queued jobs of the queue in claim order, and it is further back; it starts "
                "when the jobs before it have moved on (give this queue's jobs a key)",
                {"queue": queue, "window": KEY_WINDOW},
            )
        ]
    ahead = int(window["ahead"])
    return [_ahead(queue, None, ahead, keyless=True)] if ahead else []


def _ahead(queue: str, key: str | None, ahead: int, keyless: bool = False) -> Reason:
    capped = ahead > AHEAD_CAP
    count = f"more than {AHEAD_CAP:,}" if capped else f"{ahead:,}"
    of = f" of key {key!r}" if key is not None else " without a key" if keyless else ""
    turns = " (keys take turns)" if key is not None or keyless else ""
    return Reason(
        "behind_other_jobs",
        f"{count} due {'job' if ahead == 1 else 'jobs'}{of} {are(ahead)} ahead of it in queue "
        f"{queue!r}{turns} (a higher priority, or the same priority and due earlier): it "
        "starts when its turn comes",
        {
            "queue": queue,
            **({"concurrency_key": key} if key is not None else {}),
            "ahead": min(ahead, AHEAD_CAP),
            "capped": capped,
        },
    )


def _ready(job_id: int, queue: str, free: int) -> Reason:
    return Reason(
        "ready",
        f"nothing holds job {job_id} back: the next free worker serving queue {queue!r} "
        f"claims it ({plural(free, 'free slot')} now)",
        {"queue": queue, "free_slots": free},
    )


# -- formatting -----------------------------------------------------------------


def _error(text: str | None) -> dict[str, Any] | None:
    value = decode(text) if text else None
    return value if isinstance(value, dict) else None
