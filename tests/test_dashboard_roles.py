"""The dashboard under least-privilege database roles: every page and action
with the workers' DML-only role, every page (and the live stream) read-only
with a role that can only SELECT, and a clear refusal when a role may not do
what was asked."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

import taskq
from taskq.dashboard import Dashboard, no_auth

from .conftest import until
from .dashboard_support import csrf_form, serve

pytestmark = pytest.mark.anyio


async def has_cron(pg_dsn: str, schema: str) -> bool:
    conn = await asyncpg.connect(pg_dsn)
    try:
        return bool(await conn.fetchval(f'SELECT count(*) FROM "{schema}".crons'))
    finally:
        await conn.close()


@pytest.fixture
async def roles(pg_dsn: str, schema: str) -> AsyncIterator[dict[str, str]]:
    """A schema with one of everything a page shows, and two roles on it."""
    owner = taskq.App(pg_dsn, schema=schema)

    @owner.cron("0 0 1 1 *")
    @owner.task(queue="mail")
    async def sweep() -> None:
        return None

    @owner.task(queue="mail", retry=1)
    async def boom() -> None:
        raise ValueError("no")

    async with owner:
        failed = await boom.enqueue()
        async with owner.worker(concurrency=2):
            await until(lambda: has_cron(pg_dsn, schema), 15, "the cron entry")
            with pytest.raises(taskq.JobFailed, match="ValueError: no"):
                await failed.result(timeout=15)
        queued = await boom.enqueue()
        wf = taskq.Workflow(name="pair")
        first = wf.add(sweep)
        wf.add(sweep, after=[first])
        run = await wf.enqueue()
        await owner.queue("mail").configure(concurrency_limit=4)
    conn = await asyncpg.connect(pg_dsn)
    names = {"dml": f"{schema}_dml", "reader": f"{schema}_reader"}
    try:
        for role in names.values():
            await conn.execute(f'CREATE ROLE "{role}" LOGIN')
            await conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        await conn.execute(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" '
            f'TO "{names["dml"]}"'
        )
        await conn.execute(
            f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{names["reader"]}"'
        )
        yield {
            "dml": pg_dsn.replace("postgres@", f"{names['dml']}@", 1),
            "reader": pg_dsn.replace("postgres@", f"{names['reader']}@", 1),
            "failed": str(failed.id),
            "queued": str(queued.id),
            "workflow": str(run.id),
            "cron": next(iter(owner.crons)),
        }
    finally:
        for role in names.values():
            await conn.execute(f'DROP OWNED BY "{role}"')
            await conn.execute(f'DROP ROLE "{role}"')
        await conn.close()


def pages(ids: dict[str, str]) -> list[str]:
    return [
        "/",
        "/jobs?state=queued",
        "/jobs?state=failed",
        "/jobs?state=waiting",
        "/jobs?state=succeeded&text=x",
        f"/jobs/{ids['failed']}",
        f"/jobs/{ids['queued']}",
        "/workflows",
        f"/workflows/{ids['workflow']}",
        "/queues",
        "/cron",
        "/workers",
    ]


async def first_event(client: httpx.AsyncClient, page: str) -> str:
    async with client.stream("GET", "/events", params={"page": page}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                return line
    raise AssertionError("the stream ended without an event")


async def test_every_page_and_action_with_the_dml_only_role(
    roles: dict[str, str], schema: str
) -> None:
    app = taskq.App(roles["dml"], schema=schema)
    async with app:
        dashboard = Dashboard(app, auth=no_auth)
        async with serve(dashboard) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            for path in pages(roles):
                r = await client.get(path)
                assert r.status_code == 200, (path, r.text[:500])
            token = await csrf_form(client, "/queues")
            r = await client.post("/queues/mail/pause", data=token)
            assert r.status_code == 303
            r = await client.post(f"/jobs/{roles['failed']}/retry", data=token)
            assert r.status_code == 303
            r = await client.post(f"/cron/{roles['cron']}/trigger", data=token)
            assert r.status_code == 303
            r = await client.post(f"/workflows/{roles['workflow']}/cancel", data=token)
            assert r.status_code == 303
        assert (await app.queue("mail").info()).paused is True
        retried = await app.get_job(int(roles["failed"])).status()
        assert retried.state is taskq.JobState.QUEUED
        assert (await app.get_workflow(int(roles["workflow"])).status()).state.value == (
            "cancelled"
        )
        await dashboard.aclose()


async def test_read_only_with_a_select_only_role(roles: dict[str, str], schema: str) -> None:
    app = taskq.App(roles["reader"], schema=schema, auto_migrate=False)
    dashboard = Dashboard(app, auth=no_auth, read_only=True, live_interval=0.2)
    async with serve(dashboard) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        for path in pages(roles):
            r = await client.get(path)
            assert r.status_code == 200, (path, r.text[:500])
            assert 'method="post"' not in r.text.lower(), path
        line = await first_event(client, f"/jobs/{roles['queued']}")
        assert line.startswith("data: {")
        line = await first_event(client, "/")
        assert line.startswith("data: {") and "summary" in line
    await dashboard.aclose()
    assert not app.is_open


async def test_a_role_that_may_not_act_gets_a_clear_refusal(
    roles: dict[str, str], schema: str
) -> None:
    # A writable dashboard on a SELECT-only role: the page says what is wrong
    # and nothing changes.
    app = taskq.App(roles["reader"], schema=schema, auto_migrate=False)
    dashboard = Dashboard(app, auth=no_auth)
    async with serve(dashboard) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        token = await csrf_form(client, "/queues")
        r = await client.post("/queues/mail/pause", data=token)
        assert r.status_code in (303, 403), r.text[:500]
        if r.status_code == 303:
            r = await client.get(r.headers["location"])
        text = re.sub(r"\s+", " ", r.text)
        assert "permission denied" in text and "read_only" in text.replace("read-only", "read_only")
    await dashboard.aclose()
    owner = taskq.App(roles["dml"], schema=schema)
    async with owner:
        assert (await owner.queue("mail").info()).paused is False
