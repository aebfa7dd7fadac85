"""The operators' web page: job list, job page, submit form (and login, :mod:`.login`).

Server-rendered, outside ``/v1`` and out of the OpenAPI document. Pages call the stores directly
with the request's tenant (``Authorization: Bearer`` or the login cookie,
:mod:`service.web.session`); what the browser fetches itself (live progress from
``/v1/jobs/{id}/events``, artifacts, ``report.html``) goes through the API, which accepts the
cookie for GET. Every form is CSRF-checked.
"""

from __future__ import annotations

import json
from typing import Annotated

import anyio
import redis
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from recalib.admission import admit, check_request
from recalib.contract import JobCreate, JobOptions, JobRecord
from recalib.errors import InvalidOptionError, RecalibError, UnauthorizedError
from recalib.files.artifacts import ArtifactStore
from recalib.files.store import FileStore
from recalib.verdict import explain
from service.api.deps import CursorQuery, JobIdPath
from service.api.routes.report_html import REPORT_HTML_FILE
from service.web import login, session
from service.web.forms import SubmitForm, receive_submit_form
from service.web.pages import error_page, filename_of, render, small_form, tenant_of, to_login

router = APIRouter(include_in_schema=False)
router.include_router(login.router)

PAGE_SIZE = 50
MAX_LIVE_STREAMS = 4
"""Rows that follow their job live: browsers open at most 6 connections per host (HTTP/1.1)."""


@router.get("/", response_class=HTMLResponse)
def jobs_page(
    request: Request,
    cursor: CursorQuery = None,
    created: Annotated[str | None, Query(max_length=80)] = None,
) -> Response:
    """Jobs of the tenant, newest first; the first unfinished ones follow their progress live."""
    try:
        tenant = tenant_of(request)
        files: FileStore = request.app.state.file_store
        page = request.app.state.job_store.list(tenant, cursor=cursor, limit=PAGE_SIZE)
        rows = [(job, filename_of(files, tenant, job.request.model_file)) for job in page.items]
    except UnauthorizedError:
        return to_login(request)
    except (RecalibError, redis.RedisError) as exc:
        return error_page(request, exc)
    unfinished = [job.id for job in page.items if not job.status.is_final]
    return render(
        request,
        "jobs.html",
        rows=rows,
        live=unfinished[:MAX_LIVE_STREAMS],
        unfinished=len(unfinished),
        next_cursor=page.next_cursor,
        created=created,
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: JobIdPath) -> Response:
    """One job: status (live), inputs, options, error, artifact links and its report.html."""
    try:
        tenant = tenant_of(request)
        record: JobRecord = request.app.state.job_store.get(tenant, job_id)
        files: FileStore = request.app.state.file_store
        names = {
            role: filename_of(files, tenant, getattr(record.request, f"{role}_file"))
            for role in ("model", "calibration", "eval", "source_eval")
        }
    except UnauthorizedError:
        return to_login(request)
    except (RecalibError, redis.RedisError) as exc:
        return error_page(request, exc)
    artifacts: ArtifactStore = request.app.state.artifact_store
    try:
        has_html = artifacts.output_info(record, REPORT_HTML_FILE) is not None
    except RecalibError:  # the store is down: the page still shows the job
        has_html = False
    options = record.request.options.model_dump(mode="json", exclude_defaults=True)
    return render(
        request,
        "job.html",
        job=record,
        names=names,
        has_html=has_html,
        options=json.dumps(options) if options else "defaults",
        verdict_text=explain(record.result) if record.result is not None else None,
    )


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: JobIdPath) -> Response:
    try:
        tenant = tenant_of(request, allow_cookie=True)
        form = await small_form(request)
        session.check_csrf(request, form.get(session.CSRF_FIELD))
        await anyio.to_thread.run_sync(request.app.state.job_store.cancel, tenant, job_id)
    except UnauthorizedError:
        return to_login(request)
    except (RecalibError, redis.RedisError) as exc:
        return error_page(request, exc)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.get("/submit", response_class=HTMLResponse)
def submit_page(request: Request) -> Response:
    try:
        tenant_of(request)
    except UnauthorizedError:
        return to_login(request)
    return _submit_form(request, {})


def _submit_form(
    request: Request, fields: dict[str, str], status_code: int = 200, error: str | None = None
) -> HTMLResponse:
    max_bytes = int(request.app.state.file_store.max_upload_bytes)
    return render(
        request,
        "submit.html",
        status_code,
        fields=fields,
        error=error,
        max_upload_mib=max_bytes // 2**20,
    )


@router.post("/submit")
async def submit(request: Request) -> Response:
    """Upload the form's files and queue a job over them; then show the job list.

    The job is admitted by the same rules as ``POST /v1/jobs`` (:mod:`recalib.admission`);
    the rules that need no stored file run before the uploads are kept."""
    files: FileStore = request.app.state.file_store
    fields: dict[str, str] = {}
    try:
        tenant = tenant_of(request, allow_cookie=True)
        session.check_origin(request)  # before reading a large body
        form = await receive_submit_form(request, files)
        fields = form.fields
        try:
            session.check_csrf(request, fields.get(session.CSRF_FIELD))
            create = _job_create(form)
            settings = request.app.state.settings
            await anyio.to_thread.run_sync(check_request, create, tenant, settings)  # keep no file
            await anyio.to_thread.run_sync(form.commit, files, tenant)
        finally:
            form.discard()
        record, _ = await anyio.to_thread.run_sync(
            admit, request.app.state.job_store, files, tenant, create
        )
    except UnauthorizedError:
        return to_login(request)
    except ValidationError as exc:
        return _submit_form(request, fields, 422, _validation_message(exc))
    except RecalibError as exc:
        return _submit_form(request, fields, exc.http_status, exc.message)
    except redis.RedisError as exc:
        return error_page(request, exc)
    return RedirectResponse(f"/?created={record.id}", status_code=303)


def _job_create(form: SubmitForm) -> JobCreate:
    """The job the form asks for, over its (not yet committed) uploads: validated before any
    file is kept. The ``options`` JSON overrides the separate fields."""
    for role in ("model", "calibration"):
        if role not in form.uploads:
            raise InvalidOptionError(f"choose a {role} file", field=role)
    fields = form.fields
    options: dict[str, object] = {"estimator": fields.get("estimator") or "population"}
    if fields.get("batch_size", "").strip():
        options["batch_size"] = fields["batch_size"].strip()
    options["fold"] = fields.get("fold") == "on"
    if fields.get("options", "").strip():
        try:
            extra = json.loads(fields["options"])
        except ValueError as exc:
            raise InvalidOptionError(f"options: not JSON ({exc})", field="options") from exc
        if not isinstance(extra, dict):
            raise InvalidOptionError("options: give a JSON object {...}", field="options")
        options |= extra
    evaluation = form.uploads.get("evaluation")
    source = form.uploads.get("source_evaluation")
    return JobCreate(
        kind=fields.get("kind") or "recalibrate",
        model_file=form.uploads["model"][0],
        calibration_file=form.uploads["calibration"][0],
        eval_file=evaluation[0] if evaluation else None,
        source_eval_file=source[0] if source else None,
        arch=fields.get("arch", "").strip() or None,
        options=JobOptions.model_validate(options),
    )


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(part) for part in error["loc"]) or "form"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
