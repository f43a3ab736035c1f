"""Views that enqueue jobs and report on them."""

from asgiref.sync import async_to_sync
from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET, require_POST

import taskq

from .tasks import app as jobs
from .tasks import send_welcome

MAX_JOB_ID = 2**63 - 1  # job ids are Postgres bigints


@require_POST
async def welcome(request: HttpRequest, user_id: int) -> JsonResponse:
    job = await send_welcome.enqueue(user_id=user_id)
    return JsonResponse({"job_id": job.id}, status=202)


@require_GET
async def job_status(request: HttpRequest, job_id: int) -> JsonResponse:
    try:
        if job_id <= MAX_JOB_ID:
            return JsonResponse((await jobs.get_job(job_id).status()).to_dict())
    except taskq.JobNotFound:
        pass
    return JsonResponse({"error": f"no job with id {job_id}"}, status=404)


@require_POST
def welcome_after_commit(request: HttpRequest, user_id: int) -> JsonResponse:
    # A sync view: under ASGI Django runs it in a thread, and async_to_sync
    # hands the enqueue to the server's event loop, where taskq's pool lives.
    enqueue = async_to_sync(send_welcome.enqueue)
    enqueued: list[taskq.Job] = []
    with transaction.atomic():
        ...  # the ORM writes that the job needs to see
        # taskq does not share Django's connection: enqueue once they are
        # committed, so that no worker runs the job before it can see them.
        transaction.on_commit(lambda: enqueued.append(enqueue(user_id=user_id)))
    return JsonResponse({"job_id": enqueued[0].id}, status=202)
