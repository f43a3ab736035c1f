"""An aiohttp app that enqueues jobs and runs a taskq worker inside the server process.

Run it from the root of the repository (no database to set up: without
$TASKQ_DSN taskq starts its embedded Postgres)::

    python examples/aiohttp_app/main.py --port 8080

Then, in another terminal::

    curl -X POST localhost:8080/users/42/welcome
    curl 'localhost:8080/jobs/1?wait=5'    # 1: the job_id the POST returned
"""

import argparse
from contextlib import suppress
from typing import Any

from aiohttp import web
from tasks import app as jobs
from tasks import build_report, send_welcome

import taskq
from taskq.contrib.aiohttp import APP_KEY, setup

MAX_ID = 2**63 - 1  # ids are Postgres bigints
SIGNUPS_TABLE = """
    CREATE TABLE IF NOT EXISTS signups (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        email text NOT NULL UNIQUE,
        created_at timestamptz NOT NULL DEFAULT now()
    )
"""

routes = web.RouteTableDef()


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def positive_id(text: str) -> int | None:
    """The id in a URL path, or None if it is not a positive bigint."""
    if not (text.isascii() and text.isdigit() and len(text) <= 19):
        return None
    value = int(text)
    return value if 1 <= value <= MAX_ID else None


async def json_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.post("/users/{user_id}/welcome")
async def welcome(request: web.Request) -> web.Response:
    user_id = positive_id(request.match_info["user_id"])
    if user_id is None:
        return error(400, "user_id must be a positive integer")
    job = await send_welcome.enqueue(user_id=user_id)
    return web.json_response({"job_id": job.id})


@routes.post("/reports")
async def report(request: web.Request) -> web.Response:
    body = await json_object(request)
    seconds = body.get("seconds") if body else None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= 60:
        return error(400, 'the body must be JSON like {"seconds": 2.5}, with 0 < seconds <= 60')
    job = await build_report.enqueue(seconds=seconds)
    return web.json_response({"job_id": job.id})


@routes.post("/signups")
async def sign_up(request: web.Request) -> web.Response:
    body = await json_object(request)
    email = body.get("email") if body else None
    if not isinstance(email, str) or email.count("@") != 1 or not 3 <= len(email) <= 254:
        return error(400, 'the body must be JSON like {"email": "ada@example.com"}')
    # The signup row and its welcome job commit together, or neither exists.
    async with jobs.pool.acquire() as conn, conn.transaction():
        signup_id = await conn.fetchval(
            "INSERT INTO signups (email) VALUES ($1) ON CONFLICT (email) DO NOTHING RETURNING id",
            email,
        )
        if signup_id is None:
            return error(409, f"{email} has already signed up")
        job = await send_welcome.options(connection=conn).enqueue(user_id=signup_id)
    return web.json_response({"signup_id": signup_id, "job_id": job.id}, status=201)


@routes.get("/jobs/{job_id}")
async def job_status(request: web.Request) -> web.Response:
    job_id = positive_id(request.match_info["job_id"])
    if job_id is None:
        return error(400, "job_id must be a positive integer")
    try:
        wait = float(request.query.get("wait", "0"))
    except ValueError:
        wait = -1
    if not 0 <= wait <= 30:
        return error(400, "wait must be a number of seconds from 0 to 30")
    job = request.config_dict[APP_KEY].get_job(job_id)
    try:
        if wait:
            # Woken by a notification when the job ends, not by polling.
            with suppress(TimeoutError, taskq.JobError):
                await job.result(timeout=wait)
        status = await job.status()
    except taskq.JobNotFound:
        return error(404, f"no job with id {job_id}")
    return web.json_response(status.to_dict())


async def create_signups_table(web_app: web.Application) -> None:
    async with web_app[APP_KEY].pool.acquire() as conn:
        await conn.execute(SIGNUPS_TABLE)  # the app's own data


def make_app(*, concurrency: int = 10, shutdown_timeout: float = 30.0) -> web.Application:
    web_app = web.Application()
    # Opens taskq and runs a worker beside the handlers; on shutdown the worker
    # lets running jobs finish (shutdown_timeout) and returns the rest to the queue.
    setup(web_app, jobs, concurrency=concurrency, shutdown_timeout=shutdown_timeout)
    web_app.on_startup.append(create_signups_table)  # runs once taskq is open
    web_app.add_routes(routes)
    return web_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--concurrency", type=int, default=10, help="jobs run at once")
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds running jobs get to finish on shutdown before they go back to the queue",
    )
    args = parser.parse_args()
    web_app = make_app(concurrency=args.concurrency, shutdown_timeout=args.shutdown_timeout)
    web.run_app(web_app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
