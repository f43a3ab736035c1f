"""Which queues a worker that serves every queue claims from.

A worker started without ``queues`` serves all of them. Finding the queues
that hold queued jobs costs an index probe per queue plus a walk over the
claimed-but-not-yet-vacuumed entries at the front of the claim index, which
on a busy queue costs about as much as the claim itself. So the worker does
not ask with every claim: it looks again once half a poll interval has
passed (so always after sleeping through its poll, and twice per interval
at most while busy) and after a reconnect, hears of other queues from the
enqueue notifications in between, and names the queues it knows in each
claim. A job in a queue it has not heard of (a notification lost with the
listening connection) waits at most one poll interval, as it would for a
worker that only polls.
"""

from __future__ import annotations


class QueueDiscovery:
    """The queues known to hold jobs, and when to look again."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._queues: dict[str, None] = {}  # insertion-ordered set
        self._looked_at: float | None = None  # monotonic time of the last look

    def due(self, now: float) -> bool:
        """Whether the queues must be looked up before the next claim."""
        return self._looked_at is None or now - self._looked_at >= self.interval

    def found(self, queues: list[str], now: float) -> None:
        """The queues that hold queued jobs now: they replace what was known."""
        self._queues = dict.fromkeys(queues)
        self._looked_at = now

    def heard(self, queue: str) -> None:
        """A notification said ``queue`` has jobs."""
        self._queues[queue] = None

    def forget(self) -> None:
        """Notifications may have been missed (a reconnect): look again first."""
        self._looked_at = None

    @property
    def queues(self) -> list[str]:
        return list(self._queues)
