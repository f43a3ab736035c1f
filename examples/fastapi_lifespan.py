from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from quickstart import app as jobs
from quickstart import send_welcome


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    async with jobs, jobs.worker(concurrency=10):  # drains on shutdown
        yield


api = FastAPI(lifespan=lifespan)


@api.post("/users/{user_id}/welcome")
async def welcome(user_id: int) -> dict[str, Any]:
    job = await send_welcome.enqueue(user_id=user_id)
    return {"job_id": job.id}


@api.get("/jobs/{job_id}")
async def job_status(job_id: int) -> dict[str, Any]:
    status = await jobs.get_job(job_id).status()
    return {"state": status.state, "result": status.result, "error": status.last_error}
