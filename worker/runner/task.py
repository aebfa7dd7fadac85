"""The queue task: one run of a job, from its record in Redis to a final status.

:func:`run_recalibration` runs inside RQ's work horse (a child forked for this job). It marks the
record ``running``, builds a :class:`JobSpec` from the uploaded files, calls
:func:`worker.pipeline.run_job`, streams progress to Redis, and ends the record itself:

- success → the job ``succeeded`` with the report, in the one conditional update that proves this
  run still owns the job (:func:`recalib.jobs.states.finish_run`); the record then names this
  run's directory as the job's artifacts. A superseded run changes nothing and removes its own;
- a :class:`UserError` → ``failed`` with its message (no retry: the input will not get better);
- :class:`JobCancelledError` → ``cancelled``; RQ's job timeout → ``failed`` naming
  ``RECALIB_JOB_TIMEOUT_S``; the data directory not writable → ``failed``
  (``service-unavailable``) naming the directory, also when a library hid the OSError (a
  probe write into the run's directory tells);
- anything else → ``failed`` as ``internal-error`` with a short message (traceback in the log).

In a warm worker (``RECALIB_WORKER_MODE=warm``) the horse hands the run to the worker's warm
runner (:mod:`worker.runner.proxy`), which executes the same :class:`_Run` with its model cache.
A run whose horse (or runner) dies is ended by its worker (:mod:`worker.runner.process`) or the
reaper. The torch-heavy pipeline is imported when a run starts, never at import time, so the
worker's parent process can import this module (and fork) without importing torch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from typing import TYPE_CHECKING

import redis
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from recalib.contract import JobError, JobRecord, JobSpec, JobStatus, Report
from recalib.errors import (
    JobCancelledError,
    RecalibError,
    ServiceUnavailableError,
    UserError,
    error_type_name,
)
from recalib.jobs import states
from recalib.jobs.artifact_store import INPUTS_DIR, ArtifactStore
from recalib.jobs.connection import redis_url
from recalib.jobs.file_store import FileStore, storage_error
from recalib.jobs.inputs import run_inputs
from recalib.jobs.storage import open_storage, scratch_root
from recalib.jobs.storage_wait import wait_for_store
from recalib.settings import Settings, get_settings
from worker.runner.progress import ProgressWriter
from worker.runner.proxy import run_in_runner, warm_runner_socket

if TYPE_CHECKING:
    from worker.runner.model_cache import ModelCache

logger = logging.getLogger(__name__)


def run_recalibration(job_id: str) -> None:
    """Run job ``job_id`` once (an RQ task; enqueued by dotted path by the API)."""
    if warm_runner_socket() is not None:  # a warm worker's horse: its runner does the run
        run_in_runner(job_id)
        return
    settings = get_settings()
    rq_job = get_current_job()
    conn = redis.Redis.from_url(redis_url(settings))
    try:
        record = _start(conn, settings, job_id, rq_job.id if rq_job else None)
        if record is not None:
            _Run(conn, settings, record, data_workers=data_workers(settings)).execute()
    finally:
        conn.close()


def data_workers(settings: Settings) -> int:
    """DataLoader processes decoding image archives: ``RECALIB_DATA_WORKERS``, or with -1
    (auto) min(8, CPU cores - 1)."""
    if settings.data_workers >= 0:
        return settings.data_workers
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _start(
    conn: redis.Redis,
    settings: Settings,
    job_id: str,
    rq_job_id: str | None,
    worker_name: str | None = None,
) -> JobRecord | None:
    """Mark the job running on this worker; None if it is cancelled, gone or not this run's."""
    worker_name = worker_name or os.environ.get("RQ_WORKER_ID", f"pid-{os.getpid()}")
    if not wait_for_store(conn, settings, job_id, rq_job_id):  # object store down: queued again
        return None
    record = states.start_run(conn, job_id, rq_job_id, worker_name, settings.job_max_attempts)
    if record is None:
        logger.info("job %s: not started (cancelled, deleted, or a stale run)", job_id)
    return record


class _Run:
    """One attempt of one job; with a ``model_cache`` (a warm runner's) the model may come from
    an earlier job's load, and image archives are decoded by ``data_workers`` processes."""

    def __init__(
        self,
        conn: redis.Redis,
        settings: Settings,
        record: JobRecord,
        *,
        model_cache: ModelCache | None = None,
        data_workers: int = 0,
    ) -> None:
        self.conn, self.settings, self.record = conn, settings, record
        self.model_cache, self.data_workers = model_cache, data_workers
        self.attempt = record.attempts
        self.data_dir = settings.data_dir
        self.files = FileStore(open_storage(settings, "worker"), conn, settings.max_upload_bytes)
        self.artifacts = ArtifactStore(self.files.storage, scratch_root(settings))
        self.inputs = run_inputs(self.files, record, settings)  # uploads and URIs
        self.attempt_dir = self.artifacts.attempt_dir(record.id, self.attempt)
        self.progress = ProgressWriter(conn, record.id, self.attempt, record.worker)

    def execute(self) -> None:
        try:
            spec = self._spec()
            from worker.pipeline import run_job  # torch: only in the work horse or runner

            with self._model_source():
                report = run_job(
                    spec,
                    on_progress=self.progress,
                    should_stop=self.progress.should_stop,
                    data_workers=self.data_workers,
                )
            report = self.inputs.annotate(report, self.attempt_dir)  # sources in report.data
            self.artifacts.publish_from(self.record.id, self.attempt, self.attempt_dir)
            self.finish(JobStatus.succeeded, result=report)
        except Exception as exc:
            self._end_with(exc)

    def _end_with(self, exc: Exception) -> None:
        """Failed, or cancelled, by ``exc`` (whose chain may hold the real reason: the pipeline
        wraps whatever user code raises, RQ's timeout alarm included, in a UserError)."""
        chain = _chain(exc)
        if any(isinstance(e, JobTimeoutException) for e in chain):
            self.finish(JobStatus.failed, error=states.timeout_error(self.settings))
        elif any(isinstance(e, JobCancelledError) for e in chain):
            self.finish(JobStatus.cancelled)
        elif isinstance(exc, UserError | ServiceUnavailableError):
            self.finish(
                JobStatus.failed, error=JobError(type=error_type_name(exc), message=str(exc))
            )
        elif (storage := self._storage_error(chain)) is not None:
            logger.error("job %s: %s", self.record.id, storage)
            error = JobError(type=storage.type_slug, message=str(storage))
            self.finish(JobStatus.failed, error=error)
        else:
            logger.exception("job %s: internal error", self.record.id)
            self._fail_internal(exc)

    def _storage_error(self, chain: list[BaseException]) -> ServiceUnavailableError | None:
        """The data directory's fault, if it is one: an OSError in the chain that says so, or,
        since libraries hide theirs (torch.export.save raises a RuntimeError with the strerror
        in its text), a probe write into this run's directory that fails the same way."""
        for exc in chain:
            if (error := storage_error(exc, self.data_dir, "worker")) is not None:
                return error
        try:
            with tempfile.TemporaryFile(dir=self.attempt_dir):
                return None
        except OSError as probe:
            return storage_error(probe, self.data_dir, "worker")

    def _fail_internal(self, exc: BaseException) -> None:
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        message = f"internal error in the worker ({type(exc).__name__}{': ' if detail else ''}"
        message += f"{detail}); the worker log has the details"
        if isinstance(exc, RecalibError):
            message = exc.message
        self.finish(JobStatus.failed, error=JobError(type="internal-error", message=message))

    # -- inputs and outputs ----------------------------------------------------------------

    def _spec(self) -> JobSpec:
        """The pipeline's input: each upload linked into the attempt dir under its own name."""
        self.artifacts.prepare_attempt(self.record.id, self.attempt)
        request = self.record.request
        options = request.options
        device = self.settings.worker_device
        if options.device == "auto" and device not in ("", "auto"):
            options = options.model_copy(update={"device": device})
        s = self.settings
        return JobSpec(
            model_path=self._input("model"),
            calibration_path=self._input("calibration"),
            eval_path=self._input("eval"),
            arch=request.arch,
            arch_kwargs=request.arch_kwargs,
            options=options,
            out_dir=str(self.attempt_dir),
            model_source=self.inputs.model_source(),
            allow_unsafe_pickle=s.allow_unsafe_pickle,
            arch_allowlist=s.arch_allowlist,
            max_archive_members=s.max_archive_members,
            max_archive_bytes=s.max_archive_bytes,
            max_image_pixels=s.max_image_pixels,
        )

    def _model_source(self) -> contextlib.AbstractContextManager[None]:
        """In a warm runner, models come from its cache, keyed by the upload's sha256."""
        if self.model_cache is None:
            return contextlib.nullcontext()
        from worker.formats.models import model_source

        sha256 = self.inputs.sha256_of("model")  # None: the cache hashes the file itself
        return model_source(functools.partial(self.model_cache.load, sha256=sha256))

    def _input(self, role: str) -> str | None:
        path = self.inputs.materialize(role, self.attempt_dir / INPUTS_DIR / role)
        return str(path) if path is not None else None

    def finish(
        self, status: JobStatus, *, result: Report | None = None, error: JobError | None = None
    ) -> None:
        """End the record (if this run still owns it), then this run's directory."""
        record = states.finish_run(
            self.conn,
            self.record.id,
            self.attempt,
            self.record.worker,
            status,
            result=result,
            error=error,
        )
        published = record is not None and record.output_attempt == self.attempt
        self.artifacts.end_attempt(self.record.id, self.attempt, published=published)
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
