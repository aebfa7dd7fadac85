"""``/v1/uploads``: direct uploads to the object store (presigned multipart), for big files.

``POST /v1/uploads`` hands out one presigned PUT URL per part; the client sends the parts to the
store, then ``POST /v1/uploads/{id}/complete`` verifies size and sha256 and makes it a file (the
same ``FilePublic`` as ``POST /v1/files``). With local storage the API answers 409: upload
through ``POST /v1/files`` (what :class:`recalib.client.RecalibClient` falls back to).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response, status

from recalib.contract import FilePublic
from recalib.contract.uploads import DirectUpload, DirectUploadCreate
from recalib.files.direct_uploads import DirectUploads
from service.api.deps import TenantDep
from service.problems import problem_responses

router = APIRouter(prefix="/uploads", tags=["files"])

UploadIdPath = Annotated[str, Path(pattern=r"^u_[A-Za-z0-9_-]{16,64}$")]


async def _direct_uploads(request: Request) -> DirectUploads:
    state = request.app.state
    return DirectUploads(state.file_store, state.redis, state.settings.presigned_expiry_s)


DirectUploadsDep = Annotated[DirectUploads, Depends(_direct_uploads)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DirectUpload,
    responses=problem_responses(400, 401, 409, 413, 422, 503),
    summary="Start a direct upload: presigned URLs of the object store, one per part",
)
def start_upload(
    body: DirectUploadCreate, tenant: TenantDep, uploads: DirectUploadsDep
) -> DirectUpload:
    """409 when the server stores files locally: upload through ``POST /v1/files`` then."""
    return uploads.start(tenant, body)


@router.post(
    "/{upload_id}/complete",
    status_code=status.HTTP_201_CREATED,
    response_model=FilePublic,
    responses=problem_responses(401, 404, 409, 422, 503),
    summary="Complete a direct upload: verified (size, sha256), it becomes a file",
)
def complete_upload(
    upload_id: UploadIdPath, response: Response, tenant: TenantDep, uploads: DirectUploadsDep
) -> FilePublic:
    record = uploads.complete(tenant, upload_id)
    response.headers["Location"] = f"/v1/files/{record.id}"
    return record


@router.delete(
    "/{upload_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=problem_responses(401, 404, 409, 422, 503),
    summary="Abort a direct upload",
)
def abort_upload(upload_id: UploadIdPath, tenant: TenantDep, uploads: DirectUploadsDep) -> Response:
    uploads.abort(tenant, upload_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
