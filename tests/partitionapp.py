"""The App of tests/test_partition.py: a worker cut off from Postgres, and one that is not.

Jobs write what happens to them (start, done, cancelled, with the time) to a
file of their own process, not to Postgres: the cut-off worker must be able
to say when it gave a job up while it cannot reach the database.

``PART_ROLE=cut``: ``hang`` jobs run until cancelled, the others for a second.
Any other role runs every job for a tenth of a second.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import taskq

app = taskq.App()  # $TASKQ_DSN and $TASKQ_SCHEMA
ROLE = os.environ.get("PART_ROLE", "rescuer")
EVENTS = Path(os.environ.get("PART_EVENTS", ".")) / f"{ROLE}-{os.getpid()}.events"


def event(kind: str, n: int) -> None:
    with EVENTS.open("a") as f:
        f.write(f"{kind} {n} {time.time():.6f}\n")


@app.task(name="part.work", retry=taskq.Retry(attempts=5, wait=0))
async def work(n: int, hang: bool) -> int:
    event("start", n)
    try:
        if ROLE == "cut":
            await asyncio.sleep(3600 if hang else 1.0)
        else:
            await asyncio.sleep(0.1)
    except asyncio.CancelledError:
        event("cancelled", n)
        raise
    event("done", n)
    return n


def read_events(path: Path) -> list[tuple[str, int, float]]:
    """(kind, job number, unix time) of every event in one process's file."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        kind, n, at = line.split()
        rows.append((kind, int(n), float(at)))
    return rows
