"""Uploaded files: content and metadata in the store (:mod:`recalib.files.storage`), a per-tenant
index in Redis.

The store is the truth: ``files/<id>`` is the content, ``files/<id>.json`` its :class:`FileRecord`.
Both are committed whole (atomic rename on disk, a completed upload in S3), content first, so a
file whose metadata exists is complete. Redis holds only the listing order and a sha256 → id
lookup per tenant (:mod:`recalib.files.index`); entries whose metadata has gone (a crash)
are dropped when a listing meets them. The API (upload, list, delete), the worker
(:meth:`FileStore.input_record`, :meth:`FileStore.download`, :meth:`FileStore.check_content`)
and retention (:meth:`FileStore.remove`) all go through this class.
"""

from __future__ import annotations

import contextlib
import re
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import redis

from recalib.contract import FilePublic, FileRecord, JobCreate, Page
from recalib.errors import InvalidOptionError, NotFoundError, ServiceUnavailableError
from recalib.files.index import FileIndex
from recalib.files.storage import (
    LocalStorage,
    ObjectMissingError,
    Storage,
    UploadPart,
    storage_error,
)
from recalib.ids import FILE_ID_RE, new_file_id

__all__ = ["FileStore", "sanitize_filename", "storage_error"]

_UNSAFE_CHARS_RE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_FILENAME_CHARS = 128
FILES_PREFIX = "files/"


def content_key(file_id: str) -> str:
    return f"{FILES_PREFIX}{file_id}"


def meta_key(file_id: str) -> str:
    return f"{FILES_PREFIX}{file_id}.json"


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
    """Uploaded files of all tenants. Methods raise :class:`NotFoundError` for another tenant's.

    ``storage`` is the store (a path means the local directory there, as before).
    """

    def __init__(self, storage: Storage | Path, conn: redis.Redis, max_upload_bytes: int) -> None:
        self.storage: Storage = (
            LocalStorage(storage) if isinstance(storage, str | Path) else storage
        )
        self.conn = conn
        self.index = FileIndex(conn)  # the listing order and the sha256 lookup, per tenant
        self.max_upload_bytes = max_upload_bytes
        self.committed_bytes = 0  # bytes of uploads committed by this process (a counter)

    @property
    def data_dir(self) -> Path | None:
        """The local data directory, None with object storage."""
        return self.storage.root if isinstance(self.storage, LocalStorage) else None

    def open(self) -> None:
        """Prepare for uploads (removes what killed processes left in the local upload area)."""
        with self.writing():
            self.storage.open()

    def close(self) -> None:
        self.storage.close()

    # -- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Turn a failure of the store inside the block into :class:`ServiceUnavailableError`
        (503) naming it; other errors pass unchanged."""
        with self.storage.guard():
            yield

    def new_part(self) -> tuple[str, UploadPart]:
        """A new file id and the upload its content is written to (capped in size)."""
        file_id = new_file_id()
        with self.writing():
            return file_id, self.storage.new_upload(content_key(file_id), self.max_upload_bytes)

    def commit(self, tenant: str, file_id: str, part: UploadPart, filename: str) -> FileRecord:
        """Make a finished part the file ``file_id`` of ``tenant``; nothing is left on failure
        (:class:`ServiceUnavailableError` when the store cannot be written)."""
        with self.writing():
            self.storage.commit_upload(part, content_key(file_id))
            return self.adopt(tenant, file_id, part.bytes, part.sha256, filename)

    def adopt(self, tenant: str, file_id: str, size: int, sha256: str, filename: str) -> FileRecord:
        """Make the content already at ``files/<file_id>`` (verified by the caller) a file of
        ``tenant``: metadata, then the index. On failure the content is deleted too."""
        record = FileRecord(
            id=file_id,
            filename=sanitize_filename(filename),
            bytes=size,
            sha256=sha256,
            created_at=datetime.now(UTC),
            tenant=tenant,
        )
        try:
            with self.writing():
                self.storage.put_bytes(meta_key(file_id), record.model_dump_json().encode())
            self.index.add(record)
        except BaseException:
            for key in (meta_key(file_id), content_key(file_id)):
                with contextlib.suppress(Exception):  # best effort: the store may be the fault
                    self.storage.delete(key)
            raise
        self.committed_bytes += record.bytes
        return record

    def delete(self, tenant: str, file_id: str) -> None:
        """Delete a file of ``tenant`` (:class:`NotFoundError` if it has none such)."""
        self.remove(self.get(tenant, file_id))

    def remove(self, record: FileRecord) -> None:
        """Forget a file: the index entries first (Redis down → nothing is deleted), then the
        metadata (the file stops being usable), then the content.

        When the metadata cannot be deleted (:class:`ServiceUnavailableError`), the index entries
        are put back: the file stays whole, listed and usable, and the delete can be retried.
        """
        self.index.remove(record)
        try:
            with self.writing():
                self.storage.delete(meta_key(record.id))
        except ServiceUnavailableError:
            self.index.add(record)
            raise
        with self.writing():
            self.storage.delete(content_key(record.id))

    def records(self) -> Iterator[FileRecord]:
        """Every stored file's record, of all tenants (for retention)."""
        with self.writing():
            metas = [i.key for i in self.storage.list(FILES_PREFIX) if i.key.endswith(".json")]
        for key in metas:
            try:
                raw = self.storage.get_bytes(key)
                if raw is not None:
                    yield FileRecord.model_validate_json(raw)
            except (OSError, ValueError):
                continue

    def remove_orphans(self, cutoff_s: float) -> int:
        """Delete content older than ``cutoff_s`` (epoch) that has no metadata: what a process
        killed between writing an upload's content and its metadata left. Returns how many."""
        with self.writing():
            infos = list(self.storage.list(FILES_PREFIX))
            keys = {info.key for info in infos}
            removed = 0
            for info in infos:
                name = info.key.removeprefix(FILES_PREFIX)
                if not FILE_ID_RE.match(name) or info.modified_s >= cutoff_s:
                    continue
                if meta_key(name) not in keys:
                    self.storage.delete(info.key)
                    removed += 1
        return removed

    def input_record(self, file_id: str, role: str, tenant: str) -> FileRecord:
        """The record of ``file_id``, the ``role`` input of a job of ``tenant``;
        :class:`NotFoundError` naming ``role`` when the file is gone."""
        record = self._read(file_id)
        if record is None or record.tenant != tenant:
            raise NotFoundError(
                f"the {role} file {file_id} no longer exists (uploads are deleted after "
                "RECALIB_RETENTION_S); upload it again and submit a new job",
                file=file_id,
            )
        return record

    def download(self, record: FileRecord, target: Path, role: str) -> None:
        """The content of ``record``'s file at ``target`` (a hard link when the store is local
        and it can, else a download); :class:`NotFoundError` naming ``role`` when it is gone."""
        try:
            with self.storage.guard("worker"):
                self.storage.download(content_key(record.id), target)
        except ObjectMissingError as exc:
            raise self._content_missing(record, role) from exc

    def check_content(self, record: FileRecord, role: str) -> None:
        """:class:`NotFoundError` naming ``role`` unless ``record``'s content, whole, is still in
        the store (one HEAD: a worker that holds a copy still honours a deletion)."""
        with self.storage.guard("worker"):
            info = self.storage.info(content_key(record.id))
        if info is None or info.bytes != record.bytes:
            raise self._content_missing(record, role)

    def _content_missing(self, record: FileRecord, role: str) -> NotFoundError:
        return NotFoundError(
            f"the {role} file {record.id} ({record.filename}): its content is missing from "
            f"{self.storage.describe()}, deleted outside recalib; upload it again and "
            "submit a new job",
            file=record.id,
        )

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
            return self.index.by_sha256(tenant, sha256.lower(), self._read)
        return self.index.page(tenant, self._read, cursor=cursor, limit=limit)

    def require_job_inputs(self, tenant: str, request: JobCreate) -> None:
        """Check that every file a job names exists for ``tenant`` (the error names the field)."""
        for field in ("model_file", "calibration_file", "eval_file", "source_eval_file"):
            file_id = getattr(request, field)
            if file_id is not None:
                try:
                    self.get(tenant, file_id, field=field)
                except NotFoundError as exc:
                    raise InvalidOptionError(
                        f"{field}: {exc.message}", field=field, file=file_id
                    ) from exc

    def _read(self, file_id: str) -> FileRecord | None:
        """The record of ``file_id``; None when its metadata (or, on disk, content) is gone."""
        with self.writing():
            raw = self.storage.get_bytes(meta_key(file_id))
            if raw is None:
                return None
            record = FileRecord.model_validate_json(raw)
            if self.storage.is_local and self.storage.info(content_key(file_id)) is None:
                return None
        return record
