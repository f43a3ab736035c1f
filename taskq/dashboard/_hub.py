"""Live updates: one hub per dashboard process feeds every open page.

Browsers hold a server-sent events stream each; they never query Postgres.
A *topic* is one page address (``/jobs?state=failed``): the hub renders its
live regions once per refresh however many browsers show it, and sends each
browser only the regions whose HTML changed.

A refresh happens when the App's LISTEN connection hears of a change (a job
enqueued, retried or cancelled, a workflow moving, an awaited job ending) and
in any case once per ``interval``: a job that nobody awaits ends without a
notification (keeping the workers' hot path free of one), so counters that
depend on those ends are re-read on that beat, once for all browsers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import orjson

log = logging.getLogger("taskq.dashboard")

#: Renders a page's live regions: region name -> HTML.
Render = Callable[[], Awaitable[dict[str, str]]]
#: Subscribes a callback to the App's notifications; returns an unsubscribe function.
Listen = Callable[[Callable[[str], None]], Awaitable[Callable[[], None]]]

#: Notifications closer together than this are answered by one refresh.
DEBOUNCE_SECONDS = 0.2
#: A comment line this often keeps proxies from closing an idle stream.
KEEPALIVE_SECONDS = 15.0
#: A stream ends after this long and the browser opens a new one by itself
#: (``retry:``). A server that is shutting down waits for open responses and
#: cannot tell a stream to end, so no stream may outlive this.
STREAM_SECONDS = 20.0


@dataclass
class _Topic:
    render: Render
    subscribers: set[asyncio.Queue[bytes]] = field(default_factory=set)
    last: dict[str, str] = field(default_factory=dict)
    #: Subscribers that have had no refresh yet: they get every region once,
    #: since what changed while they were away (reconnecting) is unknown.
    fresh: set[asyncio.Queue[bytes]] = field(default_factory=set)


class Hub:
    """Renders subscribed pages on change and on a beat, and fans them out."""

    def __init__(self, listen: Listen, *, interval: float = 1.0) -> None:
        self._listen = listen
        self.interval = interval
        self._topics: dict[str, _Topic] = {}
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unlisten: Callable[[], None] | None = None
        #: Refreshes done, and pages rendered by them (once per topic, however
        #: many browsers show it).
        self.refreshes = 0
        self.renders = 0

    @property
    def topics(self) -> int:
        return len(self._topics)

    async def stream(
        self, key: str, render: Render, *, lifetime: float = STREAM_SECONDS
    ) -> AsyncIterator[bytes]:
        """The event stream of one browser showing the page ``key``."""
        await self._start()
        topic = self._topics.get(key)
        if topic is None:
            topic = self._topics[key] = _Topic(render)
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
        topic.subscribers.add(queue)
        topic.fresh.add(queue)
        self.poke()
        ends = time.monotonic() + lifetime
        try:
            yield b"retry: 1000\n: connected\n\n"
            while (left := ends - time.monotonic()) > 0:
                try:
                    yield await asyncio.wait_for(queue.get(), min(KEEPALIVE_SECONDS, left))
                except TimeoutError:
                    yield b": keepalive\n\n"
        finally:
            topic.subscribers.discard(queue)
            topic.fresh.discard(queue)
            if not topic.subscribers and self._topics.get(key) is topic:
                del self._topics[key]

    def poke(self, _payload: str = "") -> None:
        """Something changed: refresh soon."""
        self._dirty.set()

    async def _start(self) -> None:
        if self._task is not None and not self._task.done():
            return
        if self._unlisten is None:
            try:
                self._unlisten = await self._listen(self.poke)
            except Exception as exc:  # the beat still refreshes
                log.warning("taskq dashboard: live notifications unavailable (%s)", exc)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="taskq-dashboard")

    async def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.interval)
            # Let a burst of notifications settle into one refresh.
            await asyncio.sleep(max(0.0, DEBOUNCE_SECONDS - (time.monotonic() - started)))
            self._dirty.clear()
            self.refreshes += 1
            for key, topic in list(self._topics.items()):
                if topic.subscribers:
                    await self._refresh(key, topic)

    async def _refresh(self, key: str, topic: _Topic) -> None:
        self.renders += 1
        try:
            regions = await topic.render()
        except Exception as exc:  # one page failing must not stop the others
            log.warning("taskq dashboard: cannot refresh %s: %s", key, exc)
            message = orjson.dumps({"error": f"live updates paused: {exc}"})
            self._send(topic, b"event: problem\ndata: " + message + b"\n\n")
            return
        changed = {k: v for k, v in regions.items() if topic.last.get(k) != v}
        topic.last.update(changed)
        fresh, topic.fresh = topic.fresh, set()
        if fresh:
            self._send(topic, b"event: regions\ndata: " + orjson.dumps(regions) + b"\n\n", fresh)
        if changed:
            event = b"event: regions\ndata: " + orjson.dumps(changed) + b"\n\n"
            self._send(topic, event, topic.subscribers - fresh)

    @staticmethod
    def _send(topic: _Topic, event: bytes, to: set[asyncio.Queue[bytes]] | None = None) -> None:
        for queue in list(topic.subscribers if to is None else to):
            if queue.full():
                # A browser that stopped reading drops what it did not read and
                # gets every region at the next refresh instead.
                with contextlib.suppress(asyncio.QueueEmpty):
                    while True:
                        queue.get_nowait()
                topic.fresh.add(queue)
            queue.put_nowait(event)
