"""Uploaded files: content and metadata on disk (``recalib.layout``), a per-tenant index in Redis.

The disk is the truth: ``files/<id>`` is the content, ``files/<id>.json`` its :class:`FileRecord`.
Both are committed by atomic rename, content first, so a file whose metadata exists is complete.
Redis holds only the listing order and a sha256 → id lookup per tenant; entries whose metadata has
gone (a crash) are dropped when a listing meets them. The API (upload, list, delete), the worker
(:meth:`FileStore.materialize`) and retention (:meth:`FileStore.remove`) all go through this class.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import redis

from recalib import layout
from recalib.contract import FilePublic, FileRecord, JobCreate, Page
from recalib.errors import InvalidOptionError, NotFoundError, ServiceUnavailableError
from recalib.ids import FILE_ID_RE, new_file_id
from recalib.jobs.keys import as_text, file_index_key, file_sha_key
from recalib.jobs.upload_area import PartFile, UploadArea

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CURSOR_RE = re.compile(r"^\d{17}:f_[A-Za-z0-9_-]{16,64}$")
_UNSAFE_CHARS_RE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_FILENAME_CHARS = 128

STORAGE_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
    | {errno.ENOTDIR, errno.EEXIST}
)
"""OS errors that mean "the data directory cannot be written" (full, read-only, not ours, or a
file where a directory belongs), not a bug of ours."""


def storage_error(exc: BaseException, data_dir: Path, who: str) -> ServiceUnavailableError | None:
    """The 503 error for ``exc`` if it is a storage failure (see ``STORAGE_ERRNOS``), else None.

    ``who`` is the process that needs the write (``"API"``, ``"worker"``): the fix is its.
    """
    if not isinstance(exc, OSError) or exc.errno not in STORAGE_ERRNOS:
        return None
    where = exc.filename or data_dir
    return ServiceUnavailableError(
        f"the {who} cannot write {where}: {exc.strerror or exc}; make the data directory "
        f"(RECALIB_DATA_DIR={data_dir}) writable for the {who}, with free space",
        file=str(where),
    )


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

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Turn a storage failure inside the block into :class:`ServiceUnavailableError` (503)
        naming the directory; other errors pass unchanged."""
        try:
            yield
        except OSError as exc:
            error = storage_error(exc, self.data_dir, "API")
            if error is None:
                raise
            raise error from exc

    def new_part(self) -> tuple[str, PartFile]:
        """A new file id and the part file its upload is written to (capped in size)."""
        file_id = new_file_id()
        with self.writing():
            return file_id, self.uploads.new_part(file_id, self.max_upload_bytes)

    def commit(self, tenant: str, file_id: str, part: PartFile, filename: str) -> FileRecord:
        """Make a finished part the file ``file_id`` of ``tenant``; nothing is left on failure
        (:class:`ServiceUnavailableError` when the data directory cannot be written)."""
        with self.writing():
            return self._commit(tenant, file_id, part, filename)

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
            self._index(record)
        except BaseException:
            for path in (meta, meta_part, content, part.path):
                with contextlib.suppress(OSError):  # best effort: the directory may be the fault
                    path.unlink(missing_ok=True)
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
        self._unindex(record)
        content, meta = self._paths(record.id)
        try:
            with self.writing():
                meta.unlink(missing_ok=True)
        except ServiceUnavailableError:
            self._index(record)
            raise
        with self.writing():
            content.unlink(missing_ok=True)

    def records(self) -> Iterator[FileRecord]:
        """Every stored file's record, of all tenants (for retention)."""
        for meta in layout.files_dir(self.data_dir).glob("f_*.json"):
            try:
                yield FileRecord.model_validate_json(meta.read_bytes())
            except (OSError, ValueError):
                continue

    def materialize(self, file_id: str, target_dir: Path, role: str) -> Path:
        """The content of ``file_id`` at ``target_dir/<its filename>`` (a hard link when it can).

        Raises :class:`NotFoundError` naming ``role`` when the file is gone.
        """
        record = self._read(file_id)
        if record is None:
            raise NotFoundError(
                f"the {role} file {file_id} no longer exists (uploads are deleted after "
                "RECALIB_RETENTION_S); upload it again and submit a new job",
                file=file_id,
            )
        target = target_dir / Path(record.filename).name
        target.parent.mkdir(parents=True, exist_ok=True)
        content = self._paths(file_id)[0]
        try:
            os.link(content, target)  # same filesystem: no copy
        except OSError:
            shutil.copyfile(content, target)
        return target

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
        members = self.conn.zrevrangebylex(
            file_index_key(tenant), high, b"-", start=0, num=limit + 1
        )
        items: list[FilePublic] = []
        for member in members[:limit]:
            record = self._read(as_text(member).partition(":")[2])
            if record is None:
                self.conn.zrem(file_index_key(tenant), member)
                continue
            items.append(record)
        next_cursor = as_text(members[limit - 1]) if len(members) > limit else None
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
        file_id = self.conn.hget(file_sha_key(tenant), sha256)
        record = self._read(as_text(file_id)) if file_id else None
        if record is None or record.tenant != tenant or record.sha256 != sha256:
            return Page[FilePublic](items=[])
        return Page[FilePublic](items=[record])

    def _read(self, file_id: str) -> FileRecord | None:
        content, meta = self._paths(file_id)
        try:
            record = FileRecord.model_validate_json(meta.read_bytes())
        except FileNotFoundError:
            return None
        return record if content.exists() else None

    def _index(self, record: FileRecord) -> None:
        with self.conn.pipeline() as pipe:
            pipe.zadd(file_index_key(record.tenant), {_index_member(record): 0})
            pipe.hset(file_sha_key(record.tenant), record.sha256, record.id)
            pipe.execute()

    def _unindex(self, record: FileRecord) -> None:
        self.conn.zrem(file_index_key(record.tenant), _index_member(record))
        sha_key = file_sha_key(record.tenant)
        current = self.conn.hget(sha_key, record.sha256)
        if current is not None and as_text(current) == record.id:
            self.conn.hdel(sha_key, record.sha256)

    def _paths(self, file_id: str) -> tuple[Path, Path]:
        return layout.file_path(self.data_dir, file_id), layout.file_meta_path(
            self.data_dir, file_id
        )


def _index_member(record: FileRecord) -> str:
    """Lexicographic order = creation order: microseconds since the epoch, zero-padded, then id."""
    micros = int(record.created_at.timestamp() * 1_000_000)
    return f"{micros:017d}:{record.id}"
