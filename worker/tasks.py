"""The queue task: one run of a job, from its record in Redis to a final status.

:func:`run_recalibration` runs inside RQ's work horse (a child forked for this job). It marks the
record ``running``, builds a :class:`JobSpec` from the uploaded files, calls
:func:`worker.pipeline.run_job`, streams progress to Redis, and ends the record itself:

- success → the attempt directory is renamed (atomically) to ``jobs/<id>/out/`` and the job
  ``succeeded`` with the report; only that directory is ever served;
- a :class:`UserError` → ``failed`` with its message (no retry: the input will not get better);
- :class:`JobCancelledError` → ``cancelled``; RQ's job timeout → ``failed`` naming
  ``RECALIB_JOB_TIMEOUT_S``; the data directory not writable → ``failed``
  (``service-unavailable``) naming the directory;
- anything else → ``failed`` as ``internal-error`` with a short message (traceback in the log).

A run whose horse dies is ended by its worker (:mod:`worker.process`) or the reaper.
The torch-heavy pipeline is imported when a run starts, never at import time, so the worker's
parent process can import this module (and fork) without touching CUDA.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from pathlib import Path

import redis
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from recalib import layout
from recalib.contract import (
    FileRecord,
    JobError,
    JobRecord,
    JobSpec,
    JobStatus,
    Phase,
    Progress,
    Report,
)
from recalib.errors import (
    JobCancelledError,
    NotFoundError,
    RecalibError,
    ServiceUnavailableError,
    UserError,
    error_type_name,
)
from recalib.settings import Settings, get_settings
from service.job_records import Stored, job_key, update_record, utcnow
from service.reaper import timeout_error

logger = logging.getLogger(__name__)

# OS errors that mean "the data directory cannot be written", not a bug of ours.
_STORAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
_STORAGE_ERRNOS |= {errno.ENOTDIR, errno.EEXIST}


def run_recalibration(job_id: str) -> None:
    """Run job ``job_id`` once (an RQ task; enqueued by dotted path by the API)."""
    settings = get_settings()
    rq_job = get_current_job()
    conn = redis.Redis.from_url(str(settings.redis_url))
    try:
        record = _start(conn, settings, job_id, rq_job.id if rq_job else None)
        if record is not None:
            _Run(conn, settings, record).execute()
    finally:
        conn.close()


def _start(
    conn: redis.Redis, settings: Settings, job_id: str, rq_job_id: str | None
) -> JobRecord | None:
    """Mark the job running on this worker; None if it is cancelled, gone or not this run's."""
    worker_name = os.environ.get("RQ_WORKER_ID", f"pid-{os.getpid()}")

    def mutate(stored: Stored) -> JobRecord | None:
        record = stored.record
        if record.status != JobStatus.queued or (rq_job_id and stored.rq_job_id != rq_job_id):
            return None
        record.status, record.attempts = JobStatus.running, record.attempts + 1
        record.started_at, record.worker = utcnow(), worker_name
        record.progress.phase = Phase.loading
        return record

    record = update_record(
        conn,
        job_id,
        mutate,
        message=lambda r: (
            f"running on {worker_name} (attempt {r.attempts} of {settings.job_max_attempts})"
        ),
    )
    if record is None:
        logger.info("job %s: not started (cancelled, deleted, or a stale run)", job_id)
    return record


class ProgressWriter:
    """``on_progress``/``should_stop`` of one run: progress into the record as it happens.

    The record is updated at most every ``WRITE_EVERY_S`` (phase changes always), an event is
    appended at most every ``EVENT_EVERY_S`` (phase changes always); the cancel flag is read at
    most every ``STOP_CHECK_EVERY_S``. A Redis hiccup costs a progress update, never the run.
    """

    WRITE_EVERY_S = 0.25
    EVENT_EVERY_S = 1.0
    STOP_CHECK_EVERY_S = 0.5

    def __init__(self, conn: redis.Redis, job_id: str, attempt: int) -> None:
        self.conn, self.job_id, self.attempt = conn, job_id, attempt
        self._phase: Phase | None = Phase.loading  # set by _start
        self._written_at = self._evented_at = self._checked_at = float("-inf")
        self._stop = False

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        phase_changed = progress.phase != self._phase
        if not phase_changed and now - self._written_at < self.WRITE_EVERY_S:
            return
        event = phase_changed or now - self._evented_at >= self.EVENT_EVERY_S

        def mutate(stored: Stored) -> JobRecord | None:
            record = stored.record
            if record.status not in (JobStatus.running, JobStatus.cancelling):
                return None
            if record.attempts != self.attempt:
                return None
            record.progress = progress
            return record

        try:
            update_record(self.conn, self.job_id, mutate, event=event)
        except redis.RedisError as exc:
            logger.warning("job %s: progress not recorded: %s", self.job_id, exc)
            return
        self._phase, self._written_at = progress.phase, now
        if event:
            self._evented_at = now

    def should_stop(self) -> bool:
        """True once the job is being cancelled."""
        now = time.monotonic()
        if now - self._checked_at >= self.STOP_CHECK_EVERY_S:
            self._checked_at = now
            try:
                self._stop = bool(self.conn.hexists(job_key(self.job_id), "cancel_at"))
            except redis.RedisError as exc:
                logger.warning("job %s: cancel flag not read: %s", self.job_id, exc)
        return self._stop


class _Run:
    """One attempt of one job."""

    def __init__(self, conn: redis.Redis, settings: Settings, record: JobRecord) -> None:
        self.conn, self.settings, self.record = conn, settings, record
        self.attempt = record.attempts
        self.data_dir = Path(settings.data_dir)
        self.attempt_dir = layout.attempt_dir(self.data_dir, record.id, self.attempt)
        self.progress = ProgressWriter(conn, record.id, self.attempt)

    def execute(self) -> None:
        try:
            spec = self._spec()
            from worker.pipeline import run_job  # torch: only in the work horse

            report = run_job(spec, on_progress=self.progress, should_stop=self.progress.should_stop)
            self._publish()
            self._finish(JobStatus.succeeded, result=report)
        except Exception as exc:
            self._end_with(exc)

    def _end_with(self, exc: Exception) -> None:
        """Failed, or cancelled, by ``exc`` (whose chain may hold the real reason: the pipeline
        wraps whatever user code raises, RQ's timeout alarm included, in a UserError)."""
        chain = _chain(exc)
        if any(isinstance(e, JobTimeoutException) for e in chain):
            self._finish(JobStatus.failed, error=timeout_error(self.settings))
        elif any(isinstance(e, JobCancelledError) for e in chain):
            self._finish(JobStatus.cancelled)
        elif isinstance(exc, UserError | ServiceUnavailableError):
            self._finish(
                JobStatus.failed, error=JobError(type=error_type_name(exc), message=str(exc))
            )
        elif isinstance(exc, OSError):
            self._fail_os(exc)
        else:
            logger.exception("job %s: internal error", self.record.id)
            self._fail_internal(exc)

    def _fail_os(self, exc: OSError) -> None:
        if exc.errno not in _STORAGE_ERRNOS:
            logger.exception("job %s: internal error", self.record.id)
            self._fail_internal(exc)
            return
        where = exc.filename or self.data_dir
        error = ServiceUnavailableError(
            f"the worker cannot write {where}: {exc.strerror}; make the data directory "
            f"(RECALIB_DATA_DIR={self.data_dir}) writable for the worker"
        )
        self._finish(JobStatus.failed, error=JobError(type=error.type_slug, message=str(error)))

    def _fail_internal(self, exc: BaseException) -> None:
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        message = f"internal error in the worker ({type(exc).__name__}{': ' if detail else ''}"
        message += f"{detail}); the worker log has the details"
        if isinstance(exc, RecalibError):
            message = exc.message
        self._finish(JobStatus.failed, error=JobError(type="internal-error", message=message))

    # -- inputs and outputs ----------------------------------------------------------------

    def _spec(self) -> JobSpec:
        """The pipeline's input: each upload linked into the attempt dir under its own name."""
        shutil.rmtree(self.attempt_dir, ignore_errors=True)  # a previous try of this attempt
        self.attempt_dir.mkdir(parents=True)
        request = self.record.request
        options = request.options
        device = self.settings.worker_device
        if options.device == "auto" and device not in ("", "auto"):
            options = options.model_copy(update={"device": device})
        s = self.settings
        return JobSpec(
            model_path=self._input(request.model_file, "model"),
            calibration_path=self._input(request.calibration_file, "calibration"),
            eval_path=self._input(request.eval_file, "eval") if request.eval_file else None,
            arch=request.arch,
            arch_kwargs=request.arch_kwargs,
            options=options,
            out_dir=str(self.attempt_dir),
            allow_unsafe_pickle=s.allow_unsafe_pickle,
            arch_allowlist=s.arch_allowlist,
            max_archive_members=s.max_archive_members,
            max_archive_bytes=s.max_archive_bytes,
            max_image_pixels=s.max_image_pixels,
        )

    def _input(self, file_id: str, role: str) -> str:
        meta = layout.file_meta_path(self.data_dir, file_id)
        content = layout.file_path(self.data_dir, file_id)
        try:
            upload = FileRecord.model_validate_json(meta.read_bytes())
        except FileNotFoundError:
            raise NotFoundError(
                f"the {role} file {file_id} no longer exists (uploads are deleted after "
                "RECALIB_RETENTION_S); upload it again and submit a new job",
                file=file_id,
            ) from None
        target = self.attempt_dir / "inputs" / role / Path(upload.filename).name
        target.parent.mkdir(parents=True)
        try:
            os.link(content, target)  # same filesystem: no copy
        except OSError:
            shutil.copyfile(content, target)
        return str(target)

    def _publish(self) -> None:
        """Make the attempt's artifacts the job's output: drop the inputs, rename atomically."""
        shutil.rmtree(self.attempt_dir / "inputs", ignore_errors=True)
        os.rename(self.attempt_dir, layout.output_dir(self.data_dir, self.record.id))

    def _finish(
        self, status: JobStatus, *, result: Report | None = None, error: JobError | None = None
    ) -> None:
        def mutate(stored: Stored) -> JobRecord | None:
            record = stored.record
            if record.status not in (JobStatus.running, JobStatus.cancelling):
                return None
            if record.attempts != self.attempt or record.worker != self.record.worker:
                return None  # a later run owns the job now
            final = status
            if record.status == JobStatus.cancelling and status != JobStatus.succeeded:
                final = JobStatus.cancelled  # what stopped it matters less than the cancel
            record.status, record.finished_at, record.error = final, utcnow(), error
            if final == JobStatus.cancelled:
                record.error = None
            if result is not None:
                record.result = result
                record.progress.phase = Phase.done
            return record

        record = update_record(
            self.conn, self.record.id, mutate, message=lambda r: _final_message(r)
        )
        self._clean_up(record)

    def _clean_up(self, record: JobRecord | None) -> None:
        """Remove partial artifacts: this attempt unless it succeeded, older attempts if so."""
        job_dir = layout.job_dir(self.data_dir, self.record.id)
        if record is not None and record.status == JobStatus.succeeded:
            for attempt in job_dir.glob("attempt-*"):
                shutil.rmtree(attempt, ignore_errors=True)
        else:
            shutil.rmtree(self.attempt_dir, ignore_errors=True)
        logger.info(
            "job %s attempt %d: %s",
            self.record.id,
            self.attempt,
            record.status.value if record else "superseded",
        )


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _final_message(record: JobRecord) -> str:
    if record.status == JobStatus.succeeded:
        return "succeeded"
    if record.status == JobStatus.cancelled:
        return "cancelled"
    return record.error.message if record.error else record.status.value
