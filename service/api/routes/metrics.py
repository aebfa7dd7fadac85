"""``/metrics``: Prometheus text exposition (open, like the health routes); and one job's own
figures, ``/v1/jobs/{id}/metrics`` (its tenant's, like the job itself)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from recalib.contract import JobStatus
from recalib.errors import ConflictError
from service.api.deps import JobIdPath, JobStoreDep, TenantDep
from service.metrics import render, render_job_metrics
from service.problems import problem_responses

router = APIRouter(tags=["health"])
job_router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics: jobs by status, durations, queue depth, workers, upload bytes",
)
def metrics(request: Request) -> Response:
    return Response(render(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


@job_router.get(
    "/{job_id}/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **problem_responses(401, 404, 409, 422, 503),
    },
    summary="A succeeded job's figures as Prometheus metrics (drift score, top-1 before/after)",
)
async def job_metrics(job_id: JobIdPath, tenant: TenantDep, jobs: JobStoreDep) -> Response:
    record = await anyio.to_thread.run_sync(jobs.get, tenant, job_id)
    if record.status != JobStatus.succeeded or record.result is None:
        raise ConflictError(
            f"job {record.id} is {record.status.value}: its metrics exist once it succeeded",
            field="job_id",
        )
    return Response(render_job_metrics(record), media_type=CONTENT_TYPE_LATEST)
