"""The storage interface: objects by key, two backends (local, S3).

A key is a relative POSIX path (``files/<id>``, ``jobs/<id>/attempt-1/report.json``). Both
backends keep the same guarantees: an object becomes visible whole or not at all (local: atomic
rename; S3: a completed upload), uploads are written, hashed and size-capped as they stream and
leave nothing behind when discarded, and every failure of the store itself (full or read-only
disk, an object store that does not answer or refuses the credentials) is raised as
:class:`~recalib.errors.ServiceUnavailableError` naming the store and the setting to fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from recalib.errors import NotFoundError


class ObjectMissingError(NotFoundError):
    """An object that should exist is not in the store (deleted behind our back)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    bytes: int
    modified_s: float  # epoch seconds


class UploadPart(Protocol):
    """An upload in flight: ``write`` hashes, counts and caps; ``discard`` leaves nothing."""

    max_bytes: int
    bytes: int

    @property
    def sha256(self) -> str: ...

    def write(self, chunk: bytes) -> None: ...

    def close(self) -> None: ...

    def discard(self) -> None: ...


class Storage(Protocol):
    """Objects by key. ``describe`` names the store for messages (and the setting to fix)."""

    url: str
    is_local: bool

    def describe(self) -> str: ...

    def open(self) -> None:
        """Prepare for uploads (the local backend removes what killed processes left)."""

    def close(self) -> None: ...

    def guard(self, who: str = "API") -> contextlib.AbstractContextManager[None]:
        """Turn a failure of the store in the block into :class:`ServiceUnavailableError`."""
        ...

    def probe(self) -> None:
        """Write and delete a probe object; raise :class:`ServiceUnavailableError` if not."""

    def new_upload(self, key: str, max_bytes: int) -> UploadPart: ...

    def commit_upload(self, part: UploadPart, key: str) -> None:
        """Make a finished (closed) upload the object ``key``; on failure nothing stays."""

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str) -> bytes | None:
        """The object's content, None when it does not exist."""

    def info(self, key: str) -> ObjectInfo | None: ...

    def download(self, key: str, target: Path) -> None:
        """Write the object to ``target`` (:class:`ObjectMissingError` when it is gone)."""

    def upload_file(self, path: Path, key: str) -> None: ...

    def delete(self, key: str) -> None:
        """Delete ``key`` (absent is fine)."""

    def delete_prefix(self, prefix: str) -> None: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def local_path(self, key: str) -> Path | None:
        """Where the object lies on this machine's disk (local backend), else None."""

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``start..end`` (inclusive) of the object, in chunks."""

    def presign_get(self, key: str, filename: str, expires_s: int) -> str | None:
        """A URL a client can GET the object from directly; None when the store has none."""

    def clean_stale_uploads(self, older_than_s: float) -> int:
        """Abort uploads in flight that nobody finished; return how many."""
