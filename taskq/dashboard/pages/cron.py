"""The cron page: the entries workers recorded, their next runs, their last job
and its outcome; and "trigger now", which makes an entry's job at once."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson

from ..._admin import statements
from ..._cron import CronEntry
from ..._errors import ConfigurationError, SerializationError, UnknownTaskError
from ..._names import quote_schema
from .._core import Action, Done, Form, NotFound, Page, View

#: Upcoming slots shown per entry.
NEXT_RUNS = 3


@lru_cache(maxsize=16)
def _sql(schema: str) -> dict[str, str]:
    s = quote_schema(schema)
    return {
        "entry": (
            f"SELECT name, task, queue, args::text AS args, priority FROM {s}.crons WHERE name = $1"
        ),
        # The entry's last job is the one made by hand too: the page shows how
        # it ended, like a scheduled one's.
        "record": f"UPDATE {s}.crons SET last_job_id = $2 WHERE name = $1",
    }


def next_runs(row: Any, now: datetime, count: int = NEXT_RUNS) -> list[datetime] | None:
    """The next ``count`` slots of a recorded entry (None if it no longer parses)."""
    try:
        entry = CronEntry(row["name"], row["expression"], row["task"], timezone=row["timezone"])
    except ConfigurationError:
        return None
    runs: list[datetime] = []
    moment = now
    while len(runs) < count:
        slot = entry.next_after(moment)
        if slot is None:
            break
        runs.append(slot)
        moment = slot
    return runs


async def load(view: View) -> dict[str, Any]:
    admin = statements(view.core.schema)
    app = view.core.app
    async with (
        view.core.database.acquire("reading the dashboard cron entries") as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        rows = await app.store.list_crons(conn)
        last_ids = [r["last_job_id"] for r in rows if r["last_job_id"] is not None]
        found = await conn.fetch(admin.locate, last_ids) if last_ids else []
    states = {r["id"]: r["state"] for r in found}
    now = datetime.now(UTC)
    entries = []
    for r in rows:
        last = r["last_job_id"]
        entries.append(
            {
                "name": r["name"],
                "expression": r["expression"],
                "timezone": r["timezone"],
                "task": r["task"],
                "queue": r["queue"],
                "args": r["args"],
                "missed": r["missed"],
                "last_slot": r["last_slot"],
                "last_job_id": last,
                # Purged from history, or deleted: the id alone is left.
                "last_state": states.get(last, "gone") if last is not None else None,
                "next_runs": next_runs(r, now),
            }
        )
    recorded = {r["name"] for r in rows}
    return {
        "title": "Cron",
        "now": now,
        "entries": entries,
        # Entries of this process's App that no worker has recorded yet.
        "unrecorded": sorted(name for name in app.crons if name not in recorded),
    }


async def trigger(form: Form) -> Done:
    """Make the entry's job now, outside its schedule (its slots are untouched)."""
    name = str(form.params["name"])
    app = form.core.app
    sql = _sql(form.core.schema)
    async with app.database.acquire("triggering a cron entry") as conn, conn.transaction():
        row = await conn.fetchrow(sql["entry"], name)
        if row is None:
            raise NotFound(f"There is no cron entry named {name!r}.")
        try:
            job = await app.enqueue(
                row["task"],
                orjson.loads(row["args"]),
                queue=row["queue"],
                priority=row["priority"],
                meta={"cron": name, "triggered_by": str(form.user)},
                connection=conn,
            )
        except (UnknownTaskError, SerializationError, ConfigurationError, TypeError) as exc:
            return Done("/cron", f"Cron entry {name} was not triggered: {exc}", ok=False)
        # In the job's transaction: the entry's last job is this one, or no job was made.
        await conn.execute(sql["record"], name, job.id)
    return Done(
        "/cron",
        f"Cron entry {name} triggered: job {job.id} is queued in {row['queue']}; "
        "it is the entry's last job below.",
    )


PAGES = [Page("/cron", "cron.html", load, nav="cron", regions={"entries": "cron_table.html"})]
ACTIONS = [Action("/cron/{name}/trigger", trigger)]
