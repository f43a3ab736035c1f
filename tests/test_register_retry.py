"""A worker whose registration meets a server going down registers once it is back.

A worker that starts while Postgres restarts, or whose backend an operator
terminates, used to exit with an unexpected error (seen in the chaos test).
Here a trigger fails the first two registrations with the SQLSTATE of an
operator's shutdown (57P01), as a terminated backend does; the worker tries
again and runs a job. Any other error still stops the start at once.
"""

from __future__ import annotations

import anyio
import pytest

import taskq
from tests.test_worker import fetchval

pytestmark = pytest.mark.anyio

FAIL_REGISTRATIONS = """
CREATE SEQUENCE {s}.register_faults;
CREATE FUNCTION {s}.register_fault() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('{s}.register_faults') <= 2 THEN
        RAISE EXCEPTION 'injected: terminating connection' USING ERRCODE = '{code}';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER register_fault BEFORE INSERT ON {s}.workers
    FOR EACH ROW EXECUTE FUNCTION {s}.register_fault();
"""


async def inject(app: taskq.App, code: str) -> None:
    async with app.pool.acquire() as conn:
        sql = FAIL_REGISTRATIONS.replace("{s}", f'"{app.schema}"')
        await conn.execute(sql.replace("{code}", code))


async def test_registration_is_sent_again_after_a_terminated_backend(app: taskq.App) -> None:
    @app.task(name="reg.job")
    async def job() -> int:
        return 7

    async with app:
        await inject(app, "57P01")
        done = await job.enqueue()
        with anyio.fail_after(30):
            stats = await app.drain()
        assert stats.succeeded == 1
        assert await done.result(timeout=5) == 7
        assert await fetchval(app, "SELECT last_value FROM {s}.register_faults") == 3


async def test_any_other_registration_error_stops_the_start(app: taskq.App) -> None:
    @app.task(name="reg.other")
    async def other() -> None:
        return None

    async with app:
        await inject(app, "22023")
        with pytest.raises((taskq.DatabaseError, BaseExceptionGroup)) as info:
            await app.drain()
        if isinstance(info.value, BaseExceptionGroup):
            assert info.group_contains(taskq.DatabaseError, match="injected"), info.value
        else:
            assert "injected" in str(info.value)
        assert await fetchval(app, "SELECT last_value FROM {s}.register_faults") == 1
