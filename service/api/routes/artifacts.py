"""``/v1/jobs/{id}/checkpoint|report|folded|onnx``: artifacts of succeeded jobs.

Served from the attempt the job's record names (``output_attempt``) only, with the sha256 as
``ETag`` (``If-None-Match`` → 304), a ``Content-Disposition`` named after the model, and HTTP
Range requests (local store: Starlette's ``FileResponse``, 206 and multipart/byteranges; object
store: one range streamed from the store, :mod:`service.object_response`), all with
``X-Content-Type-Options: nosniff``. With
``RECALIB_PRESIGNED_DOWNLOADS`` and object storage, a 307 to a presigned URL of the store
instead. Range errors are checked here first so that they, too, are problem documents. ``HEAD``
gives the same status and headers without the body.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path as FsPath
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import anyio
from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from starlette.exceptions import HTTPException
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from recalib.contract import JobRecord, JobStatus, Report
from recalib.errors import ConflictError, NotFoundError
from recalib.files.artifacts import ArtifactStore
from recalib.files.storage import ObjectInfo
from recalib.files.store import FileStore
from recalib.settings import Settings
from service.api.deps import (
    ArtifactStoreDep,
    FileStoreDep,
    JobIdPath,
    JobStoreDep,
    SettingsDep,
    TenantDep,
)
from service.object_response import object_response
from service.problems import problem_responses

router = APIRouter(prefix="/jobs", tags=["artifacts"])

REPORT_FILE = "report.json"
Which = Literal["checkpoint", "report", "folded", "onnx"]


@dataclass(frozen=True)
class ArtifactFile:
    key: str  # in the store
    sha256: str
    download_name: str
    media_type: str

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'


def resolve_artifact(
    record: JobRecord, which: Which, artifacts: ArtifactStore, files: FileStore, tenant: str
) -> ArtifactFile:
    """The file behind an artifact of a succeeded job, or a 409/404 error saying why not."""
    if record.status != JobStatus.succeeded or record.result is None:
        raise ConflictError(
            f"job {record.id} is {record.status.value}: artifacts exist only once it succeeded",
            field=which,
        )
    prefix = artifacts.output_prefix(record)
    if prefix is None:
        raise NotFoundError(f"the artifacts of job {record.id} are not stored", field=which)
    stem = _model_stem(record, files, tenant)
    report = record.result
    if which == "report":
        content = artifacts.output_bytes(record, REPORT_FILE)  # a few kB
        sha256 = hashlib.sha256(content).hexdigest() if content is not None else ""
        key = prefix + REPORT_FILE
        return ArtifactFile(key, sha256, f"{stem}.report.json", "application/json")
    artifact = report.checkpoint if which == "checkpoint" else None
    if which == "checkpoint" and artifact is None:
        raise NotFoundError(
            f"job {record.id} is a {report.kind.value} job: it writes no model", field="checkpoint"
        )
    if which == "folded":
        if report.folded is None:
            raise NotFoundError(
                f"job {record.id} has no folded model: submit with options.fold=true",
                field="folded",
            )
        artifact = report.folded.artifact
    if which == "onnx":
        artifact = next((e.artifact for e in report.exports if e.artifact.format == "onnx"), None)
        if artifact is None:
            raise NotFoundError(
                f'job {record.id} has no ONNX export: submit with options.export=["onnx"]',
                field="onnx",
            )
    if artifact is None:  # unreachable: which is one of four
        raise NotFoundError(f"unknown artifact {which}")
    label = "folded" if which == "folded" else "recalibrated"
    suffix = FsPath(artifact.file).suffix
    key = prefix + FsPath(artifact.file).name
    return ArtifactFile(key, artifact.sha256, f"{stem}.{label}{suffix}", "application/octet-stream")


def _model_stem(record: JobRecord, files: FileStore, tenant: str) -> str:
    request = record.request
    if request.model_file is None:  # given by URI: its last path segment
        name = PurePosixPath(urlsplit(request.model_uri or "").path).name
        return FsPath(name).stem or record.id
    try:
        name = files.get(tenant, request.model_file).filename
    except NotFoundError:  # the upload was deleted since; the job id still names it
        return record.id
    return FsPath(name).stem or record.id


def _etag_matches(if_none_match: str, etag: str) -> bool:
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def _check_range(range_header: str | None, if_range: str | None, etag: str, size: int) -> None:
    """Raise 400/416 for a Range header that FileResponse would reject (it answers plain text)."""
    if range_header is None or (if_range is not None and if_range.strip() != etag):
        return  # no range, or If-Range mismatch: the whole file is sent
    try:
        FileResponse._parse_range_header(range_header, size)
    except MalformedRangeHeader as exc:
        raise HTTPException(400, f"malformed Range header: {exc.content}") from exc
    except RangeNotSatisfiable as exc:
        raise HTTPException(
            416,
            f"Range not satisfiable: the file has {size} bytes",
            headers={"Content-Range": f"bytes */{exc.max_size}"},
        ) from exc


async def _serve(
    which: Which,
    job_id: str,
    tenant: str,
    request: Request,
    jobs: JobStoreDep,
    files: FileStoreDep,
    artifacts: ArtifactStore,
    settings: Settings,
    if_none_match: str | None,
    range_header: str | None,
    if_range: str | None,
) -> Response:
    record = await anyio.to_thread.run_sync(jobs.get, tenant, job_id)
    art = await anyio.to_thread.run_sync(resolve_artifact, record, which, artifacts, files, tenant)
    storage = artifacts.storage
    info = await anyio.to_thread.run_sync(_info, artifacts, art.key)
    if info is None:
        raise NotFoundError(f"the {which} of job {job_id} is no longer stored", field=which)
    headers = {
        "ETag": art.etag,
        "Cache-Control": "private, max-age=0, must-revalidate",
        # the bytes are the user's: a browser must not sniff them into HTML on the API's origin
        "X-Content-Type-Options": "nosniff",
    }
    if if_none_match and _etag_matches(if_none_match, art.etag):
        return Response(status_code=304, headers=headers)
    local = storage.local_path(art.key)
    if local is None and settings.presigned_downloads:
        url = await anyio.to_thread.run_sync(
            _presign, artifacts, art.key, art.download_name, settings.presigned_expiry_s
        )
        if url is not None:
            return RedirectResponse(url, status_code=307, headers=headers)
    _check_range(range_header, if_range, art.etag, info.bytes)
    if local is not None:
        return FileResponse(
            local, media_type=art.media_type, filename=art.download_name, headers=headers
        )
    return object_response(
        storage,
        art.key,
        info.bytes,
        media_type=art.media_type,
        filename=art.download_name,
        headers=headers,
        range_header=range_header,
        if_range=if_range,
        etag=art.etag,
        head=request.method == "HEAD",
    )


def _info(artifacts: ArtifactStore, key: str) -> ObjectInfo | None:
    with artifacts.storage.guard():
        return artifacts.storage.info(key)


def _presign(artifacts: ArtifactStore, key: str, filename: str, expires_s: int) -> str | None:
    with artifacts.storage.guard():
        return artifacts.storage.presign_get(key, filename, expires_s)


def _doc(which: Which) -> dict[int | str, dict[str, Any]]:
    ok: dict[str, Any] = {"description": "The artifact (its sha256 in `ETag`)."}
    if which == "report":
        ok["model"] = Report  # report.json is the job's Report
    else:
        binary = {"schema": {"type": "string", "format": "binary"}}
        ok["content"] = {"application/octet-stream": binary}
    return {
        200: ok,
        206: {"description": "Part of the artifact (HTTP Range)."},
        304: {"description": "Unchanged (`If-None-Match` matched the ETag)."},
        307: {"description": "A presigned URL of the store (RECALIB_PRESIGNED_DOWNLOADS)."},
        **problem_responses(400, 401, 404, 409, 416, 422, 503),
    }


def _route(which: Which, summary: str) -> None:
    async def download(
        job_id: JobIdPath,
        request: Request,
        tenant: TenantDep,
        jobs: JobStoreDep,
        files: FileStoreDep,
        artifacts: ArtifactStoreDep,
        settings: SettingsDep,
        if_none_match: Annotated[str | None, Header(max_length=1024)] = None,
        range_header: Annotated[str | None, Header(alias="Range", max_length=1024)] = None,
        if_range: Annotated[str | None, Header(max_length=1024)] = None,
    ) -> Response:
        return await _serve(
            which,
            job_id,
            tenant,
            request,
            jobs,
            files,
            artifacts,
            settings,
            if_none_match,
            range_header,
            if_range,
        )

    download.__name__ = f"download_{which}"
    router.add_api_route(
        f"/{{job_id}}/{which}",
        download,
        methods=["GET"],
        response_class=Response,
        responses=_doc(which),
        summary=summary,
        description="`HEAD` answers the same status and headers without the body.",
    )
    # HEAD: the same handler (FileResponse sends the headers only); kept out of the schema so
    # that the documented operations stay one per artifact.
    router.add_api_route(
        f"/{{job_id}}/{which}",
        download,
        methods=["HEAD"],
        response_class=Response,
        include_in_schema=False,
    )


_route("checkpoint", "Download the recalibrated model")
_route("report", "Download report.json")
_route("folded", "Download the BN-folded model (jobs with options.fold)")
_route("onnx", "Download the recalibrated model as ONNX (jobs with options.export onnx)")
