"""``/metrics``: Prometheus text exposition (open, like the health routes)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.metrics import render

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics: jobs by status, durations, queue depth, workers, upload bytes",
)
def metrics(request: Request) -> Response:
    return Response(render(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
