"""The local backend: objects are files under the data directory (``RECALIB_DATA_DIR``).

Uploads are written in this process's locked upload area (:mod:`.upload_area`) and renamed into
place, small objects are written to a temporary name and renamed: a reader sees an object whole
or not at all. A failure of the disk (full, read-only, not ours) is a 503 naming
the directory (:func:`storage_error`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from recalib.errors import ServiceUnavailableError
from recalib.files.storage.base import ObjectInfo, ObjectMissingError, UploadPart
from recalib.files.storage.upload_area import PartFile, UploadArea

STORAGE_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
    | {errno.ENOTDIR, errno.EEXIST}
)
"""OS errors that mean "the data directory cannot be written" (full, read-only, not ours, or a
file where a directory belongs), not a bug of ours."""

READ_CHUNK_BYTES = 1024 * 1024


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


class LocalStorage:
    """Objects as files under ``root``."""

    is_local = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.uploads = UploadArea(self.root)

    def describe(self) -> str:
        return f"the data directory {self.root} (RECALIB_DATA_DIR)"

    def open(self) -> None:
        self.uploads.open()

    def close(self) -> None:
        self.uploads.close()

    @contextlib.contextmanager
    def guard(self, who: str = "API") -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            error = storage_error(exc, self.root, who)
            if error is None:
                raise
            raise error from exc

    def probe(self) -> None:
        probe = self.root / f".ready-{secrets.token_hex(4)}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            error = storage_error(exc, self.root, "API") or ServiceUnavailableError(
                f"the API cannot write {probe}: {exc}", file=str(probe)
            )
            raise error from exc

    # -- writing ---------------------------------------------------------------------------

    def new_upload(self, key: str, max_bytes: int) -> PartFile:
        return self.uploads.new_part(Path(key).name, max_bytes)

    def commit_upload(self, part: UploadPart, key: str) -> None:
        if not isinstance(part, PartFile):
            raise TypeError(f"not an upload of this store: {part!r}")
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part.path, target)
        except BaseException:
            part.discard()
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):  # best effort: the directory may be the fault
                tmp.unlink(missing_ok=True)
            raise

    def upload_file(self, path: Path, key: str) -> None:
        target = self.path(key)
        if Path(path).resolve() == target.resolve():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self.path(prefix.rstrip("/"))
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def clean_stale_uploads(self, older_than_s: float) -> int:
        del older_than_s  # the upload area's locks tell (at start: UploadArea.open)
        return 0

    # -- reading ---------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        if key.startswith("/") or ".." in Path(key).parts:
            raise ValueError(f"not a relative key: {key!r}")
        return self.root / key

    def local_path(self, key: str) -> Path:
        return self.path(key)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def info(self, key: str) -> ObjectInfo | None:
        try:
            stat = self.path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(key, stat.st_size, stat.st_mtime)

    def download(self, key: str, target: Path) -> None:
        source = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)  # same filesystem: no copy
        except FileNotFoundError as exc:
            if not source.exists():
                raise ObjectMissingError(f"{key} is not in {self.describe()}", file=key) from exc
            raise
        except OSError:
            try:
                shutil.copyfile(source, target)
            except FileNotFoundError as exc:
                raise ObjectMissingError(f"{key} is not in {self.describe()}", file=key) from exc

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self.path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return
        for path in base.rglob("*"):
            try:
                stat = path.stat()
            except OSError:
                continue
            if path.is_file():
                yield ObjectInfo(
                    path.relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime
                )

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        with self.path(key).open("rb") as fh:
            fh.seek(start)
            left = end - start + 1
            while left > 0 and (chunk := fh.read(min(READ_CHUNK_BYTES, left))):
                left -= len(chunk)
                yield chunk

    def presign_get(self, key: str, filename: str, expires_s: int) -> str | None:
        del key, filename, expires_s
        return None
