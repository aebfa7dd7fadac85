"""The reaper: jobs whose worker died are run again or failed; cancels are enforced; retention.

A pass runs in the API process (the loop is :mod:`service.background`), every
``RECALIB_REAPER_INTERVAL_S`` seconds, under a Redis lock so several API replicas take turns.
Every change it makes is a transition of :mod:`recalib.jobs.states` (conditional), so running it
twice, or beside a worker that is finishing the same job, changes nothing twice. A job whose
check fails (an unreadable record, say) is logged and skipped; the pass goes on with the next.

Bounds, with ``H = RECALIB_WORKER_HEARTBEAT_S`` (10) and ``R = RECALIB_REAPER_INTERVAL_S`` (5):

- **A worker dies mid-job** (SIGKILL, OOM, the machine goes away): its heartbeat hash expires
  at most ``3·H`` after its last beat, and the next reaper pass after that re-queues the job (if
  it has runs left, ``RECALIB_JOB_MAX_ATTEMPTS``) or fails it with "worker died while running the
  job (attempt n of n)". The job leaves ``running`` within ``3·H + R`` of the death: **35 s** with
  the defaults (plus one Redis round trip per active job).
- **Only the work horse dies** (OOM killer, a crash in native code) while its worker lives: the
  worker itself re-queues or fails the job as soon as the horse exits (under a second).
- **A running job is cancelled** but does not reach a batch boundary: ``CANCEL_GRACE_S`` after the
  cancel, the next pass sends RQ's stop-job command; the worker kills the horse and records
  ``cancelled``: within ``CANCEL_GRACE_S + R`` (8 s with the defaults).
- **A queued run is lost** (Redis lost it, or the worker died between taking and starting it):
  re-enqueued ``QUEUED_GRACE_S`` after it was queued, at the next pass.

Retention (``RECALIB_RETENTION_S``; 0 turns it off), at most every ``RETENTION_EVERY_S``:
finished jobs older than that are deleted (record, events, artifacts) and so are uploaded files
(through the file store and its storage backend, so the sha256 lookup stays consistent), except
files that a job still queued or running uses. Each time, whatever the retention, uploads nobody
finished are cleaned: direct uploads past their URLs' expiry are aborted, as are multipart
uploads and content without metadata that a killed API left (after ``STALE_UPLOAD_S``).
"""

from __future__ import annotations

import logging
import time
from typing import cast

import redis
from redis.exceptions import LockError
from rq.job import JobStatus as RqStatus

from recalib.contract import JobEvent, JobStatus
from recalib.errors import RecalibError
from recalib.files.artifacts import ArtifactStore
from recalib.files.direct_uploads import GRACE_S, DirectUploads
from recalib.files.storage import open_storage, scratch_root
from recalib.files.store import FileStore
from recalib.jobs import queue, records
from recalib.jobs.records import Stored, utcnow
from recalib.jobs.states import RunEnd, end_run
from recalib.jobs.workers import read_worker
from recalib.keys import ACTIVE_KEY, FINISHED_KEY, REAPER_LOCK_KEY, as_text, events_key
from recalib.settings import Settings

logger = logging.getLogger(__name__)

CANCEL_GRACE_S = 3.0
QUEUED_GRACE_S = 10.0
RETENTION_EVERY_S = 60.0
STALE_UPLOAD_S = 24 * 3600.0
"""An upload still unfinished after this (and past its URLs' expiry) is abandoned."""


class Reaper:
    """Watches the jobs not yet final; see the module docstring for what it does and when."""

    def __init__(
        self,
        conn: redis.Redis,
        settings: Settings,
        files: FileStore | None = None,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.conn = conn
        self.settings = settings
        if files is None or artifacts is None:
            storage = open_storage(settings)
            files = files or FileStore(storage, conn, settings.max_upload_bytes)
            artifacts = artifacts or ArtifactStore(storage, scratch_root(settings))
        self.files, self.artifacts = files, artifacts
        self._last_retention = float("-inf")

    def run_once(self) -> list[str]:
        """One pass; returns the ids of the jobs it re-queued or ended. Safe beside replicas."""
        lock = self.conn.lock(
            REAPER_LOCK_KEY, timeout=max(30.0, 3 * self.settings.reaper_interval_s), blocking=False
        )
        if not lock.acquire():
            return []
        try:
            return [job_id for job_id in self._active_ids() if self._check_logged(job_id)]
        finally:
            try:
                lock.release()
            except LockError:
                logger.warning("reaper lock expired during a pass")

    def due_for_retention(self) -> bool:
        """True at most every ``RETENTION_EVERY_S`` (and at the first call)."""
        if time.monotonic() - self._last_retention < RETENTION_EVERY_S:
            return False
        self._last_retention = time.monotonic()
        return True

    # -- dead workers, lost runs, cancels ---------------------------------------------------

    def _active_ids(self) -> list[str]:
        return sorted(as_text(m) for m in self.conn.smembers(ACTIVE_KEY))  # type: ignore[union-attr]

    def _check_logged(self, job_id: str) -> bool:
        try:
            return self._check(job_id)
        except redis.RedisError:
            raise
        except Exception:  # one bad job must not stop the pass (or every later pass)
            logger.exception("job %s: reaper check failed; skipped", job_id)
            return False

    def _check(self, job_id: str) -> bool:
        stored = records.load(self.conn, job_id)  # None also when unreadable (logged there)
        if stored is None or stored.record.status.is_final:
            self.conn.srem(ACTIVE_KEY, job_id)
            return False
        if stored.record.status == JobStatus.queued:
            return self._check_queued(stored)
        return self._check_running(stored)

    def _check_running(self, stored: Stored) -> bool:
        record = stored.record
        worker = read_worker(self.conn, record.worker) if record.worker else None
        if worker is None or worker.current_job != record.id:
            reason = f"worker {record.worker} died while running the job"
            seen = RunEnd(record.id, "lost", reason)
            return end_run(self.conn, self.settings, seen) is not None
        waited_s = time.time() - stored.cancel_at if stored.cancel_at else 0.0
        if (
            record.status == JobStatus.cancelling
            and waited_s >= CANCEL_GRACE_S
            and stored.rq_job_id
        ):
            logger.info(
                "job %s: still running %.1f s after cancel; stopping it", record.id, waited_s
            )
            queue.stop_rq_job(self.conn, stored.rq_job_id)
        return False

    def _check_queued(self, stored: Stored) -> bool:
        last = self.conn.lindex(events_key(stored.record.id), -1)
        queued_at = JobEvent.model_validate_json(last).at if last else None  # type: ignore[arg-type]
        if queued_at is None or (utcnow() - queued_at).total_seconds() < QUEUED_GRACE_S:
            return False
        if stored.rq_job_id is None:
            seen = RunEnd(stored.record.id, "handed-back", "the job had no run queued")
            return end_run(self.conn, self.settings, seen) is not None
        state, worker_name = queue.rq_job_state(self.conn, stored.rq_job_id)
        if state in (RqStatus.QUEUED, RqStatus.DEFERRED, RqStatus.SCHEDULED):
            return False
        if state == RqStatus.STARTED and worker_name:
            worker = read_worker(self.conn, worker_name)
            if worker is not None and worker.current_job == stored.record.id:
                return False  # taken; the work horse is starting
        reason = "the queued run was lost" if state is None else f"the queued run ended {state}"
        seen = RunEnd(stored.record.id, "handed-back", reason, rq_job_id=stored.rq_job_id)
        return end_run(self.conn, self.settings, seen) is not None

    # -- retention -------------------------------------------------------------------------

    def apply_retention(self) -> tuple[int, int]:
        """Delete finished jobs and files older than ``retention_s``; return how many of each.

        Uploads nobody finished are cleaned first, whatever ``retention_s``
        (:meth:`clean_unfinished_uploads`).
        """
        self.clean_unfinished_uploads()
        if self.settings.retention_s == 0:
            return 0, 0
        cutoff = time.time() - self.settings.retention_s
        jobs = 0
        old_ids = cast(list[bytes], self.conn.zrangebyscore(FINISHED_KEY, "-inf", cutoff))
        for raw_id in old_ids:
            job_id = as_text(raw_id)
            stored = records.load(self.conn, job_id)
            if stored is not None and not stored.record.status.is_final:
                self.conn.zrem(FINISHED_KEY, job_id)
                continue
            if stored is not None:
                records.delete_job(self.conn, stored.record)
            else:
                self.conn.zrem(FINISHED_KEY, job_id)
            self.artifacts.remove_job(job_id)
            jobs += 1
        return jobs, self._delete_old_files(cutoff)

    def clean_unfinished_uploads(self) -> int:
        """Abort direct uploads whose URLs expired, multipart uploads left in the store by a
        killed API, and content without metadata (a process killed between the two); logged
        and skipped when the store fails. Returns how many things were removed."""
        stale_s = max(STALE_UPLOAD_S, self.settings.presigned_expiry_s + GRACE_S)
        try:
            expired = DirectUploads(self.files, self.conn, self.settings.presigned_expiry_s)
            removed = expired.clean_expired()
            with self.files.writing():
                removed += self.files.storage.clean_stale_uploads(stale_s)
            removed += self.files.remove_orphans(time.time() - stale_s)
        except RecalibError as exc:
            logger.warning("unfinished uploads not cleaned: %s", exc)
            return 0
        return removed

    def _delete_old_files(self, cutoff: float) -> int:
        in_use: set[str | None] = set()
        for job_id in self._active_ids():
            stored = records.load(self.conn, job_id)
            if stored is not None:
                request = stored.record.request
                in_use |= {request.model_file, request.calibration_file, request.eval_file,
                           request.source_eval_file}  # fmt: skip
        deleted = 0
        for record in self.files.records():
            if record.id in in_use or record.created_at.timestamp() >= cutoff:
                continue
            self.files.remove(record)
            deleted += 1
        return deleted
