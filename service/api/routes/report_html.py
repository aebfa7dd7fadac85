"""``/v1/jobs/{id}/report.html``: the report page the worker drew (``worker/report_html.py``).

The same rules as the other artifacts (:func:`service.api.routes.artifacts.resolve_artifact`): a
job of another tenant is a 404, an unfinished one a 409, and only the directory of the run that
succeeded is read. The page holds strings from the user's model and files (escaped when drawn);
as defence in depth it is served with a Content-Security-Policy that runs no script and loads
nothing, framable only by this origin (the web page embeds it).
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Response

from recalib.errors import NotFoundError
from service.api.deps import ArtifactStoreDep, FileStoreDep, JobIdPath, JobStoreDep, TenantDep
from service.api.routes.artifacts import resolve_artifact
from service.object_response import content_disposition
from service.problems import problem_responses

router = APIRouter(prefix="/jobs", tags=["artifacts"])

REPORT_HTML_FILE = "report.html"
REPORT_HTML_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'; "
    "base-uri 'none'; form-action 'none'"
)


@router.get(
    "/{job_id}/report.html",
    response_class=Response,
    responses={
        200: {
            "description": "The report as one self-contained HTML page (its sha256 in `ETag`).",
            "content": {"text/html": {"schema": {"type": "string"}}},
        },
        304: {"description": "Unchanged (`If-None-Match` matched the ETag)."},
        **problem_responses(401, 404, 409, 422, 503),
    },
    summary="The report as a web page (plots, per-layer drift, per-class accuracy)",
)
async def download_report_html(
    job_id: JobIdPath,
    tenant: TenantDep,
    jobs: JobStoreDep,
    files: FileStoreDep,
    artifacts: ArtifactStoreDep,
    if_none_match: Annotated[str | None, Header(max_length=1024)] = None,
) -> Response:
    record = await anyio.to_thread.run_sync(jobs.get, tenant, job_id)
    report_json = await anyio.to_thread.run_sync(
        resolve_artifact, record, "report", artifacts, files, tenant
    )
    page = await anyio.to_thread.run_sync(artifacts.output_bytes, record, REPORT_HTML_FILE)
    if page is None:
        raise NotFoundError(
            f"job {job_id} has no report.html (its worker could not draw it, or predates it); "
            f"report.json is at /v1/jobs/{job_id}/report",
            field="report.html",
        )
    etag = f'"{hashlib.sha256(page).hexdigest()}"'  # a page of ~100 KiB
    headers = {
        "ETag": etag,
        "Cache-Control": "private, max-age=0, must-revalidate",
        "Content-Security-Policy": REPORT_HTML_CSP,
        "X-Content-Type-Options": "nosniff",
    }
    tags = [tag.strip().removeprefix("W/") for tag in (if_none_match or "").split(",")]
    if etag in tags or "*" in tags:
        return Response(status_code=304, headers=headers)
    stem = report_json.download_name.removesuffix(".report.json")
    headers["Content-Disposition"] = content_disposition(f"{stem}.report.html", "inline")
    return Response(page, media_type="text/html; charset=utf-8", headers=headers)
