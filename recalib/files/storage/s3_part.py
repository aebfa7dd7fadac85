"""An upload streamed into S3: buffered into parts of a multipart upload, hashed and capped.

Nothing is sent until a part's worth has arrived; an upload smaller than one part becomes one
``PutObject`` at commit. The API's memory holds at most one part (plus the slice being added)
whatever the upload's size. :meth:`S3Part.discard` aborts the multipart upload in the store, so
a refused or broken upload leaves nothing there either.
"""

from __future__ import annotations

import logging
from typing import Any

from recalib.files.storage.meter import Meter, Metered

logger = logging.getLogger(__name__)

MIN_PART_BYTES = 8 * 1024**2
MAX_PARTS = 9000  # S3 allows 10 000


def part_bytes_for(max_bytes: int) -> int:
    """Part size for an upload of at most ``max_bytes``: 8 MiB, larger when needed (whole MiB)."""
    needed = -(-max_bytes // MAX_PARTS)
    return max(MIN_PART_BYTES, -(-needed // 1024**2) * 1024**2)


class S3Part(Metered):
    """A file being uploaded to ``bucket/key`` (becomes visible only at :meth:`commit`)."""

    def __init__(self, client: Any, bucket: str, key: str, max_bytes: int) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        self.max_bytes = max_bytes
        self.meter = Meter(max_bytes)
        self.part_bytes = part_bytes_for(max_bytes)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._closed = False

    def write(self, chunk: bytes) -> None:
        if self._closed:
            raise ValueError("write to a closed upload")
        self.meter.add(chunk)
        self._buffer += chunk
        while len(self._buffer) >= self.part_bytes:
            self._send(bytes(self._buffer[: self.part_bytes]))
            del self._buffer[: self.part_bytes]

    def close(self) -> None:
        self._closed = True

    def commit(self) -> None:
        """Complete the upload: the object exists whole afterwards (on failure: discarded)."""
        self._closed = True
        try:
            if self._upload_id is None:
                self.client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self._buffer))
            else:
                if self._buffer:
                    self._send(bytes(self._buffer))
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
                self._upload_id = None
        except BaseException:
            self.discard()
            raise
        self._buffer = bytearray()

    def discard(self) -> None:
        """Forget the upload here and in the store (best effort: the store may be the fault)."""
        self._closed = True
        self._buffer = bytearray()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=upload_id
                )
            except Exception as exc:  # retention aborts it later (clean_stale_uploads)
                logger.warning("cannot abort the upload of %s: %s", self.key, exc)

    def _send(self, data: bytes) -> None:
        if self._upload_id is None:
            created = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)
            self._upload_id = created["UploadId"]
        number = len(self._parts) + 1
        answer = self.client.upload_part(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=data,
        )
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})
