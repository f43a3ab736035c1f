"""A FastAPI app that enqueues jobs and runs a taskq worker inside the server process.

Run it from the root of the repository (no database to set up: without
$TASKQ_DSN taskq starts its embedded Postgres)::

    uvicorn main:api --app-dir examples/fastapi_app

Then, in another terminal::

    curl -X POST localhost:8000/users/42/welcome
    curl 'localhost:8000/jobs/1?wait=5'    # 1: the job_id the POST returned
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Query
from pydantic import BaseModel, Field
from tasks import app as jobs
from tasks import build_report, send_welcome

import taskq
from taskq.contrib.fastapi import lifespan

# Opens taskq and runs a worker beside the handlers; on shutdown the worker
# lets running jobs finish (30 s by default) and returns the rest to the queue.
taskq_lifespan = lifespan(jobs, concurrency=10)

SIGNUPS_TABLE = """
    CREATE TABLE IF NOT EXISTS signups (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        email text NOT NULL UNIQUE,
        created_at timestamptz NOT NULL DEFAULT now()
    )
"""


@asynccontextmanager
async def app_lifespan(api: FastAPI) -> AsyncIterator[None]:
    async with taskq_lifespan:
        async with jobs.pool.acquire() as conn:
            await conn.execute(SIGNUPS_TABLE)  # the app's own data
        yield


api = FastAPI(title="taskq FastAPI example", lifespan=app_lifespan)


@api.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


# Ids are Postgres bigints: anything else is refused with a 422 before a handler runs.
Id = Annotated[int, Path(ge=1, le=2**63 - 1)]


@api.post("/users/{user_id}/welcome")
async def welcome(user_id: Id) -> dict[str, int]:
    job = await send_welcome.enqueue(user_id=user_id)
    return {"job_id": job.id}


class ReportRequest(BaseModel):
    seconds: float = Field(gt=0, le=60, description="how long the report takes")


@api.post("/reports")
async def report(body: ReportRequest) -> dict[str, int]:
    job = await build_report.enqueue(seconds=body.seconds)
    return {"job_id": job.id}


class Signup(BaseModel):
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$", max_length=254)


@api.post("/signups", status_code=201)
async def sign_up(body: Signup) -> dict[str, int]:
    # The signup row and its welcome job commit together, or neither exists.
    async with jobs.pool.acquire() as conn, conn.transaction():
        signup_id = await conn.fetchval(
            "INSERT INTO signups (email) VALUES ($1) ON CONFLICT (email) DO NOTHING RETURNING id",
            body.email,
        )
        if signup_id is None:
            raise HTTPException(409, f"{body.email} has already signed up")
        job = await send_welcome.options(connection=conn).enqueue(user_id=signup_id)
    return {"signup_id": signup_id, "job_id": job.id}


@api.get("/jobs/{job_id}")
async def job_status(
    job_id: Id,
    wait: Annotated[float, Query(ge=0, le=30, description="seconds to wait for the end")] = 0,
) -> dict[str, Any]:
    job = jobs.get_job(job_id)
    try:
        if wait:
            # Woken by a notification when the job ends, not by polling.
            with suppress(TimeoutError, taskq.JobError):
                await job.result(timeout=wait)
        status = await job.status()
    except taskq.JobNotFound:
        raise HTTPException(404, f"no job with id {job_id}") from None
    return status.to_dict()
