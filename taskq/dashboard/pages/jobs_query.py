"""What the jobs page lists: a tab's filter, its SQL, and the bounded keyset reads.

Every read walks an index in id order from a cursor and looks at no more than
a window of rows (:data:`SCAN_ROWS`); the filters no index serves (queue,
task, text in the arguments, time ranges) are applied to that window only.
A page short of matches then says how far down it searched, and the next
page continues from there: a text search over a million rows costs many fast
pages, never one slow one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ..._names import quote_schema
from .._core import BadRequest

if TYPE_CHECKING:
    from .._core import Core

#: The tabs, in lifecycle order: (state, label, table).
TABS: tuple[tuple[str, str, str], ...] = (
    ("queued", "Ready", "jobs"),
    ("scheduled", "Scheduled", "jobs"),
    ("running", "Running", "jobs"),
    ("waiting", "Waiting", "jobs"),
    ("succeeded", "Succeeded", "history"),
    ("failed", "Failed", "history"),
    ("cancelled", "Cancelled", "history"),
)
TABLE_OF = {state: table for state, _label, table in TABS}
HISTORY_TABS = tuple(s for s, _l, t in TABS if t == "history")
#: Rows a page shows unless ``limit`` says otherwise; ``limit`` may not exceed MAX_PAGE_SIZE.
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
#: Rows of an index one page reads at most to find its matches: bounds the
#: cost of filters no index serves. A text search costs about 2 µs a row
#: (each row's arguments turned into text), a rare queue on the failed tab
#: one heap page a row: 10,000 keeps either near 20 ms.
SCAN_ROWS = 10_000
#: Rows per statement when a bulk action collects every matching id.
COLLECT_ROWS = 10_000
#: The largest bigint: the cursor of the first page.
TOP_ID = 2**63 - 1

# Conditions an index serves, read in id order: these choose the rows of the
# window. The waiting tab reads jobs_waiting, the failed and cancelled tabs
# history_unsucceeded, the others the primary key, except the running tab:
# running jobs are few (no more than the workers' slots) and the primary key
# would walk past every queued job to reach them, so it reads them all from
# the jobs_running partial index and sorts them ("id + 0" keeps the planner
# from choosing the primary key for its order).
_WINDOW = {
    "queued": "true",
    "scheduled": "true",
    "running": "state = 'running'",
    "waiting": "state = 'waiting'",
    "succeeded": "true",
    "failed": "state = 'failed'",
    "cancelled": "state = 'cancelled'",
}
_ORDER = {"running": "id + 0"}
# The tab's own condition on the window's rows.
_STATE = {
    "queued": "state = 'queued' AND run_at <= now()",
    "scheduled": "state = 'queued' AND run_at > now()",
    "running": "true",
    "waiting": "true",
    "succeeded": "state = 'succeeded'",
    "failed": "true",
    "cancelled": "true",
}
# The filters, as bind parameters $3..$9 (NULL: no filter). Text in the
# arguments is matched case-insensitively, its LIKE wildcards escaped
# (ILIKE is twice as fast as strpos(lower(...)) here).
_FILTERS = (
    "($3::text IS NULL OR queue = $3) AND ($4::text IS NULL OR task = $4) "
    "AND ($5::text IS NULL OR args::text ILIKE '%' || $5 || '%') "
    "AND ($6::timestamptz IS NULL OR enqueued_at >= $6) "
    "AND ($7::timestamptz IS NULL OR enqueued_at < $7) "
    "AND ($8::timestamptz IS NULL OR {finished} >= $8) "
    "AND ($9::timestamptz IS NULL OR {finished} < $9)"
)
_JOBS_COLUMNS = (
    "id, queue, task, state, left(args::text, 400) AS args, attempts, max_attempts, "
    "enqueued_at, run_at, started_at, NULL::timestamptz AS finished_at, "
    "last_error->>'type' AS error_type, left(last_error->>'message', 400) AS error_message, "
    "workflow_id, step, cancel_requested"
)
_HISTORY_COLUMNS = (
    "id, queue, task, state, left(args::text, 400) AS args, attempts, max_attempts, "
    "enqueued_at, NULL::timestamptz AS run_at, started_at, finished_at, "
    "error->>'type' AS error_type, left(error->>'message', 400) AS error_message, "
    "workflow_id, step, false AS cancel_requested"
)


@dataclass(frozen=True)
class Filter:
    """A tab and its filters, as the filter form (and the bulk forms) carry them."""

    state: str = "queued"
    queue: str = ""
    task: str = ""
    text: str = ""
    enqueued_after: str = ""
    enqueued_before: str = ""
    finished_after: str = ""
    finished_before: str = ""

    @classmethod
    def read(cls, get: Callable[[str], str]) -> Filter:
        """From a query string or a form (400 on a wrong state or time)."""
        values = {f.name: get(f.name).strip() for f in fields(cls)}
        found = cls(**{k: v for k, v in values.items() if v})
        if found.state not in TABLE_OF:
            raise BadRequest(f"state must be one of {', '.join(TABLE_OF)}, got {found.state!r}")
        for name in _TIMES:
            _time(name, getattr(found, name))
        if not found.history:
            # Live jobs have not finished: the fields would match nothing.
            found = replace(found, finished_after="", finished_before="")
        return found

    @property
    def table(self) -> str:
        return TABLE_OF[self.state]

    @property
    def history(self) -> bool:
        return self.table == "history"

    @property
    def narrow(self) -> bool:
        """Filters the bulk functions of taskq._admin cannot apply (text, times)."""
        return bool(self.text or any(getattr(self, n) for n in _TIMES))

    def items(self) -> list[tuple[str, str]]:
        """The fields that are set, for links and hidden form fields."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name)]

    def params(self) -> list[Any]:
        """Bind parameters $3..$9 of the statements."""
        return [
            self.queue or None,
            self.task or None,
            _like(self.text) or None,
            *(_time(name, getattr(self, name)) for name in _TIMES),
        ]

    def describe(self) -> str:
        """In words, for a confirmation: "in queue 'mail', of task 'x'"."""
        parts = []
        if self.queue:
            parts.append(f"in queue '{self.queue}'")
        if self.task:
            parts.append(f"of task '{self.task}'")
        if self.text:
            parts.append(f"whose arguments contain '{self.text}'")
        for name, words in _TIMES.items():
            if getattr(self, name):
                parts.append(f"{words} {_time(name, getattr(self, name)):%Y-%m-%d %H:%M:%S} UTC")
        return ", ".join(parts)


_TIMES = {
    "enqueued_after": "enqueued at or after",
    "enqueued_before": "enqueued before",
    "finished_after": "finished at or after",
    "finished_before": "finished before",
}


def _like(text: str) -> str:
    """``text`` as a LIKE pattern matching itself (backslash is LIKE's escape)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _time(name: str, value: str) -> datetime | None:
    """An ``<input type=datetime-local>`` value (or ISO time); UTC unless it says otherwise."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(
            f"{name} must be a date and time like 2025-01-31T14:00, got {value!r}"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class TabSql:
    """The statements of one tab in one schema."""

    #: Matches older than $1, newest first, in a window of $2 rows; up to $10.
    older: str
    #: Matches newer than $1, oldest first, in a window of $2 rows; up to $10.
    newer: str
    #: The window older (or newer) than $1: how many rows and its far end.
    window_older: str
    window_newer: str
    #: Matching ids older than $1 in a window of $2 rows, and the window's extent.
    collect: str
    #: The table's highest id now: where a bulk action over the filter stops.
    top: str


@lru_cache(maxsize=64)
def tab_sql(schema: str, state: str) -> TabSql:
    s = quote_schema(schema)
    table = TABLE_OF[state]
    columns = _HISTORY_COLUMNS if table == "history" else _JOBS_COLUMNS
    finished = "finished_at" if table == "history" else "NULL::timestamptz"
    where = f"{_STATE[state]} AND {_FILTERS.format(finished=finished)}"

    def window(cols: str, op: str, order: str) -> str:
        # The LIMIT inside is the bound: the outer WHERE is never pushed into
        # it, so a filter that matches nothing still reads at most $2 rows.
        return (
            f"SELECT {cols} FROM {s}.{table} WHERE {_WINDOW[state]} AND id {op} $1 "
            f"ORDER BY {_ORDER.get(state, 'id')} {order} LIMIT $2"
        )

    return TabSql(
        older=(
            f"SELECT * FROM ({window(columns, '<', 'DESC')}) AS w WHERE {where} "
            "ORDER BY id DESC LIMIT $10"
        ),
        newer=(
            f"SELECT * FROM ({window(columns, '>', 'ASC')}) AS w WHERE {where} "
            "ORDER BY id ASC LIMIT $10"
        ),
        window_older=(
            f"SELECT count(*) AS n, min(id) AS edge FROM ({window('id', '<', 'DESC')}) AS w"
        ),
        window_newer=(
            f"SELECT count(*) AS n, max(id) AS edge FROM ({window('id', '>', 'ASC')}) AS w"
        ),
        collect=(
            f"WITH w AS MATERIALIZED ({window(columns, '<', 'DESC')}) "
            "SELECT (SELECT count(*) FROM w) AS n, (SELECT min(id) FROM w) AS edge, "
            f"array(SELECT id FROM w WHERE {where} ORDER BY id) AS ids"
        ),
        top=f"SELECT coalesce(max(id), 0) FROM {s}.{table}",
    )


@dataclass(frozen=True)
class Listing:
    """One page of a tab: its rows (newest first) and where the next pages start."""

    rows: list[dict[str, Any]]
    #: ``before=`` of the next older page (None: nothing older).
    older: int | None
    #: ``after=`` of the next newer page (None: this is the newest).
    newer: int | None
    #: The page is short because its window ended here: "searched down to id X".
    searched_to: int | None = None
    #: Going newer, the window ended here: "searched up to id X".
    searched_up_to: int | None = None


async def read_page(
    conn: Any,
    schema: str,
    f: Filter,
    *,
    before: int | None,
    after: int | None,
    limit: int,
    scan: int | None = None,
) -> Listing:
    """One page of the tab, older than ``before`` or newer than ``after``."""
    scan = SCAN_ROWS if scan is None else scan
    sql = tab_sql(schema, f.state)
    params = f.params()
    if after is None:
        cursor = TOP_ID if before is None else before
        rows = [dict(r) for r in await conn.fetch(sql.older, cursor, scan, *params, limit + 1)]
        older: int | None = None
        searched_to = None
        if len(rows) > limit:
            rows = rows[:limit]
            older = rows[-1]["id"]
        else:
            n, edge = await conn.fetchrow(sql.window_older, cursor, scan)
            if n >= scan:  # the window was full: older rows were not looked at
                older = searched_to = edge
        newer = None if before is None else (rows[0]["id"] if rows else before - 1)
        return Listing(rows, older, newer, searched_to=searched_to)
    rows = [dict(r) for r in await conn.fetch(sql.newer, after, scan, *params, limit + 1)]
    newer = searched_up_to = None
    if len(rows) > limit:
        rows = rows[:limit]
        newer = rows[-1]["id"]
    else:
        n, edge = await conn.fetchrow(sql.window_newer, after, scan)
        if n >= scan:
            newer = searched_up_to = edge
    rows.reverse()
    older = rows[-1]["id"] if rows else after + 1
    return Listing(rows, older, newer, searched_up_to=searched_up_to)


async def top_id(core: Core, f: Filter) -> int:
    """The tab's table's highest id now: the end of a bulk action over a filter."""
    async with core.database.acquire("reading the newest job id") as conn:
        value: int = await conn.fetchval(tab_sql(core.schema, f.state).top)
    return value


async def matching_ids(core: Core, f: Filter, upto: int) -> list[int]:
    """Every id up to ``upto`` that matches the filter, in windows of COLLECT_ROWS rows."""
    sql = tab_sql(core.schema, f.state)
    params = f.params()
    ids: list[int] = []
    cursor = upto + 1
    async with core.database.acquire("collecting the jobs a bulk action takes") as conn:
        while True:
            row = await conn.fetchrow(sql.collect, cursor, COLLECT_ROWS, *params)
            ids.extend(row["ids"])
            if row["n"] < COLLECT_ROWS:
                return ids
            cursor = row["edge"]
