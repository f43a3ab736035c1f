"""Live updates: pages are pushed over server-sent events by one hub per
dashboard, fed by the App's LISTEN connection; browsers never query Postgres."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import httpx
import orjson
import pytest

import taskq
from taskq.dashboard import Dashboard, no_auth

from .dashboard_support import serve

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def events(client: httpx.AsyncClient, page: str) -> AsyncIterator[AsyncIterator[dict]]:
    """The stream of one browser showing ``page``: yields each regions event."""
    async with client.stream("GET", "/events", params={"page": page}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")

        async def regions() -> AsyncIterator[dict]:
            kind = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: ") and kind == "regions":
                    yield orjson.loads(line.removeprefix("data: "))

        yield regions()


async def test_a_notification_pushes_the_change_long_before_the_beat(app: taskq.App) -> None:
    @app.task(queue="mail")
    async def send(to: str) -> None: ...

    async with app:
        # The beat is 60 s: anything sooner came from a notification.
        dashboard = Dashboard(app, auth=no_auth, live_interval=60)
        async with (
            serve(dashboard) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as client,
            events(client, "/") as stream,
        ):
            await anyio.sleep(0.3)  # the stream is subscribed
            await send.enqueue(to="a@example.com")
            with anyio.fail_after(10):
                async for regions in stream:
                    if 'data-count="queued">1<' in regions.get("summary", ""):
                        break
            assert dashboard.hub.refreshes >= 1
        await dashboard.aclose()


async def test_one_render_per_refresh_serves_every_browser(app: taskq.App) -> None:
    @app.task
    async def noop() -> None: ...

    async with app:
        dashboard = Dashboard(app, auth=no_auth, live_interval=0.2)
        async with (
            serve(dashboard) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as client,
            contextlib.AsyncExitStack() as stack,
        ):
            streams = [await stack.enter_async_context(events(client, "/")) for _ in range(5)]
            other = await stack.enter_async_context(events(client, "/?x=1"))
            await noop.enqueue()
            # Every browser gets the change ...
            with anyio.fail_after(10):
                for stream in [*streams, other]:
                    async for regions in stream:
                        if 'data-count="queued">1<' in regions.get("summary", ""):
                            break
            # ... from one rendering per page address and refresh.
            assert dashboard.hub.topics == 2
            assert dashboard.hub.renders <= 2 * dashboard.hub.refreshes
            assert dashboard.hub.refreshes >= 1
        await dashboard.aclose()


async def test_a_closed_browser_is_forgotten(app: taskq.App) -> None:
    async with app:
        dashboard = Dashboard(app, auth=no_auth, live_interval=0.2)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with events(client, "/") as stream:
                with anyio.fail_after(10):
                    while dashboard.hub.topics != 1:
                        await anyio.sleep(0.05)
                del stream
            with anyio.fail_after(10):
                while dashboard.hub.topics != 0:
                    await anyio.sleep(0.05)
        await dashboard.aclose()


async def test_events_for_an_unknown_page_are_refused(app: taskq.App) -> None:
    async with app:
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url) as client:
            r = await client.get("/events", params={"page": "/no/such/page"})
            assert r.status_code == 404
        await dashboard.aclose()


async def test_a_stream_ends_by_itself_and_a_new_one_gets_every_region() -> None:
    """A server shutting down cannot end a stream, so none outlives its
    lifetime; the browser reconnects and, having maybe missed changes, gets
    every region once, changed or not."""
    from taskq.dashboard._hub import Hub

    renders = 0

    async def render() -> dict[str, str]:
        nonlocal renders
        renders += 1
        return {"a": "same", "b": "same too"}

    async def listen(_callback: object) -> object:
        return lambda: None

    hub = Hub(listen, interval=0.05)  # type: ignore[arg-type]
    try:
        got: list[bytes] = []
        with anyio.fail_after(5):
            async for chunk in hub.stream("/", render, lifetime=0.5):
                got.append(chunk)
        assert b'"a":"same"' in b"".join(got)
        # A second browser on the same page, nothing changed: it still gets both regions.
        again: list[bytes] = []
        with anyio.fail_after(5):
            async for chunk in hub.stream("/", render, lifetime=0.5):
                again.append(chunk)
        events = [c for c in again if c.startswith(b"event: regions")]
        assert len(events) == 1 and b'"b":"same too"' in events[0]
        assert hub.topics == 0
    finally:
        await hub.stop()
