"""Uploaded files: content and metadata on disk (``recalib.layout``), a per-tenant index in Redis.

The disk is the truth: ``files/<id>`` is the content, ``files/<id>.json`` its :class:`FileRecord`
(the worker reads both). Both are committed by atomic rename, content first, so a file whose
metadata exists is complete. Redis holds only the listing order and a sha256 → id lookup per tenant;
entries whose metadata has gone (retention, a crash) are dropped when a listing meets them.
"""

from __future__ import annotations

import os
import re
import secrets
import unicodedata
from datetime import UTC, datetime
from pathlib import Path

import anyio
import redis
from fastapi import Request

from recalib import layout
from recalib.contract import FilePublic, FileRecord, JobCreate, Page
from recalib.errors import InvalidOptionError, NotFoundError, UserError
from service.uploads import PartFile, UploadArea, receive_into

FILE_ID_RE = re.compile(r"^f_[A-Za-z0-9_-]{16,64}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CURSOR_RE = re.compile(r"^\d{17}:f_[A-Za-z0-9_-]{16,64}$")
_UNSAFE_CHARS_RE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_FILENAME_CHARS = 128


def new_file_id() -> str:
    return "f_" + secrets.token_urlsafe(16)


def sanitize_filename(name: str | None) -> str:
    """A safe base name: no directories, only ``[A-Za-z0-9._-]``, no leading dot, ≤ 128 chars.

    The extension is kept when the name is shortened (the worker reads the format from it).
    """
    base = re.split(r"[/\\]", unicodedata.normalize("NFKC", name or ""))[-1]
    base = _UNSAFE_CHARS_RE.sub("_", base).lstrip(".")
    stem, dot, ext = base.rpartition(".")
    if len(base) > MAX_FILENAME_CHARS:
        ext = ext[:16] if dot else ""
        base = (stem if dot else base)[: MAX_FILENAME_CHARS - len(ext) - 1] + (
            f".{ext}" if ext else ""
        )
    return base or "upload"


class FileStore:
    """Uploaded files of all tenants. Methods raise :class:`NotFoundError` for another tenant's."""

    def __init__(self, data_dir: Path, conn: redis.Redis, max_upload_bytes: int) -> None:
        self.data_dir = data_dir
        self.conn = conn
        self.max_upload_bytes = max_upload_bytes
        self.uploads = UploadArea(data_dir)
        self.committed_bytes = 0  # bytes of uploads committed by this process (a counter)

    # -- writing ---------------------------------------------------------------------------

    async def receive(self, request: Request, tenant: str, filename: str | None) -> FileRecord:
        """Stream the request body to disk and commit it as a new file of ``tenant``.

        ``filename`` (header or query) wins over a multipart part's own filename; one of them is
        needed because the worker reads the file format from the extension.
        """
        file_id = new_file_id()
        part = self.uploads.new_part(file_id, self.max_upload_bytes)
        part_filename = await receive_into(request, part)
        name = filename or part_filename
        if not name:
            part.discard()
            raise UserError(
                "the upload needs a filename (its extension tells the format): send the "
                "`X-Filename` header or `?filename=`, or a multipart part with a filename",
                field="filename",
            )
        return await anyio.to_thread.run_sync(self._commit, tenant, file_id, part, name)

    def _commit(self, tenant: str, file_id: str, part: PartFile, filename: str) -> FileRecord:
        record = FileRecord(
            id=file_id,
            filename=sanitize_filename(filename),
            bytes=part.bytes,
            sha256=part.sha256,
            created_at=datetime.now(UTC),
            tenant=tenant,
        )
        content, meta = self._paths(file_id)
        content.parent.mkdir(parents=True, exist_ok=True)
        meta_part = part.path.with_suffix(".json")
        try:
            os.replace(part.path, content)
            meta_part.write_text(record.model_dump_json())
            os.replace(meta_part, meta)
            with self.conn.pipeline() as pipe:
                pipe.zadd(_index_key(tenant), {_index_member(record): 0})
                pipe.hset(_sha_key(tenant), record.sha256, file_id)
                pipe.execute()
        except BaseException:
            for path in (meta, meta_part, content, part.path):
                path.unlink(missing_ok=True)
            raise
        self.committed_bytes += record.bytes
        return record

    def delete(self, tenant: str, file_id: str) -> None:
        """Delete a file of ``tenant``: its metadata first (it stops being usable), then content."""
        record = self.get(tenant, file_id)
        content, meta = self._paths(file_id)
        meta.unlink(missing_ok=True)
        content.unlink(missing_ok=True)
        self._unindex(record)

    # -- reading ---------------------------------------------------------------------------

    def get(self, tenant: str, file_id: str, field: str | None = None) -> FileRecord:
        """The record of a file of ``tenant``; :class:`NotFoundError` (naming ``field``) if none."""
        record = self._read(file_id) if FILE_ID_RE.match(file_id) else None
        if record is None or record.tenant != tenant:
            raise NotFoundError(
                f"no file {file_id!r}: upload it first with POST /v1/files",
                field=field,
                file=file_id,
            )
        return record

    def list(
        self, tenant: str, *, cursor: str | None = None, limit: int = 50, sha256: str | None = None
    ) -> Page[FilePublic]:
        """Files of ``tenant``, newest first; ``sha256`` narrows to the file with that content."""
        if sha256 is not None:
            return self._by_sha256(tenant, sha256.lower())
        if cursor is not None and not _CURSOR_RE.match(cursor):
            raise InvalidOptionError("cursor is not one this API returned", field="cursor")
        high = b"(" + cursor.encode() if cursor else b"+"
        members = self.conn.zrevrangebylex(_index_key(tenant), high, b"-", start=0, num=limit + 1)
        items: list[FilePublic] = []
        for member in members[:limit]:
            record = self._read(_text(member).partition(":")[2])
            if record is None:
                self.conn.zrem(_index_key(tenant), member)
                continue
            items.append(FilePublic.model_validate(record.model_dump()))
        next_cursor = _text(members[limit - 1]) if len(members) > limit else None
        return Page[FilePublic](items=items, next_cursor=next_cursor)

    def require_job_inputs(self, tenant: str, request: JobCreate) -> None:
        """Check that every file a job names exists for ``tenant`` (the error names the field)."""
        for field in ("model_file", "calibration_file", "eval_file"):
            file_id = getattr(request, field)
            if file_id is not None:
                try:
                    self.get(tenant, file_id, field=field)
                except NotFoundError as exc:
                    raise InvalidOptionError(
                        f"{field}: {exc.message}", field=field, file=file_id
                    ) from exc

    def _by_sha256(self, tenant: str, sha256: str) -> Page[FilePublic]:
        if not SHA256_RE.match(sha256):
            raise InvalidOptionError("sha256 must be 64 hex digits", field="sha256")
        file_id = self.conn.hget(_sha_key(tenant), sha256)
        record = self._read(_text(file_id)) if file_id else None
        if record is None or record.tenant != tenant or record.sha256 != sha256:
            return Page[FilePublic](items=[])
        return Page[FilePublic](items=[FilePublic.model_validate(record.model_dump())])

    def _read(self, file_id: str) -> FileRecord | None:
        content, meta = self._paths(file_id)
        try:
            record = FileRecord.model_validate_json(meta.read_bytes())
        except FileNotFoundError:
            return None
        return record if content.exists() else None

    def _unindex(self, record: FileRecord) -> None:
        self.conn.zrem(_index_key(record.tenant), _index_member(record))
        sha_key = _sha_key(record.tenant)
        current = self.conn.hget(sha_key, record.sha256)
        if current is not None and _text(current) == record.id:
            self.conn.hdel(sha_key, record.sha256)

    def _paths(self, file_id: str) -> tuple[Path, Path]:
        return layout.file_path(self.data_dir, file_id), layout.file_meta_path(
            self.data_dir, file_id
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _index_key(tenant: str) -> str:
    return f"recalib:files:index:{tenant}"


def _sha_key(tenant: str) -> str:
    return f"recalib:files:sha256:{tenant}"


def _index_member(record: FileRecord) -> str:
    """Lexicographic order = creation order: microseconds since the epoch, zero-padded, then id."""
    micros = int(record.created_at.timestamp() * 1_000_000)
    return f"{micros:017d}:{record.id}"
