"""Walking zip and tar archives safely: member by member, in memory, never extracted by name.

Safety policy (the limits come from :class:`~worker.formats.samples.DataLimits`):

- member count: a zip's central-directory headers are counted before ``zipfile`` parses them
  (never the count its end record claims, which may lie), stopping once over the limit; a tar
  is walked lazily. Over ``max_archive_members`` → rejected.
- size: the declared uncompressed sizes of all file members together must stay within
  ``max_archive_bytes``; a zip member over 1 MiB may not expand more than ``MAX_RATIO``×, a
  compressed tar not more than ``MAX_RATIO``× its file size (beyond 64 MiB); a member that yields
  more bytes than it declared is rejected. Reads are bounded by the declared size.
- names: absolute names (``/x``, ``C:\\x``), ``..`` components and NUL bytes reject the whole
  archive (no legitimate data set has them); nothing is written under a member's name anyway.
- links, devices, FIFOs and encrypted members are skipped (and counted), never followed.

A compressed tar's accepted members are spooled into one anonymous temporary file (in
``work_dir``) so later reads are random-access; plain tars and zips are read in place.
"""

from __future__ import annotations

import os
import stat
import struct
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from recalib.errors import ArchiveRejectedError, InvalidDataError
from worker.formats.samples import DataLimits

MAX_RATIO = 200
RATIO_FREE_BYTES = 1024**2
_TAR_RATIO_FREE_BYTES = 64 * 1024**2
Locator = tuple[str, int, int]  # (zip member name or "", offset, size)


@dataclass
class Member:
    """One archive entry: its raw name, its safe path parts, kind and declared size."""

    name: str
    parts: tuple[str, ...]
    kind: Literal["file", "dir", "link", "special", "encrypted"]
    size: int
    info: zipfile.ZipInfo | tarfile.TarInfo | None = field(default=None, repr=False)


def safe_parts(name: str, path: Path) -> tuple[str, ...]:
    """The path components of a member name; rejects absolute and ``..`` names."""
    normalized = name.replace("\\", "/")
    absolute = normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":")
    parts = tuple(p for p in normalized.split("/") if p not in ("", "."))
    if absolute or ".." in parts or "\0" in name:
        raise ArchiveRejectedError(
            f"{path.name}: member {name!r} has an absolute or parent-relative path; refusing "
            "the archive (path traversal)",
            file=str(path),
        )
    return parts


class ArchiveReader:
    """Iterate an archive's members (:meth:`members`), read one (:meth:`read`), keep it for later
    random access (:meth:`keep` → a locator for :meth:`fetch`, usable in any process)."""

    def __init__(self, path: Path, kind: str, limits: DataLimits, work_dir: Path | None) -> None:
        self.path, self.limits = path, limits
        self._declared = 0
        self._pid = os.getpid()
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._spool: IO[bytes] | None = None
        if kind == "zip":
            self._check_count(_zip_entry_count(path, limits.max_archive_members))
            self._zip = self._open_zip()
            self._check_count(len(self._zip.infolist()))  # whatever zipfile itself found
        else:
            self._tar = _open_tar(path)
            if _is_compressed(path):
                self._spool = tempfile.TemporaryFile(dir=work_dir)  # noqa: SIM115 (lives with self)

    def members(self) -> Iterator[Member]:
        """Every entry, in archive order, after the count/size/name checks."""
        if self._zip is not None:
            yield from (self._zip_member(info) for info in self._zip.infolist())
            return
        for count, tar_info in enumerate(self._tar or (), start=1):
            self._check_count(count)
            yield self._tar_member(tar_info)

    def read(self, member: Member) -> bytes:
        """The member's bytes, at most its declared size (more → rejected)."""
        info = member.info
        try:
            if isinstance(info, zipfile.ZipInfo) and self._zip is not None:
                with self._zip.open(info) as handle:
                    data = handle.read(member.size + 1)
            elif isinstance(info, tarfile.TarInfo) and self._tar is not None:
                extracted = self._tar.extractfile(info)
                data = extracted.read(member.size + 1) if extracted else b""
            else:
                data = b""
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, ValueError) as exc:
            raise UnreadableMemberError(str(exc)) from exc
        if len(data) > member.size:
            raise ArchiveRejectedError(
                f"{self.path.name}: member {member.name!r} holds more bytes than it declares",
                file=str(self.path),
            )
        return data

    def keep(self, member: Member, data: bytes) -> Locator:
        """A locator to fetch ``data`` again later (in this or a forked process)."""
        info = member.info
        if isinstance(info, zipfile.ZipInfo):
            return (info.filename, 0, len(data))
        if self._spool is None and isinstance(info, tarfile.TarInfo):
            return ("", info.offset_data, len(data))
        if self._spool is None:
            raise UnreadableMemberError("no tar member to keep")
        offset = self._spool.seek(0, os.SEEK_END)
        self._spool.write(data)
        self._spool.flush()
        return ("", offset, len(data))

    def fetch(self, locator: Locator) -> bytes:
        """The bytes behind a locator from :meth:`keep`."""
        name, offset, size = locator
        if name:
            with self._zip_here().open(name) as handle:
                return handle.read(size)
        # pread leaves the shared file position alone (safe in forked DataLoader workers).
        source = self._spool if self._spool is not None else getattr(self._tar, "fileobj", None)
        if source is None:
            raise UnreadableMemberError(f"{self.path.name} is closed")
        return os.pread(source.fileno(), size, offset)

    def close(self) -> None:
        for handle in (self._zip, self._tar, self._spool):
            if handle is not None:
                handle.close()

    def _zip_here(self) -> zipfile.ZipFile:
        # A ZipFile's file position must not be shared with forked DataLoader workers.
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = self._open_zip(), os.getpid()
        return self._zip

    def _open_zip(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise InvalidDataError(
                f"{self.path.name}: corrupt or truncated zip archive ({exc})", file=str(self.path)
            ) from exc

    def _check_count(self, count: int) -> None:
        if count > self.limits.max_archive_members:
            raise ArchiveRejectedError(
                f"{self.path.name}: more than {self.limits.max_archive_members} members "
                "(RECALIB_MAX_ARCHIVE_MEMBERS); split the data set or raise the limit",
                file=str(self.path),
            )

    def _add_declared(self, size: int) -> None:
        self._declared += size
        if self._declared > self.limits.max_archive_bytes:
            raise ArchiveRejectedError(
                f"{self.path.name}: members declare more than {self.limits.max_archive_bytes} "
                "uncompressed bytes (RECALIB_MAX_ARCHIVE_BYTES)",
                file=str(self.path),
            )
        limit = MAX_RATIO * self.path.stat().st_size
        if self._spool is not None and self._declared > max(limit, _TAR_RATIO_FREE_BYTES):
            raise self._bomb("the archive", self._declared)

    def _bomb(self, what: str, size: int) -> ArchiveRejectedError:
        return ArchiveRejectedError(
            f"{self.path.name}: {what} expands to {size} bytes, over {MAX_RATIO}× its compressed "
            "size (compression bomb?)",
            file=str(self.path),
        )

    def _zip_member(self, info: zipfile.ZipInfo) -> Member:
        parts = safe_parts(info.filename, self.path)
        if info.is_dir():
            return Member(info.filename, parts, "dir", 0)
        self._add_declared(info.file_size)
        if info.file_size > RATIO_FREE_BYTES and info.file_size > MAX_RATIO * info.compress_size:
            raise self._bomb(f"member {info.filename!r}", info.file_size)
        mode = info.external_attr >> 16
        kind: Literal["file", "link", "encrypted"] = "file"
        if stat.S_ISLNK(mode):
            kind = "link"
        elif info.flag_bits & 0x1:
            kind = "encrypted"
        return Member(info.filename, parts, kind, info.file_size, info)

    def _tar_member(self, info: tarfile.TarInfo) -> Member:
        parts = safe_parts(info.name, self.path)
        if info.isdir():
            return Member(info.name, parts, "dir", 0)
        if info.issym() or info.islnk():
            return Member(info.name, parts, "link", 0)
        if not info.isreg():
            return Member(info.name, parts, "special", 0)
        self._add_declared(info.size)
        return Member(info.name, parts, "file", info.size, info)  # read before the next one


class UnreadableMemberError(Exception):
    """A member's data could not be read (corrupt entry); the caller skips it."""


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InvalidDataError(
            f"{path.name}: corrupt or truncated tar archive ({exc})", file=str(path)
        ) from exc


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))


_CENTRAL_HEADER = struct.Struct("<4s24xHHH12x")  # signature, name/extra/comment lengths
_ZIP64_RECORD_BYTES, _ZIP64_LOCATOR_BYTES = 56, 20


def _zip_entry_count(path: Path, limit: int) -> int:
    """Entries in a zip's central directory, counted one header at a time; the count stops just
    past ``limit``. The end record's own entry count is never trusted: ``zipfile`` ignores it
    (it walks the directory's declared size), so a lying one would let any number through."""
    with open(path, "rb") as handle:
        start, size = _central_directory(handle, path)
        handle.seek(start)
        count, walked = 0, 0
        while walked < size and count <= limit:
            header = handle.read(_CENTRAL_HEADER.size)
            if len(header) < _CENTRAL_HEADER.size or header[:4] != b"PK\x01\x02":
                raise InvalidDataError(
                    f"{path.name}: corrupt or truncated zip archive (bad central directory)",
                    file=str(path),
                )
            _, name, extra, comment = _CENTRAL_HEADER.unpack(header)
            handle.seek(name + extra + comment, os.SEEK_CUR)
            walked += _CENTRAL_HEADER.size + name + extra + comment
            count += 1
        return count


def _central_directory(handle: IO[bytes], path: Path) -> tuple[int, int]:
    """(offset, size) of the central directory, located as ``zipfile`` locates it: ``size``
    bytes before the end record (before the zip64 records when they are present)."""
    size = handle.seek(0, os.SEEK_END)
    tail_start = max(0, size - (1 << 16) - 22)
    handle.seek(tail_start)
    tail = handle.read()
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or len(tail) < end + 22:
        raise InvalidDataError(
            f"{path.name}: corrupt or truncated zip archive (no end record)", file=str(path)
        )
    end_offset = tail_start + end
    (directory_size,) = struct.unpack("<I", tail[end + 12 : end + 16])
    locator = end_offset - _ZIP64_LOCATOR_BYTES
    record = locator - _ZIP64_RECORD_BYTES
    if record >= 0:
        handle.seek(record)
        zip64 = handle.read(_ZIP64_RECORD_BYTES + _ZIP64_LOCATOR_BYTES)
        if zip64[56:60] == b"PK\x06\x07" and zip64[:4] == b"PK\x06\x06":
            (directory_size,) = struct.unpack("<Q", zip64[40:48])
            end_offset = record
    return end_offset - directory_size, directory_size
