"""The reaper: jobs whose worker died are run again or failed; cancels are enforced; retention.

It runs in the API process (a thread started by the app's lifespan), every
``RECALIB_REAPER_INTERVAL_S`` seconds, under a Redis lock so several API replicas take turns.
Every change it makes is conditional (:func:`service.job_records.update_record`), so running it
twice, or beside a worker that is finishing the same job, changes nothing twice.

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
(metadata first, then content), except files that a job still queued or running uses.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from typing import cast

import redis
from redis.exceptions import LockError
from rq.job import JobStatus as RqStatus

from recalib import layout
from recalib.contract import FileRecord, JobError, JobEvent, JobRecord, JobStatus, Progress
from recalib.settings import Settings
from service import job_records, queue
from service.job_records import Stored, update_record, utcnow
from service.workers import read_worker

logger = logging.getLogger(__name__)

CANCEL_GRACE_S = 3.0
QUEUED_GRACE_S = 10.0
RETENTION_EVERY_S = 60.0
LOCK_KEY = "recalib:reaper:lock"
WORKER_DIED = "worker-died"
JOB_TIMEOUT = "job-timeout"


def timeout_error(settings: Settings) -> JobError:
    return JobError(
        type=JOB_TIMEOUT,
        message=(
            f"the job ran longer than RECALIB_JOB_TIMEOUT_S ({settings.job_timeout_s} s) and was "
            "stopped; raise the limit or use fewer samples (options.max_samples)"
        ),
    )


def recover_run(
    conn: redis.Redis,
    settings: Settings,
    job_id: str,
    *,
    reason: str,
    rq_job_id: str | None = None,
) -> JobRecord | None:
    """A run ended without finishing its job's record: decide what becomes of the job.

    ``cancelling`` → ``cancelled``; past ``job_timeout_s`` → failed (timeout); runs left →
    ``queued`` again and re-enqueued; else → failed with ``reason (attempt n of m)``. Only a job
    still ``running``/``cancelling`` (and, given ``rq_job_id``, still on that run) is touched.
    Returns the new record, or None when there was nothing to do.
    """
    new_rq_job_id = queue.new_rq_job_id(job_id)
    now = utcnow()

    def mutate(stored: Stored) -> JobRecord | None:
        record = stored.record
        if record.status not in (JobStatus.running, JobStatus.cancelling):
            return None
        if rq_job_id is not None and stored.rq_job_id != rq_job_id:
            return None
        ran_s = (now - record.started_at).total_seconds() if record.started_at else 0.0
        if record.status == JobStatus.cancelling:
            record.status = JobStatus.cancelled
        elif ran_s >= settings.job_timeout_s:
            record.status, record.error = JobStatus.failed, timeout_error(settings)
        elif record.attempts < settings.job_max_attempts:
            record.status, record.progress = JobStatus.queued, Progress()
            record.started_at = record.worker = None
            return record
        else:
            record.status = JobStatus.failed
            record.error = JobError(
                type=WORKER_DIED,
                message=f"{reason} (attempt {record.attempts} of {settings.job_max_attempts})",
            )
        record.finished_at = now
        return record

    def message(record: JobRecord) -> str:
        if record.status == JobStatus.queued:
            return (
                f"{reason} (attempt {record.attempts} of {settings.job_max_attempts}); "
                "queued to run again"
            )
        if record.status == JobStatus.cancelled:
            return "cancelled: the run was stopped"
        return record.error.message if record.error else reason

    def fields(record: JobRecord) -> dict[str, str]:
        return {"rq": new_rq_job_id} if record.status == JobStatus.queued else {}

    new = update_record(conn, job_id, mutate, message=message, set_fields=fields)
    if new is not None and new.status == JobStatus.queued:
        queue.enqueue_run(conn, settings, job_id, new_rq_job_id)
    if new is not None:
        logger.warning("job %s: %s → %s", job_id, reason, new.status.value)
    return new


def requeue_lost(conn: redis.Redis, settings: Settings, stored: Stored, reason: str) -> bool:
    """Enqueue a new run of a queued job whose run was lost; False if the job moved on."""
    new_rq_job_id = queue.new_rq_job_id(stored.record.id)

    def mutate(current: Stored) -> JobRecord | None:
        same = current.record.status == JobStatus.queued
        return current.record if same and current.rq_job_id == stored.rq_job_id else None

    new = update_record(
        conn,
        stored.record.id,
        mutate,
        message=f"{reason}; queued again",
        set_fields={"rq": new_rq_job_id},
    )
    if new is None:
        return False
    queue.enqueue_run(conn, settings, stored.record.id, new_rq_job_id)
    logger.warning("job %s: %s; queued again", stored.record.id, reason)
    return True


class Reaper:
    """Watches the jobs not yet final; see the module docstring for what it does and when."""

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self._last_retention = float("-inf")

    def run_once(self) -> list[str]:
        """One pass; returns the ids of the jobs it re-queued or ended. Safe beside replicas."""
        lock = self.conn.lock(
            LOCK_KEY, timeout=max(30.0, 3 * self.settings.reaper_interval_s), blocking=False
        )
        if not lock.acquire():
            return []
        try:
            return [job_id for job_id in self._active_ids() if self._check(job_id)]
        finally:
            try:
                lock.release()
            except LockError:
                logger.warning("reaper lock expired during a pass")

    def run_forever(self, stop: threading.Event) -> None:
        """Pass every ``reaper_interval_s`` (and apply retention) until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.run_once()
                if time.monotonic() - self._last_retention >= RETENTION_EVERY_S:
                    self._last_retention = time.monotonic()
                    self.apply_retention()
            except redis.RedisError as exc:
                logger.warning("reaper pass skipped: Redis error %s", exc)
            stop.wait(self.settings.reaper_interval_s)

    # -- dead workers, lost runs, cancels ---------------------------------------------------

    def _active_ids(self) -> list[str]:
        return sorted(job_records.text(m) for m in self.conn.smembers(job_records.ACTIVE_KEY))  # type: ignore[union-attr]

    def _check(self, job_id: str) -> bool:
        stored = job_records.load(self.conn, job_id)
        if stored is None or stored.record.status.is_final:
            self.conn.srem(job_records.ACTIVE_KEY, job_id)
            return False
        if stored.record.status == JobStatus.queued:
            return self._check_queued(stored)
        return self._check_running(stored)

    def _check_running(self, stored: Stored) -> bool:
        record = stored.record
        worker = read_worker(self.conn, record.worker) if record.worker else None
        if worker is None or worker.current_job != record.id:
            reason = f"worker {record.worker} died while running the job"
            return recover_run(self.conn, self.settings, record.id, reason=reason) is not None
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
        last = self.conn.lindex(job_records.events_key(stored.record.id), -1)
        queued_at = JobEvent.model_validate_json(last).at if last else None  # type: ignore[arg-type]
        if queued_at is None or (utcnow() - queued_at).total_seconds() < QUEUED_GRACE_S:
            return False
        if stored.rq_job_id is None:
            return requeue_lost(self.conn, self.settings, stored, "the job had no run queued")
        state, worker_name = queue.rq_job_state(self.conn, stored.rq_job_id)
        if state in (RqStatus.QUEUED, RqStatus.DEFERRED, RqStatus.SCHEDULED):
            return False
        if state == RqStatus.STARTED and worker_name:
            worker = read_worker(self.conn, worker_name)
            if worker is not None and worker.current_job == stored.record.id:
                return False  # taken; the work horse is starting
        reason = "the queued run was lost" if state is None else f"the queued run ended {state}"
        return requeue_lost(self.conn, self.settings, stored, reason)

    # -- retention -------------------------------------------------------------------------

    def apply_retention(self) -> tuple[int, int]:
        """Delete finished jobs and files older than ``retention_s``; return how many of each."""
        if self.settings.retention_s == 0:
            return 0, 0
        cutoff = time.time() - self.settings.retention_s
        jobs = 0
        old_ids = cast(
            list[bytes], self.conn.zrangebyscore(job_records.FINISHED_KEY, "-inf", cutoff)
        )
        for raw_id in old_ids:
            job_id = job_records.text(raw_id)
            stored = job_records.load(self.conn, job_id)
            if stored is not None and not stored.record.status.is_final:
                self.conn.zrem(job_records.FINISHED_KEY, job_id)
                continue
            if stored is not None:
                job_records.delete_job(self.conn, stored.record)
            else:
                self.conn.zrem(job_records.FINISHED_KEY, job_id)
            shutil.rmtree(layout.job_dir(self.settings.data_dir, job_id), ignore_errors=True)
            jobs += 1
        return jobs, self._delete_old_files(cutoff)

    def _delete_old_files(self, cutoff: float) -> int:
        in_use: set[str] = set()
        for job_id in self._active_ids():
            stored = job_records.load(self.conn, job_id)
            if stored is not None:
                request = stored.record.request
                in_use.update({request.model_file, request.calibration_file})
                in_use.add(request.eval_file or "")
        deleted = 0
        for meta in layout.files_dir(self.settings.data_dir).glob("f_*.json"):
            try:
                record = FileRecord.model_validate_json(meta.read_bytes())
            except (OSError, ValueError):
                continue
            if record.id in in_use or record.created_at.timestamp() >= cutoff:
                continue
            meta.unlink(missing_ok=True)  # metadata first: the file stops being usable
            layout.file_path(self.settings.data_dir, record.id).unlink(missing_ok=True)
            deleted += 1
        return deleted
