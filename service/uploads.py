"""Streaming uploads: the request body goes to the file store chunk by chunk, hashed on the way.

Not Starlette's ``UploadFile``, which spools the whole body to a temporary file before the handler
runs (twice the disk work, and the size cap would only apply afterwards). Here the body is read
from ``request.stream()``, gathered into ~1 MiB slices and written + hashed in a worker thread
(hashlib and file writes release the GIL), so the event loop keeps serving other requests and the
API's memory stays flat whatever the upload size.

The part file and its area are the local store's (:mod:`recalib.files.storage.upload_area`); this
module only reads the HTTP body into it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from fastapi import Request
from starlette.requests import ClientDisconnect
from streaming_form_data import StreamingFormDataParser
from streaming_form_data.parser import ParseFailedException
from streaming_form_data.targets import BaseTarget

from recalib.contract import FileRecord
from recalib.errors import InvalidDataError, PayloadTooLargeError, UserError
from recalib.files.storage import UploadPart as PartFile
from recalib.files.store import FileStore

logger = logging.getLogger(__name__)

SLICE_BYTES = 1024 * 1024
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # part headers and boundaries around the file


class _PartTarget(BaseTarget):
    """streaming-form-data target writing the ``file`` part into a :class:`PartFile`."""

    def __init__(self, part: PartFile) -> None:
        super().__init__()
        self.part = part
        self.finished = False

    def on_data_received(self, chunk: bytes) -> None:
        self.part.write(chunk)

    def on_finish(self) -> None:
        self.finished = True


def check_declared_length(request: Request, max_bytes: int, overhead: int = 0) -> None:
    """Refuse before reading when ``Content-Length`` already exceeds the cap."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + overhead:
        raise PayloadTooLargeError(
            f"Content-Length {declared} exceeds the upload limit of {max_bytes} bytes "
            "(RECALIB_MAX_UPLOAD_BYTES)",
            field="body",
        )


async def _pump(request: Request, sink: Callable[[bytes], None], max_stream_bytes: int) -> None:
    """Feed the body to ``sink`` in ~1 MiB slices, each in a worker thread."""
    pending: list[bytes] = []
    pending_bytes = received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_stream_bytes:
            raise PayloadTooLargeError(
                f"request body is larger than the upload limit of {max_stream_bytes} bytes",
                field="body",
            )
        pending.append(chunk)
        pending_bytes += len(chunk)
        if pending_bytes >= SLICE_BYTES:
            await anyio.to_thread.run_sync(sink, b"".join(pending))
            pending, pending_bytes = [], 0
    if pending:
        await anyio.to_thread.run_sync(sink, b"".join(pending))


async def receive_raw(request: Request, part: PartFile) -> None:
    """Write a raw (``application/octet-stream``) body into ``part``."""
    check_declared_length(request, part.max_bytes)
    await _pump(request, part.write, part.max_bytes)


async def receive_multipart(request: Request, part: PartFile) -> str | None:
    """Write the ``file`` part of a ``multipart/form-data`` body; return its client filename."""
    check_declared_length(request, part.max_bytes, MULTIPART_OVERHEAD_BYTES)
    try:
        parser = StreamingFormDataParser(headers=dict(request.headers))
    except ParseFailedException as exc:
        raise InvalidDataError(f"bad multipart body: {exc}", field="body") from exc
    target = _PartTarget(part)
    parser.register("file", target)
    try:
        await _pump(request, parser.data_received, part.max_bytes + MULTIPART_OVERHEAD_BYTES)
    except ParseFailedException as exc:
        raise InvalidDataError(f"bad multipart body: {exc}", field="body") from exc
    if not target.finished:
        raise InvalidDataError(
            "the multipart body has no complete `file` part (send the content as form field "
            "`file`)",
            field="file",
        )
    return target.multipart_filename


async def receive_into(request: Request, part: PartFile) -> str | None:
    """Stream the body into ``part`` (raw or multipart); the part is closed, or deleted on error.

    Returns the filename a multipart part declared (``None`` for raw bodies).
    """
    content_type = request.headers.get("content-type", "").lower()
    try:
        if content_type.startswith("multipart/form-data"):
            filename = await receive_multipart(request, part)
        else:
            await receive_raw(request, part)
            filename = None
        part.close()
    except ClientDisconnect as exc:
        part.discard()
        logger.info("upload aborted by the client after %d bytes", part.bytes)
        raise InvalidDataError("upload aborted: the client closed the connection") from exc
    except BaseException:  # refused, malformed, or the server is stopping: leave nothing
        part.discard()
        raise
    if part.bytes == 0:
        part.discard()
        raise UserError("the upload is empty: send the file's bytes as the body", field="body")
    return filename


async def receive_file(
    request: Request, files: FileStore, tenant: str, filename: str | None
) -> FileRecord:
    """Stream the request body into the file store as a new file of ``tenant``.

    ``filename`` (header or query) wins over a multipart part's own filename; one of them is
    needed because the worker reads the file format from the extension.
    """
    file_id, part = files.new_part()
    with files.writing():  # a full or read-only data directory: 503 naming it
        part_filename = await receive_into(request, part)
    name = filename or part_filename
    if not name:
        part.discard()
        raise UserError(
            "the upload needs a filename (its extension tells the format): send the "
            "`X-Filename` header or `?filename=`, or a multipart part with a filename",
            field="filename",
        )
    return await anyio.to_thread.run_sync(files.commit, tenant, file_id, part, name)
