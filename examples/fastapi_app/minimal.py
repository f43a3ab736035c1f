"""The smallest FastAPI app with background jobs.

Run it from the root of the repository::

    uvicorn minimal:api --app-dir examples/fastapi_app
"""

from typing import Any

from fastapi import FastAPI, HTTPException
from tasks import app as jobs
from tasks import send_welcome

import taskq
from taskq.contrib.fastapi import lifespan

# Opens taskq and runs a worker in the server process; drains it on shutdown.
api = FastAPI(lifespan=lifespan(jobs))


@api.post("/users/{user_id}/welcome")
async def welcome(user_id: int) -> dict[str, int]:
    job = await send_welcome.enqueue(user_id=user_id)
    return {"job_id": job.id}


@api.get("/jobs/{job_id}")
async def job_status(job_id: int) -> dict[str, Any]:
    try:
        status = await jobs.get_job(job_id).status()
    except taskq.JobNotFound:
        raise HTTPException(404, f"no job with id {job_id}") from None
    return status.to_dict()
