"""The submit form's ``multipart/form-data`` body: up to four files streamed to disk, a few text
fields.

Like ``POST /v1/files`` (:mod:`service.uploads`), files are never held in memory: each file field
is written into a part file of the file store as it arrives (hashed, capped at
``RECALIB_MAX_UPLOAD_BYTES``). Text fields are capped at :data:`MAX_FIELD_BYTES`; other fields
are ignored. On any error every part file is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
from starlette.requests import ClientDisconnect, Request
from streaming_form_data import StreamingFormDataParser
from streaming_form_data.parser import ParseFailedException
from streaming_form_data.targets import BaseTarget

from recalib.contract import FileRecord
from recalib.errors import InvalidDataError, PayloadTooLargeError, UserError
from recalib.files.storage import UploadPart as PartFile
from recalib.files.store import FileStore
from service.uploads import MULTIPART_OVERHEAD_BYTES, SLICE_BYTES, check_declared_length

FILE_FIELDS = ("model", "calibration", "evaluation", "source_evaluation")
TEXT_FIELDS = ("csrf_token", "kind", "estimator", "batch_size", "fold", "arch", "options")
MAX_FIELD_BYTES = 64 * 1024


class _FileField(BaseTarget):
    def __init__(self, part: PartFile) -> None:
        super().__init__()
        self.part = part

    def on_data_received(self, chunk: bytes) -> None:
        self.part.write(chunk)


class _TextField(BaseTarget):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.value = bytearray()

    def on_data_received(self, chunk: bytes) -> None:
        if len(self.value) + len(chunk) > MAX_FIELD_BYTES:
            raise InvalidDataError(f"form field {self.name} is over {MAX_FIELD_BYTES} bytes")
        self.value += chunk


@dataclass
class SubmitForm:
    """A parsed form: text fields, and the uploaded files not yet committed to the store."""

    fields: dict[str, str] = field(default_factory=dict)
    uploads: dict[str, tuple[str, PartFile, str]] = field(default_factory=dict)

    def discard(self) -> None:
        for _, part, _ in self.uploads.values():
            part.discard()
        self.uploads.clear()

    def commit(self, files: FileStore, tenant: str) -> dict[str, FileRecord]:
        """Make every uploaded file a file of ``tenant``; on failure none stays uncommitted."""
        records: dict[str, FileRecord] = {}
        try:
            for role, (file_id, part, filename) in list(self.uploads.items()):
                records[role] = files.commit(tenant, file_id, part, filename)
                del self.uploads[role]
        finally:
            self.discard()
        return records


async def receive_submit_form(request: Request, files: FileStore) -> SubmitForm:
    """Stream the form into part files; files left empty in the form are dropped."""
    content_type = request.headers.get("content-type", "").lower()
    if not content_type.startswith("multipart/form-data"):
        raise UserError("the form must be sent as multipart/form-data", field="body")
    max_body = len(FILE_FIELDS) * (files.max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
    check_declared_length(request, max_body)
    parts = {role: files.new_part() for role in FILE_FIELDS}
    targets = {role: _FileField(part) for role, (_, part) in parts.items()}
    texts = {name: _TextField(name) for name in TEXT_FIELDS}
    try:
        parser = StreamingFormDataParser(headers=dict(request.headers))
        for name, target in {**targets, **texts}.items():
            parser.register(name, target)
        await _pump(request, parser, max_body)
    except ParseFailedException as exc:
        _discard(parts)
        raise InvalidDataError(f"bad multipart body: {exc}", field="body") from exc
    except ClientDisconnect as exc:
        _discard(parts)
        raise InvalidDataError("upload aborted: the client closed the connection") from exc
    except BaseException:
        _discard(parts)
        raise
    form = SubmitForm({name: text.value.decode("utf-8", "replace") for name, text in texts.items()})
    for role, (file_id, part) in parts.items():
        part.close()
        filename = targets[role].multipart_filename
        if part.bytes == 0 or not filename:
            part.discard()
        else:
            form.uploads[role] = (file_id, part, filename)
    return form


def _discard(parts: dict[str, tuple[str, PartFile]]) -> None:
    for _, part in parts.values():
        part.discard()


async def _pump(request: Request, parser: StreamingFormDataParser, max_bytes: int) -> None:
    """Feed the body to the parser in ~1 MiB slices, each in a worker thread (disk writes)."""
    pending: list[bytes] = []
    pending_bytes = received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise PayloadTooLargeError(f"the form is larger than {max_bytes} bytes", field="body")
        pending.append(chunk)
        pending_bytes += len(chunk)
        if pending_bytes >= SLICE_BYTES:
            await anyio.to_thread.run_sync(parser.data_received, b"".join(pending))
            pending, pending_bytes = [], 0
    if pending:
        await anyio.to_thread.run_sync(parser.data_received, b"".join(pending))
