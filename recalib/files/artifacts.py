"""Job artifacts: each run of a job writes into a directory of its own, published to the store.

A run writes into a local directory (:meth:`ArtifactStore.prepare_attempt`). With the local
store that directory *is* its place in the data directory, ``<data_dir>/jobs/<job id>/
attempt-<n>/``; with object storage it is scratch on the worker's disk
(``<data_dir>/scratch/<job id>-attempt-<n>/``, locked while the run lives, removed when it ends
and, if the run was killed, by the next run on that machine), and
:meth:`ArtifactStore.publish_from` uploads what it wrote to ``jobs/<job id>/attempt-<n>/`` before
the run ends its record. Nothing is renamed: when a run succeeds,
:func:`recalib.jobs.states.finish_run` records its attempt in the job's record
(``output_attempt``) in the same conditional update that proves the run still owns the job, and
only that attempt is ever served. A superseded run's objects are removed by that run, or by
retention with its job.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from recalib import layout
from recalib.contract import JobRecord
from recalib.files.storage import LocalStorage, ObjectInfo, Storage
from recalib.files.storage.upload_area import clean_stale_uploads

T = TypeVar("T")

INPUTS_SUFFIX = ".inputs"
"""Beside an attempt directory: the run's inputs (links to the uploads), removed when it ends.
Never inside it: the sandboxed job may write its attempt directory, and must not write these."""
TMP_SUFFIX = ".tmp"
"""Beside an attempt directory: the sandboxed job's scratch (``TMPDIR``), removed when it ends."""
LOCK_NAME = ".lock"
SCRATCH_DIR = "scratch"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def attempt_prefix(job_id: str, attempt: int) -> str:
    return f"jobs/{job_id}/attempt-{attempt}/"


class ArtifactStore:
    """The job directories of one store; ``scratch_root`` is this machine's directory for runs
    when the store is not local (default ``<data_dir>/scratch``)."""

    def __init__(self, storage: Storage | Path, scratch_root: Path | None = None) -> None:
        self.storage: Storage = (
            LocalStorage(storage) if isinstance(storage, str | Path) else storage
        )
        self.scratch_root = scratch_root
        self._locks: dict[tuple[str, int], int] = {}

    @property
    def data_dir(self) -> Path | None:
        return self.storage.root if isinstance(self.storage, LocalStorage) else None

    def attempt_dir(self, job_id: str, attempt: int) -> Path:
        """Where run ``attempt`` of ``job_id`` writes on this machine."""
        if isinstance(self.storage, LocalStorage):
            return layout.attempt_dir(self.storage.root, job_id, attempt)
        if self.scratch_root is None:
            raise RuntimeError("an ArtifactStore over object storage needs a scratch_root")
        return self.scratch_root / f"{job_id}-attempt-{attempt}"

    def inputs_dir(self, job_id: str, attempt: int) -> Path:
        """Where run ``attempt`` finds its inputs (read-only to the sandboxed job)."""
        path = self.attempt_dir(job_id, attempt)
        return path.with_name(path.name + INPUTS_SUFFIX)

    def tmp_dir(self, job_id: str, attempt: int) -> Path:
        """The sandboxed job's scratch directory."""
        path = self.attempt_dir(job_id, attempt)
        return path.with_name(path.name + TMP_SUFFIX)

    def _drop_run_dirs(self, job_id: str, attempt: int) -> None:
        shutil.rmtree(self.inputs_dir(job_id, attempt), ignore_errors=True)
        shutil.rmtree(self.tmp_dir(job_id, attempt), ignore_errors=True)

    def output_prefix(self, record: JobRecord) -> str | None:
        """The key prefix of the artifacts of the run that succeeded; None when no run has."""
        if record.output_attempt is None:
            return None
        return attempt_prefix(record.id, record.output_attempt)

    def output_info(self, record: JobRecord, name: str) -> ObjectInfo | None:
        """The artifact ``name`` (``report.json``...) of the job, None when it is not stored."""
        return self._read_output(record, name, self.storage.info)

    def output_bytes(self, record: JobRecord, name: str) -> bytes | None:
        return self._read_output(record, name, self.storage.get_bytes)

    def _read_output(
        self, record: JobRecord, name: str, read: Callable[[str], T | None]
    ) -> T | None:
        """``read(key)`` of the artifact ``name`` of the run that succeeded; None before one has."""
        prefix = self.output_prefix(record)
        if prefix is None:
            return None
        with self.storage.guard():
            return read(prefix + name)

    def prepare_attempt(self, job_id: str, attempt: int) -> Path:
        """An empty directory for run ``attempt`` (what an earlier try of it left is removed)."""
        path = self.attempt_dir(job_id, attempt)
        shutil.rmtree(path, ignore_errors=True)
        self._drop_run_dirs(job_id, attempt)
        for run_dir in (self.inputs_dir(job_id, attempt), self.tmp_dir(job_id, attempt)):
            run_dir.mkdir(parents=True, mode=0o700)
        if not isinstance(self.storage, LocalStorage) and self.scratch_root is not None:
            self.scratch_root.mkdir(parents=True, exist_ok=True)
            clean_stale_uploads(self.scratch_root)  # runs on this machine that were killed
            path.mkdir(parents=True)
            fd = os.open(path / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._locks[(job_id, attempt)] = fd
            return path
        path.mkdir(parents=True)
        return path

    def publish_from(self, job_id: str, attempt: int, local_dir: Path) -> None:
        """Put what run ``attempt`` wrote in ``local_dir`` (its inputs left out) into the store;
        the local store has it in place already."""
        if isinstance(self.storage, LocalStorage):
            return
        prefix = attempt_prefix(job_id, attempt)
        with self.storage.guard("worker"):
            for path in sorted(local_dir.rglob("*")):
                relative = path.relative_to(local_dir)
                if path.is_symlink() or not path.is_file() or relative.parts[0] == LOCK_NAME:
                    continue  # written by the sandboxed job: regular files only
                self.storage.upload_file(path, prefix + relative.as_posix())

    def end_attempt(self, job_id: str, attempt: int, *, published: bool) -> None:
        """After a run: drop its inputs (and its scratch); drop everything it wrote unless it
        was published, and when it was, every other attempt's leftovers."""
        path = self.attempt_dir(job_id, attempt)
        self._drop_run_dirs(job_id, attempt)
        if isinstance(self.storage, LocalStorage):
            if not published:
                shutil.rmtree(path, ignore_errors=True)
                return
            for other in layout.job_dir(self.storage.root, job_id).glob("attempt-*"):
                if other != path:
                    shutil.rmtree(other, ignore_errors=True)
            return
        shutil.rmtree(path, ignore_errors=True)
        fd = self._locks.pop((job_id, attempt), None)
        if fd is not None:
            os.close(fd)
        own = attempt_prefix(job_id, attempt)
        with self.storage.guard("worker"):
            if not published:
                self.storage.delete_prefix(own)
                return
            others = {
                info.key.split("/", 3)[2]
                for info in self.storage.list(job_prefix(job_id))
                if not info.key.startswith(own)
            }
            for other in others:
                self.storage.delete_prefix(f"{job_prefix(job_id)}{other}/")

    def remove_job(self, job_id: str) -> None:
        """Everything of ``job_id`` (retention)."""
        if isinstance(self.storage, LocalStorage):
            shutil.rmtree(layout.job_dir(self.storage.root, job_id), ignore_errors=True)
            return
        with self.storage.guard():
            self.storage.delete_prefix(job_prefix(job_id))
