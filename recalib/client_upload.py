"""Direct uploads for :class:`recalib.client.RecalibClient`: parts PUT straight to the object
store with the URLs the server presigns (``POST /v1/uploads``), then completed by the server,
which verifies size and sha256. Parts go up in parallel, each streamed from the file in 1 MiB
chunks (memory stays flat); the presigned URLs get no ``Authorization`` header (the API key never
reaches the store). A server that stores files locally (409) or predates direct uploads (404,
405) makes :func:`direct_upload` return None: upload through ``POST /v1/files`` then
(:func:`read_chunks`). :func:`sha256_of` is what both send the server to verify.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from recalib.contract import FilePublic
from recalib.contract.uploads import DirectUpload, DirectUploadPart
from recalib.errors import ServiceUnavailableError, UserError

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
PARALLEL_PARTS = 8
NOT_OFFERED = frozenset({404, 405, 409})


def direct_upload(
    http: httpx.Client,
    path: Path,
    sha256: str,
    raise_for_problem: Callable[[httpx.Response], None],
    timeout_s: float = 300.0,
) -> FilePublic | None:
    """Upload ``path`` directly to the server's object store; None when it does not offer it."""
    size = path.stat().st_size
    body = {"filename": path.name, "bytes": size, "sha256": sha256}
    started = http.post("/v1/uploads", json=body)
    if started.status_code in NOT_OFFERED:
        return None
    raise_for_problem(started)
    upload = DirectUpload.model_validate_json(started.content)
    try:
        with (
            httpx.Client(timeout=timeout_s) as store,
            ThreadPoolExecutor(max_workers=PARALLEL_PARTS) as pool,
        ):
            sends = [
                pool.submit(_put_part, store, path, part, upload.part_bytes, size)
                for part in upload.parts
            ]
            for sent in sends:
                sent.result()
        done = http.post(f"/v1/uploads/{upload.id}/complete")
        raise_for_problem(done)
    except BaseException:
        with contextlib.suppress(httpx.HTTPError):
            http.delete(f"/v1/uploads/{upload.id}")
        raise
    return FilePublic.model_validate_json(done.content)


def _put_part(
    store: httpx.Client, path: Path, part: DirectUploadPart, part_bytes: int, size: int
) -> None:
    start = (part.part_number - 1) * part_bytes
    length = min(part_bytes, size - start)
    try:
        response = store.put(
            part.url,
            content=_slice(path, start, length),
            headers={"Content-Length": str(length)},
        )
    except httpx.TransportError as exc:
        raise ServiceUnavailableError(
            f"the object store does not answer for part {part.part_number} of {path.name} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if response.status_code != 200:
        raise UserError(
            f"the object store refused part {part.part_number} of {path.name}: HTTP "
            f"{response.status_code} {response.text[:200]}",
            file=str(path),
        )


def _slice(path: Path, start: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as fh:
        fh.seek(start)
        while length > 0 and (chunk := fh.read(min(CHUNK_BYTES, length))):
            length -= len(chunk)
            yield chunk


def read_chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes in 1 MiB chunks (what ``POST /v1/files`` streams)."""
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            yield chunk
