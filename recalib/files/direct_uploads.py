"""Direct uploads: presigned multipart uploads into the object store, verified at completion.

:meth:`DirectUploads.start` opens a multipart upload at ``files/<file id>`` and presigns one PUT
URL per part; the client sends the parts to the store itself (the API sees none of the bytes).
:meth:`DirectUploads.complete` checks that every part is there with its size, completes the
upload, then reads the object back once to verify its size and sha256: only then does the file
get its metadata and index entries (:meth:`FileStore.adopt`) and become usable. A mismatch
deletes the object. Uploads never completed are aborted once expired (:meth:`clean_expired`, by
retention): nothing of them is usable or kept.

State lives in Redis: ``recalib:upload:<id>`` (a hash) and ``recalib:uploads:pending`` (zset id →
expiry, epoch s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import redis

from recalib import defaults
from recalib.contract import FileRecord
from recalib.contract.uploads import DirectUpload, DirectUploadCreate, DirectUploadPart
from recalib.errors import (
    ConflictError,
    InvalidDataError,
    NotFoundError,
    PayloadTooLargeError,
)
from recalib.files.store import FileStore, content_key
from recalib.ids import new_file_id
from recalib.keys import PREFIX, as_text

logger = logging.getLogger(__name__)

PENDING_KEY = PREFIX + "uploads:pending"
MAX_PARTS = 9000
GRACE_S = 3600  # state kept past the URLs' expiry (a completion may still be verifying)


def upload_key(upload_id: str) -> str:
    return f"{PREFIX}upload:{upload_id}"


def part_bytes_for(size: int) -> int:
    """Part size for a file of ``size`` bytes: 64 MiB, larger when 9000 parts would not do."""
    needed = -(-size // MAX_PARTS)
    return max(defaults.DIRECT_UPLOAD_PART_BYTES, -(-needed // 1024**2) * 1024**2)


class DirectUploads:
    """Presigned uploads into ``files``'s object store; ``expiry_s`` is the URLs' lifetime."""

    def __init__(self, files: FileStore, conn: redis.Redis, expiry_s: int) -> None:
        self.files, self.conn, self.expiry_s = files, conn, expiry_s

    @property
    def store(self) -> Any:
        from recalib.files.storage.s3 import S3Storage

        if not isinstance(self.files.storage, S3Storage):
            raise ConflictError(
                "direct uploads need object storage (RECALIB_STORAGE_URL=s3://...); upload "
                "through POST /v1/files",
                field="storage",
            )
        return self.files.storage

    def start(self, tenant: str, request: DirectUploadCreate) -> DirectUpload:
        store = self.store
        if request.bytes > self.files.max_upload_bytes:
            raise PayloadTooLargeError(
                f"bytes: {request.bytes} is over the upload limit of "
                f"{self.files.max_upload_bytes} bytes (RECALIB_MAX_UPLOAD_BYTES)",
                field="bytes",
            )
        file_id = new_file_id()
        upload_id = "u_" + secrets.token_urlsafe(18)
        part_bytes = part_bytes_for(request.bytes)
        count = -(-request.bytes // part_bytes)
        expires = time.time() + self.expiry_s
        with self.files.writing():
            s3_upload_id = store.create_multipart(content_key(file_id))
            urls = [
                store.presign_part(content_key(file_id), s3_upload_id, n, self.expiry_s)
                for n in range(1, count + 1)
            ]
        state = {
            "tenant": tenant,
            "file_id": file_id,
            "s3_upload_id": s3_upload_id,
            "filename": request.filename,
            "bytes": request.bytes,
            "sha256": request.sha256.lower(),
            "part_bytes": part_bytes,
            "expires": expires,
        }
        with self.conn.pipeline() as pipe:
            pipe.set(upload_key(upload_id), json.dumps(state), exat=int(expires + GRACE_S))
            pipe.zadd(PENDING_KEY, {upload_id: expires})
            pipe.execute()
        return DirectUpload(
            id=upload_id,
            file_id=file_id,
            part_bytes=part_bytes,
            parts=[DirectUploadPart(part_number=n, url=u) for n, u in enumerate(urls, 1)],
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    def complete(self, tenant: str, upload_id: str) -> FileRecord:
        """Verify and adopt the uploaded file (422 naming what is wrong; 404 if unknown)."""
        store = self.store
        state = self._state(tenant, upload_id)
        if not self.conn.set(upload_key(upload_id) + ":lock", "1", nx=True, ex=3600):
            raise ConflictError(f"upload {upload_id} is being completed already", field="upload")
        try:
            return self._complete(store, upload_id, state)
        finally:
            self.conn.delete(upload_key(upload_id) + ":lock")

    def _complete(self, store: Any, upload_id: str, state: dict[str, Any]) -> FileRecord:
        key = content_key(state["file_id"])
        size, part_bytes = int(state["bytes"]), int(state["part_bytes"])
        count = -(-size // part_bytes)
        with self.files.writing():
            parts = {p["PartNumber"]: p for p in store.list_parts(key, state["s3_upload_id"])}
        for n in range(1, count + 1):
            expected = part_bytes if n < count else size - part_bytes * (count - 1)
            if n not in parts:
                raise InvalidDataError(
                    f"part {n} of {count} has not been uploaded: PUT it to its URL, then "
                    "complete again",
                    field="parts",
                )
            if int(parts[n]["Size"]) != expected:
                raise InvalidDataError(
                    f"part {n} has {parts[n]['Size']} bytes, expected {expected}: PUT it again",
                    field="parts",
                )
        if set(parts) - set(range(1, count + 1)):
            raise InvalidDataError(f"parts beyond {count} were uploaded", field="parts")
        with self.files.writing():
            store.complete_multipart(key, state["s3_upload_id"], [parts[n] for n in sorted(parts)])
        self._forget(upload_id)
        try:
            digest, got = self._hash(key)
            if got != size or digest != state["sha256"]:
                raise InvalidDataError(
                    f"the uploaded content has {got} bytes and sha256 {digest}, not the declared "
                    f"{size} and {state['sha256']}: nothing was kept; upload it again",
                    field="sha256",
                )
            return self.files.adopt(
                state["tenant"], state["file_id"], size, digest, state["filename"]
            )
        except BaseException:
            with contextlib.suppress(Exception):
                store.delete(key)
            raise

    def abort(self, tenant: str, upload_id: str) -> None:
        state = self._state(tenant, upload_id)
        with self.files.writing():
            self.store.abort_multipart(content_key(state["file_id"]), state["s3_upload_id"])
        self._forget(upload_id)

    def clean_expired(self, now: float | None = None) -> int:
        """Abort uploads whose URLs expired without completion (retention); return how many."""
        from recalib.files.storage.s3 import S3Storage

        if not isinstance(self.files.storage, S3Storage):
            return 0
        now = time.time() if now is None else now
        cleaned = 0
        for raw in self.conn.zrangebyscore(PENDING_KEY, "-inf", now):  # type: ignore[union-attr]
            upload_id = as_text(raw)
            state = self._raw_state(upload_id)
            if state is not None:
                with contextlib.suppress(Exception):
                    key = content_key(state["file_id"])
                    self.files.storage.abort_multipart(key, state["s3_upload_id"])
            self._forget(upload_id)
            cleaned += 1
        if cleaned:
            logger.info("aborted %d direct upload(s) never completed", cleaned)
        return cleaned

    def _hash(self, key: str) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        with self.files.writing():
            info = self.files.storage.info(key)
            if info is None:
                raise InvalidDataError("the completed upload is not in the store", field="upload")
            if info.bytes:
                for chunk in self.files.storage.read_range(key, 0, info.bytes - 1):
                    digest.update(chunk)
                    size += len(chunk)
        return digest.hexdigest(), size

    def _state(self, tenant: str, upload_id: str) -> dict[str, Any]:
        state = self._raw_state(upload_id)
        if state is None or state.get("tenant") != tenant:
            raise NotFoundError(
                f"no direct upload {upload_id!r} (expired, completed, or never started): "
                "start one with POST /v1/uploads",
                field="upload_id",
            )
        return state

    def _raw_state(self, upload_id: str) -> dict[str, Any] | None:
        raw = self.conn.get(upload_key(upload_id))
        return json.loads(raw) if raw else None  # type: ignore[arg-type]

    def _forget(self, upload_id: str) -> None:
        with self.conn.pipeline() as pipe:
            pipe.delete(upload_key(upload_id))
            pipe.zrem(PENDING_KEY, upload_id)
            pipe.execute()
