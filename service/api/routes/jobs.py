"""``/v1/jobs``: create (enqueue), list, get, events (JSON or Server-Sent Events), cancel."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from recalib.admission import admit
from recalib.contract import JobCreate, JobEvent, JobPublic, JobRecord, JobStatus, Page
from recalib.errors import InvalidOptionError, UserError
from recalib.jobs.job_store import JobStore
from service.api.deps import (
    CursorQuery,
    FileStoreDep,
    JobIdPath,
    JobStoreDep,
    PageLimitQuery,
    TenantDep,
)
from service.problems import problem_responses

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])


SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0
MAX_SEQ = 2**53
"""Largest event sequence number accepted in ``after`` or ``Last-Event-ID``."""
_SEQ_RE = re.compile(r"^[0-9]{1,16}$")


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "The job this Idempotency-Key created before."},
        **problem_responses(400, 401, 403, 404, 413, 422, 503),
    },
    summary="Create a recalibration job (queued)",
)
def create_job(
    body: JobCreate,
    response: Response,
    tenant: TenantDep,
    jobs: JobStoreDep,
    files: FileStoreDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> JobPublic:
    """Queue a job over uploaded files; the same ``Idempotency-Key`` + body give the same job.

    Admitted by the job layer's rules (:func:`recalib.admission.admit`), as the web form."""
    record, created = admit(jobs, files, tenant, body, idempotency_key=idempotency_key)
    response.status_code = status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    return record


@router.get(
    "",
    response_model=Page[JobPublic],
    responses=problem_responses(401, 422, 503),
    summary="List jobs, newest first",
)
def list_jobs(
    tenant: TenantDep,
    jobs: JobStoreDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: PageLimitQuery = 50,
    cursor: CursorQuery = None,
) -> Page[JobRecord]:
    return jobs.list(tenant, status=status_filter, cursor=cursor, limit=limit)


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    responses=problem_responses(401, 404, 422, 503),
    summary="Get a job: status, progress, report or error",
)
def get_job(job_id: JobIdPath, tenant: TenantDep, jobs: JobStoreDep) -> JobPublic:
    return jobs.get(tenant, job_id)


@router.get(
    "/{job_id}/events",
    response_model=list[JobEvent],
    responses={
        200: {
            "description": (
                "The job's events after `after`; with `Accept: text/event-stream`, a stream of "
                "them (`id:` = seq, `event:` = status, `data:` = the JobEvent) until the job ends."
            ),
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **problem_responses(401, 404, 422, 503),
    },
    summary="Progress events of a job (JSON list or Server-Sent Events)",
)
def job_events(
    job_id: JobIdPath,
    request: Request,
    tenant: TenantDep,
    jobs: JobStoreDep,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
    last_event_id: Annotated[str | None, Header()] = None,
) -> list[JobEvent] | Response:
    if "text/event-stream" not in request.headers.get("accept", ""):
        return jobs.events(tenant, job_id, after=after)
    jobs.get(tenant, job_id)  # 404 before the stream starts
    if last_event_id is not None:  # an EventSource reconnecting
        after = max(after, _event_seq(last_event_id))
    stream = _event_stream(jobs, tenant, job_id, after, request)
    return StreamingResponse(
        stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _event_seq(last_event_id: str) -> int:
    """The seq a ``Last-Event-ID`` names, validated like ``after`` (422 naming the header)."""
    if not _SEQ_RE.match(last_event_id) or int(last_event_id) > MAX_SEQ:
        raise InvalidOptionError(
            f"Last-Event-ID must be an event id this API sent (an integer 0..{MAX_SEQ})",
            field="Last-Event-ID",
        )
    return int(last_event_id)


async def _event_stream(
    jobs: JobStore, tenant: str, job_id: str, after: int, request: Request
) -> AsyncIterator[str]:
    """Poll the store; send new events as they come, stop once the job has ended."""
    quiet_s = 0.0
    while True:
        try:
            record = await anyio.to_thread.run_sync(jobs.get, tenant, job_id)
            events = await anyio.to_thread.run_sync(
                partial(jobs.events, tenant, job_id, after=after)
            )
        except UserError as exc:  # deleted (retention) or unreadable since the stream began
            logger.info("event stream of job %s ends: %s", job_id, exc)
            return
        for event in events:
            data = event.model_dump_json()
            yield f"id: {event.seq}\nevent: {event.status.value}\ndata: {data}\n\n"
            after = event.seq
        if record.status.is_final or await request.is_disconnected():
            return
        quiet_s = 0.0 if events else quiet_s + SSE_POLL_S
        if quiet_s >= SSE_KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet_s = 0.0
        await anyio.sleep(SSE_POLL_S)


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses=problem_responses(401, 404, 409, 422, 503),
    summary="Cancel a job (queued: at once; running: the worker stops at the next batch)",
)
def cancel_job(job_id: JobIdPath, tenant: TenantDep, jobs: JobStoreDep) -> JobPublic:
    return jobs.cancel(tenant, job_id)
