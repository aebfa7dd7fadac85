"""The API's routes: resources under the ``/v1`` prefix (set here, once), probes at the root."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import (
    artifacts,
    deliveries,
    files,
    health,
    jobs,
    metrics,
    report_html,
    uploads,
)
from service.web import routes as web_routes

API_PREFIX = "/v1"

api_router = APIRouter()
for _resource in (files, uploads, jobs, deliveries, artifacts, report_html):
    api_router.include_router(_resource.router, prefix=API_PREFIX)
api_router.include_router(metrics.job_router, prefix=API_PREFIX)
api_router.include_router(health.router)
api_router.include_router(metrics.router)
api_router.include_router(web_routes.router)  # the web page, outside /v1
