"""The queue task: one run of a job, from its record in Redis to a final status (trusted side).

:func:`run_recalibration` runs inside RQ's work horse (a child forked for this job; torch-free).
:class:`JobRun` marks the record ``running``, materializes the job's inputs into a directory of
its own (store, URIs, MLflow, the input cache: everything that needs the network or secrets), and
hands the job to a runner (:mod:`worker.runner.client`), which runs the model in a sandboxed
process that sees only those inputs, its output directory and its scratch directory. Then, here
again, it relays progress and cancellation, registers the output in MLflow when asked, publishes
the artifacts and ends the record:

- success → ``succeeded`` with the report (which names the sandbox that ran it), in the one
  conditional update that proves this run still owns the job
  (:func:`recalib.jobs.states.end_run`);
- an error the job reported (a :class:`~recalib.errors.UserError`'s type and message) or a
  forbidden system call the sandbox saw (``sandbox-violation``) → ``failed``;
- cancelled → ``cancelled``; RQ's job timeout → the job's process is killed, ``failed`` naming
  ``RECALIB_JOB_TIMEOUT_S``; the data directory not writable → ``failed`` (``service-unavailable``);
- anything else here → ``failed`` as ``internal-error`` with a short message.

A warm worker's horse uses the worker's runner (its socket in ``RECALIB_RUNNER_SOCKET``); any other
horse starts a one-shot runner of its own. A run whose horse or runner dies is ended by its worker
(:mod:`worker.runner.process`) or the reaper.
"""

from __future__ import annotations

import logging
import os
import tempfile

import redis
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from recalib.contract import JobError, JobRecord, JobSpec, JobStatus, Report
from recalib.errors import RecalibError, ServiceUnavailableError, UserError, error_type_name
from recalib.files.artifacts import ArtifactStore
from recalib.files.storage import open_storage, scratch_root
from recalib.files.store import FileStore, storage_error
from recalib.inputs.job_inputs import run_inputs
from recalib.jobs import states
from recalib.jobs.connection import redis_url
from recalib.jobs.storage_wait import wait_for_store
from recalib.settings import Settings, get_settings
from worker.runner.client import ConfinedJob, Outcome, RunnerLostError
from worker.runner.progress import ProgressWriter
from worker.runner.protocol import RUNNER_LOST_EXIT, SANDBOX_VIOLATION, JobRequest
from worker.runner.sandboxed import confinement_for, data_workers, finish_report, run_in_runner

logger = logging.getLogger(__name__)


def run_recalibration(job_id: str) -> None:
    """Run job ``job_id`` once (an RQ task; enqueued by dotted path by the API)."""
    settings = get_settings()
    rq_job = get_current_job()
    conn = redis.Redis.from_url(redis_url(settings))
    try:
        record = start(conn, settings, job_id, rq_job.id if rq_job else None)
        if record is not None:
            JobRun(conn, settings, record).execute()
    finally:
        conn.close()


def start(
    conn: redis.Redis, settings: Settings, job_id: str, rq_job_id: str | None
) -> JobRecord | None:
    """Mark the job running on this worker; None if it is cancelled, gone or not this run's."""
    worker_name = os.environ.get("RQ_WORKER_ID", f"pid-{os.getpid()}")
    if not wait_for_store(conn, settings, job_id, rq_job_id):  # object store down: queued again
        return None
    record = states.start_run(conn, job_id, rq_job_id, worker_name, settings.job_max_attempts)
    if record is None:
        logger.info("job %s: not started (cancelled, deleted, or a stale run)", job_id)
    return record


class JobRun:
    """One attempt of one job, on the trusted side."""

    def __init__(self, conn: redis.Redis, settings: Settings, record: JobRecord) -> None:
        self.conn, self.settings, self.record = conn, settings, record
        self.attempt = record.attempts
        self.data_dir = settings.data_dir
        self.files = FileStore(open_storage(settings, "worker"), conn, settings.max_upload_bytes)
        self.artifacts = ArtifactStore(self.files.storage, scratch_root(settings))
        self.inputs = run_inputs(self.files, record, settings)  # uploads and URIs
        self.attempt_dir = self.artifacts.attempt_dir(record.id, self.attempt)
        self.progress = ProgressWriter(conn, record.id, self.attempt, record.worker)
        self.job: ConfinedJob | None = None

    def execute(self) -> None:
        try:
            spec = self._spec()
            inputs_dir = self.artifacts.inputs_dir(self.record.id, self.attempt)
            tmp_dir = self.artifacts.tmp_dir(self.record.id, self.attempt)
            request = JobRequest(
                spec=spec.model_dump(mode="json"),
                confinement=confinement_for(spec, [inputs_dir], tmp_dir, self.settings),
                level=self.settings.sandbox,
                job_id=self.record.id,
                data_workers=data_workers(self.settings),
            )
            self.job = ConfinedJob("", request)
            outcome = run_in_runner(
                self.job, self.settings,
                on_progress=self.progress, should_stop=self.progress.should_stop,
            )  # fmt: skip
            self._end(spec, outcome)
        except RunnerLostError as exc:
            logger.error("job %s: %s", self.record.id, exc)
            os._exit(RUNNER_LOST_EXIT)  # the worker says how the runner died, and recovers the job
        except Exception as exc:
            self._end_with(exc)

    def _end(self, spec: JobSpec, outcome: Outcome) -> None:
        if outcome.cancelled:
            self.finish(JobStatus.cancelled)
        elif outcome.error is not None:
            error = outcome.error
            # A write the job's process could not make (an internal error, or a permission
            # error it took for the sandbox's) is the data directory's fault when this side
            # cannot write there either; forbidden system calls (attempts) stay the model's.
            maybe_ours = error.type == "internal-error" or (
                error.type == SANDBOX_VIOLATION and not outcome.attempts
            )
            if maybe_ours and (storage := self._probe_storage()) is not None:
                error = JobError(type=storage.type_slug, message=str(storage))  # not the job's
            self.finish(JobStatus.failed, error=error)
        else:
            assert outcome.report is not None
            report = finish_report(spec, outcome.report, self.attempt_dir, self.settings)
            report = self.inputs.annotate(report, self.attempt_dir)  # sources in report.data
            self.artifacts.publish_from(self.record.id, self.attempt, self.attempt_dir)
            self.finish(JobStatus.succeeded, result=report)

    def _end_with(self, exc: Exception) -> None:
        """Failed, or cancelled, by ``exc`` raised here (not in the job's process)."""
        if isinstance(exc, JobTimeoutException):
            if self.job is not None:
                self.job.kill()
            self.finish(JobStatus.failed, error=states.timeout_error(self.settings))
        elif isinstance(exc, UserError | ServiceUnavailableError):
            self.finish(
                JobStatus.failed, error=JobError(type=error_type_name(exc), message=str(exc))
            )
        elif (storage := self._storage_error(exc)) is not None:
            logger.error("job %s: %s", self.record.id, storage)
            self.finish(
                JobStatus.failed, error=JobError(type=storage.type_slug, message=str(storage))
            )
        else:
            logger.exception("job %s: internal error", self.record.id)
            detail = str(exc).splitlines()[0][:200] if str(exc) else ""
            message = f"internal error in the worker ({type(exc).__name__}"
            message += f"{': ' if detail else ''}{detail}); the worker log has the details"
            if isinstance(exc, RecalibError):
                message = exc.message
            self.finish(JobStatus.failed, error=JobError(type="internal-error", message=message))

    def _storage_error(self, exc: BaseException) -> ServiceUnavailableError | None:
        """The data directory's fault, if it is one: an OSError in the chain that says so, or a
        probe write into this run's directory that fails the same way."""
        current: BaseException | None = exc
        while current is not None:
            if (error := storage_error(current, self.data_dir, "worker")) is not None:
                return error
            current = current.__cause__ or current.__context__
        return self._probe_storage()

    def _probe_storage(self) -> ServiceUnavailableError | None:
        """A probe write into this run's directory: the data directory's fault, if it fails
        (libraries hide theirs: torch.export.save raises a RuntimeError with the strerror)."""
        try:
            with tempfile.TemporaryFile(dir=self.attempt_dir):
                return None
        except OSError as probe:
            return storage_error(probe, self.data_dir, "worker")

    def _spec(self) -> JobSpec:
        """The pipeline's input: each input materialized under the run's inputs directory."""
        self.artifacts.prepare_attempt(self.record.id, self.attempt)
        request = self.record.request
        options = request.options
        device = self.settings.worker_device
        if options.device == "auto" and device not in ("", "auto"):
            options = options.model_copy(update={"device": device})
        s = self.settings
        return JobSpec(
            kind=request.kind,
            model_path=self._input("model"),
            calibration_path=self._input("calibration"),
            eval_path=self._input("eval"),
            source_eval_path=self._input("source_eval"),
            arch=request.arch,
            arch_kwargs=request.arch_kwargs,
            options=options,
            out_dir=str(self.attempt_dir),
            model_source=self.inputs.model_source(),
            allow_unsafe_pickle=s.allow_unsafe_pickle,
            vet_models=s.vet_models,
            arch_allowlist=s.arch_allowlist,
            max_archive_members=s.max_archive_members,
            max_archive_bytes=s.max_archive_bytes,
            max_image_pixels=s.max_image_pixels,
        )

    def _input(self, role: str) -> str | None:
        inputs_dir = self.artifacts.inputs_dir(self.record.id, self.attempt)
        path = self.inputs.materialize(role, inputs_dir / role)
        return str(path) if path is not None else None

    def finish(
        self, status: JobStatus, *, result: Report | None = None, error: JobError | None = None
    ) -> None:
        """End the record (if this run still owns it), then this run's directory."""
        seen = states.RunEnd(
            self.record.id,
            "finished",
            attempt=self.attempt,
            worker=self.record.worker,
            status=status,
            result=result,
            error=error,
        )
        record = states.end_run(self.conn, self.settings, seen)  # fmt: skip
        published = record is not None and record.output_attempt == self.attempt
        self.artifacts.end_attempt(self.record.id, self.attempt, published=published)
        logger.info("job %s attempt %d: %s", self.record.id, self.attempt,
                    record.status.value if record else "superseded")  # fmt: skip
