"""Bytes on their way into storage: counted, hashed (sha256) and capped, whatever the destination.

Uploads (a part file, an S3 multipart upload) and fetched URI inputs all pass their chunks through
a :class:`Meter` before writing them, so the size cap and the digest are computed once, one way;
:class:`MeteredFile` is such a destination on local disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import IO

from recalib.errors import PayloadTooLargeError, UserError


def upload_too_large(max_bytes: int) -> PayloadTooLargeError:
    """The error for an upload past ``RECALIB_MAX_UPLOAD_BYTES``."""
    return PayloadTooLargeError(
        f"upload is larger than the limit of {max_bytes} bytes (RECALIB_MAX_UPLOAD_BYTES)",
        field="body",
    )


class Meter:
    """Counts and hashes chunks; a chunk that would pass ``max_bytes`` raises ``too_large()``."""

    def __init__(self, max_bytes: int, too_large: Callable[[], UserError] | None = None) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._too_large = too_large or (lambda: upload_too_large(max_bytes))
        self._hash = hashlib.sha256()

    def add(self, chunk: bytes) -> None:
        """Count and hash ``chunk`` (call before writing it anywhere)."""
        if self.bytes + len(chunk) > self.max_bytes:
            raise self._too_large()
        self._hash.update(chunk)
        self.bytes += len(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class Metered:
    """A destination written through :attr:`meter`: its ``bytes`` and ``sha256`` so far."""

    meter: Meter

    @property
    def bytes(self) -> int:
        return self.meter.bytes

    @property
    def sha256(self) -> str:
        return self.meter.sha256


class MeteredFile(Metered):
    """A local file whose every chunk passes ``meter`` first (refused past its cap)."""

    def __init__(self, path: Path, meter: Meter, mode: str = "xb") -> None:
        self.path, self.meter = path, meter
        self._fh: IO[bytes] | None = path.open(mode)

    def write(self, chunk: bytes) -> None:
        if self._fh is None:
            raise ValueError("write to a closed upload")
        self.meter.add(chunk)
        self._fh.write(chunk)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
