"""``/v1/files``: upload (streamed to disk), list, get, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status

from recalib.contract import FilePublic, Page
from service.api.deps import CursorQuery, FileIdPath, FileStoreDep, PageLimitQuery, TenantDep
from service.problems import problem_responses
from service.uploads import receive_file

router = APIRouter(prefix="/files", tags=["files"])


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "The file's bytes, either raw (`application/octet-stream`, filename from `X-Filename` "
            "or `?filename=`) or as the `file` part of `multipart/form-data`. Streamed to disk; "
            "at most RECALIB_MAX_UPLOAD_BYTES."
        ),
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=FilePublic,
    responses=problem_responses(401, 413, 422, 503),
    openapi_extra=_UPLOAD_BODY,
    summary="Upload a file (model, calibration or evaluation data)",
)
async def upload_file(
    request: Request,
    response: Response,
    tenant: TenantDep,
    files: FileStoreDep,
    x_filename: Annotated[str | None, Header(max_length=1024)] = None,
    filename: Annotated[str | None, Query(max_length=1024)] = None,
) -> FilePublic:
    """Store the body as a new file; the response has its id, size and sha256."""
    record = await receive_file(request, files, tenant, filename or x_filename)
    response.headers["Location"] = f"/v1/files/{record.id}"
    return record


@router.get(
    "",
    response_model=Page[FilePublic],
    responses=problem_responses(401, 422, 503),
    summary="List files, newest first",
)
def list_files(
    tenant: TenantDep,
    files: FileStoreDep,
    limit: PageLimitQuery = 50,
    cursor: CursorQuery = None,
    sha256: Annotated[str | None, Query(pattern=r"^[0-9a-fA-F]{64}$")] = None,
) -> Page[FilePublic]:
    """A page of files; ``sha256`` finds the file with that content (to skip an upload)."""
    return files.list(tenant, cursor=cursor, limit=limit, sha256=sha256)


@router.get(
    "/{file_id}",
    response_model=FilePublic,
    responses=problem_responses(401, 404, 422, 503),
    summary="Get a file's metadata",
)
def get_file(file_id: FileIdPath, tenant: TenantDep, files: FileStoreDep) -> FilePublic:
    return FilePublic.model_validate(files.get(tenant, file_id).model_dump())


@router.delete(
    "/{file_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=problem_responses(401, 404, 422, 503),
    summary="Delete a file",
)
def delete_file(file_id: FileIdPath, tenant: TenantDep, files: FileStoreDep) -> Response:
    files.delete(tenant, file_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
