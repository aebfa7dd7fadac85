"""Responses for objects of a store that is not on this machine's disk (S3): whole, one range
(206), or a presigned redirect. Local objects keep Starlette's ``FileResponse``.

The body streams from the store in 1 MiB chunks read in a worker thread, so the API's memory
stays flat whatever the artifact's size. Several ranges in one request are answered with the
whole object (200), which RFC 9110 allows a server to do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

import anyio
from fastapi import Response
from fastapi.responses import StreamingResponse
from starlette.responses import FileResponse

from recalib.files.storage import Storage


def content_disposition(filename: str, disposition: str = "attachment") -> str:
    quoted = quote(filename)
    if quoted != filename:
        return f"{disposition}; filename*=utf-8''{quoted}"
    return f'{disposition}; filename="{filename}"'


def object_response(
    storage: Storage,
    key: str,
    size: int,
    *,
    media_type: str,
    filename: str,
    headers: dict[str, str],
    range_header: str | None,
    if_range: str | None,
    etag: str,
    head: bool,
) -> Response:
    """The object ``key`` (``size`` bytes) as a response; ``range_header`` already checked."""
    headers = {
        **headers,
        "Content-Disposition": content_disposition(filename),
        "Accept-Ranges": "bytes",
    }
    start, end = 0, size  # end exclusive
    status = 200
    if range_header is not None and (if_range is None or if_range.strip() == etag):
        ranges = FileResponse._parse_range_header(range_header, size)
        if len(ranges) == 1:
            start, end = ranges[0]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    if head or end == start:
        return Response(status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(
        _stream(storage, key, start, end - 1),
        status_code=status,
        headers=headers,
        media_type=media_type,
    )


async def _stream(storage: Storage, key: str, start: int, last: int) -> AsyncIterator[bytes]:
    chunks: Iterator[bytes] = iter(storage.read_range(key, start, last))
    try:
        while True:
            chunk = await anyio.to_thread.run_sync(next, chunks, None)
            if chunk is None:
                return
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await anyio.to_thread.run_sync(close)
