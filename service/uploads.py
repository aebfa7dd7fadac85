"""Streaming uploads: the request body goes to disk chunk by chunk, hashed on the way.

Not Starlette's ``UploadFile``, which spools the whole body to a temporary file before the handler
runs (twice the disk work, and the size cap would only apply afterwards). Here the body is read
from ``request.stream()``, gathered into ~1 MiB slices and written + hashed in a worker thread
(hashlib and file writes release the GIL), so the event loop keeps serving other requests and the
API's memory stays flat whatever the upload size.

Uploads in flight lie in ``<data_dir>/tmp/<process token>/``, a directory whose ``.lock`` file this
process holds with ``flock``. At start-up every directory whose lock is free belongs to a process
that is gone (killed mid-upload), and is removed; the kernel drops the lock of a killed process, so
this is safe with several API processes sharing the data directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import anyio
from fastapi import Request
from starlette.requests import ClientDisconnect
from streaming_form_data import StreamingFormDataParser
from streaming_form_data.parser import ParseFailedException
from streaming_form_data.targets import BaseTarget

from recalib import layout
from recalib.errors import InvalidDataError, PayloadTooLargeError, UserError

logger = logging.getLogger(__name__)

SLICE_BYTES = 1024 * 1024
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # part headers and boundaries around the file
STALE_LOOSE_FILE_S = 3600.0
_LOCK_NAME = ".lock"


class PartFile:
    """A file being uploaded: writes, hashes and counts bytes; over ``max_bytes`` it refuses."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.bytes = 0
        self._hash = hashlib.sha256()
        self._fh: IO[bytes] | None = path.open("xb")

    def write(self, chunk: bytes) -> None:
        if self._fh is None:
            raise ValueError("write to a closed upload")
        if self.bytes + len(chunk) > self.max_bytes:
            raise PayloadTooLargeError(
                f"upload is larger than the limit of {self.max_bytes} bytes "
                "(RECALIB_MAX_UPLOAD_BYTES)",
                field="body",
            )
        self._hash.update(chunk)
        self._fh.write(chunk)
        self.bytes += len(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def discard(self) -> None:
        """Close and delete: nothing of an aborted or refused upload stays behind."""
        self.close()
        self.path.unlink(missing_ok=True)


class UploadArea:
    """This process's directory for uploads in flight, under ``layout.tmp_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.tmp_dir = layout.tmp_dir(data_dir)
        self._own_dir: Path | None = None
        self._lock_fd: int | None = None

    def open(self) -> None:
        """Remove what dead processes left, then create and lock this process's directory."""
        if self._own_dir is not None:
            return
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        removed = clean_stale_uploads(self.tmp_dir)
        if removed:
            logger.info("removed %d unfinished upload area(s) of stopped processes", removed)
        own = self.tmp_dir / f"up-{os.getpid()}-{secrets.token_hex(6)}"
        own.mkdir()
        fd = os.open(own / _LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._own_dir, self._lock_fd = own, fd

    def close(self) -> None:
        """Delete this process's directory (uploads still in flight are lost) and unlock it."""
        if self._own_dir is None:
            return
        shutil.rmtree(self._own_dir, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self._own_dir = self._lock_fd = None

    def new_part(self, file_id: str, max_bytes: int) -> PartFile:
        self.open()
        if self._own_dir is None:
            raise RuntimeError("upload area is not open")
        return PartFile(self._own_dir / f"{file_id}.part", max_bytes)


def clean_stale_uploads(tmp_dir: Path) -> int:
    """Remove upload directories whose lock is free (their process is gone); return how many.

    Loose files (none are written by this module) are removed once an hour old.
    """
    removed = 0
    for entry in tmp_dir.iterdir():
        if entry.is_dir() and (entry / _LOCK_NAME).exists():
            if _lock_is_free(entry / _LOCK_NAME):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        elif time.time() - entry.stat().st_mtime > STALE_LOOSE_FILE_S:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(True)
            removed += 1
    return removed


def _lock_is_free(lock_path: Path) -> bool:
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing also releases the lock if we got it
    return True


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
