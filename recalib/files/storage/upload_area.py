"""Uploads in flight: a part file written, hashed and size-capped as it grows, in a locked area.

Uploads in flight lie in ``<data_dir>/tmp/<process token>/``, a directory whose ``.lock`` file this
process holds with ``flock``. At start-up every directory whose lock is free belongs to a process
that is gone (killed mid-upload), and is removed; the kernel drops the lock of a killed process, so
this is safe with several API processes sharing the data directory. A committed part is renamed
into the file store (:class:`recalib.files.store.FileStore`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

from recalib import layout
from recalib.files.storage.meter import Meter, MeteredFile

logger = logging.getLogger(__name__)

STALE_LOOSE_FILE_S = 3600.0
_LOCK_NAME = ".lock"


class PartFile(MeteredFile):
    """A file being uploaded: writes, hashes and counts bytes; over ``max_bytes`` it refuses."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        super().__init__(path, Meter(max_bytes))
        self.max_bytes = max_bytes

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
