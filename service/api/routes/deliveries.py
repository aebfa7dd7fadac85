"""``/v1/jobs/{id}/deliveries``: the webhook messages of a job and every attempt to deliver them."""

from __future__ import annotations

from fastapi import APIRouter

from recalib.contract.webhooks import WebhookDelivery
from recalib.webhooks.deliveries import Deliveries
from service.api.deps import JobIdPath, JobStoreDep, RedisDep, SettingsDep, TenantDep
from service.problems import problem_responses

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get(
    "/{job_id}/deliveries",
    response_model=list[WebhookDelivery],
    responses=problem_responses(401, 404, 422, 503),
    summary="Webhook deliveries of a job: state, attempts (HTTP status or error), next attempt",
)
def job_deliveries(
    job_id: JobIdPath, tenant: TenantDep, jobs: JobStoreDep, conn: RedisDep, settings: SettingsDep
) -> list[WebhookDelivery]:
    jobs.get(tenant, job_id)  # 404 for another tenant's job
    return Deliveries(conn, settings).for_job(job_id)
