"""Direct uploads: the client PUTs a file's parts straight to the object store (presigned URLs),
then asks the API to complete it; the file exists only once its size and sha256 are verified."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from recalib.contract.base import Input, Output


class DirectUploadCreate(Input):
    """``POST /v1/uploads`` body: what the client is about to upload."""

    filename: str = Field(min_length=1, max_length=1024, examples=["resnet50.pt2"])
    bytes: int = Field(ge=1, description="Exact size; the store's copy must have it.")
    sha256: str = Field(
        pattern=r"^[0-9a-fA-F]{64}$", description="Of the whole file; verified at completion."
    )


class DirectUploadPart(Output):
    part_number: int
    url: str = Field(description="PUT this part's bytes here (no other headers needed).")


class DirectUpload(Output):
    """Where to PUT each part: part ``n`` is bytes ``(n-1)·part_bytes`` up to ``n·part_bytes``."""

    id: str
    file_id: str = Field(description="The file's id once completed.")
    part_bytes: int
    parts: list[DirectUploadPart]
    expires_at: datetime = Field(description="The URLs stop working; retention aborts it after.")
