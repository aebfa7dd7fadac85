"""The job state machine: every change of a job's status, each a conditional update.

::

    create ─▶ queued ──start_run──▶ running ──finish_run──▶ succeeded | failed | cancelled
               │  ▲                   │ request_cancel
               │  └──recover_run──────┤ (runs left)
               │     requeue_lost     ▼
               │                  cancelling ──finish_run / recover_run──▶ cancelled
               ├──cancel_queued──▶ cancelled
               └──fail_unstarted─▶ failed

:func:`end_run` is the one place that decides what the end of a run (as a worker, a work horse
or the reaper saw it) makes of the job; it calls the transitions below. Each function states the
status (and run) it expects; when the job has moved on it changes
nothing and returns None, so a stale writer (an earlier run, a second reaper, a worker finishing
while the reaper recovers it) can never overwrite a newer state. The API, the worker and the
reaper call these functions and never write a record themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import redis
from redis.client import Pipeline

from recalib.contract import JobError, JobRecord, JobStatus, Phase, Progress, Report
from recalib.ids import new_run_id
from recalib.jobs import queue
from recalib.jobs.records import (
    RUNNING,
    WORKER_DIED,
    Stored,
    final_message,
    insert_queued,
    load,
    owned_by,
    timeout_error,
    update_record,
    utcnow,
)
from recalib.settings import Settings

logger = logging.getLogger(__name__)

# -- created ------------------------------------------------------------------------------


def create(
    conn: redis.Redis,
    settings: Settings,
    record: JobRecord,
    seq: int,
    idem: str | None,
) -> Stored | None:
    """Store ``record`` as ``queued`` and enqueue its first run; None when stored.

    With an idempotency key ``idem`` (a Redis key) already naming a job, nothing is written and
    that earlier job is returned.
    """
    rq_job_id = new_run_id(record.id)

    def transaction(pipe: Pipeline) -> Stored | None:
        existing = pipe.get(idem) if idem is not None else None
        stored = load(pipe, existing.decode()) if existing else None  # type: ignore[union-attr]
        if stored is not None:
            return stored
        pipe.multi()
        if idem is not None:
            pipe.set(idem, record.id)
        insert_queued(pipe, record, rq_job_id, seq)
        return None

    watches = [idem] if idem is not None else []
    earlier = conn.transaction(transaction, *watches, value_from_callable=True)  # type: ignore[arg-type]
    if earlier is None:
        queue.enqueue_run(conn, settings, record.id, rq_job_id)
    return earlier  # type: ignore[return-value]


# -- queued → ... -------------------------------------------------------------------------


def start_run(
    conn: redis.Redis, job_id: str, rq_job_id: str | None, worker: str, max_attempts: int
) -> JobRecord | None:
    """queued → running on ``worker`` (attempts + 1), if ``rq_job_id`` is still the job's run."""

    def mutate(stored: Stored) -> JobRecord | None:
        record = stored.record
        if record.status != JobStatus.queued or (rq_job_id and stored.rq_job_id != rq_job_id):
            return None
        record.status, record.attempts = JobStatus.running, record.attempts + 1
        record.started_at, record.worker = utcnow(), worker
        record.progress.phase = Phase.loading
        return record

    return update_record(
        conn,
        job_id,
        mutate,
        message=lambda r: f"running on {worker} (attempt {r.attempts} of {max_attempts})",
    )


def cancel_queued(conn: redis.Redis, job_id: str) -> JobRecord | None:
    """queued → cancelled (its run never starts: :func:`start_run` refuses it)."""

    def mutate(stored: Stored) -> JobRecord | None:
        record = stored.record
        if record.status != JobStatus.queued:
            return None
        record.status, record.finished_at = JobStatus.cancelled, utcnow()
        return record

    return update_record(conn, job_id, mutate, message="cancelled before it ran")


def requeue_lost(conn: redis.Redis, settings: Settings, stored: Stored, reason: str) -> bool:
    """queued → queued with a new run, when the job's run was lost; False if the job moved on."""
    new_rq_job_id = new_run_id(stored.record.id)

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


def fail_unstarted(conn: redis.Redis, stored: Stored, reason: str) -> JobRecord | None:
    """queued → failed, when its run ended before the task could start it."""

    def mutate(current: Stored) -> JobRecord | None:
        record = current.record
        if record.status != JobStatus.queued or current.rq_job_id != stored.rq_job_id:
            return None
        record.status, record.finished_at = JobStatus.failed, utcnow()
        message = f"the worker could not start the job ({reason}); the worker log has the details"
        record.error = JobError(type="internal-error", message=message)
        return record

    return update_record(conn, stored.record.id, mutate, message=final_message)


# -- running → ... ------------------------------------------------------------------------


def record_progress(
    conn: redis.Redis, job_id: str, attempt: int, worker: str | None, progress: Progress, *,
    event: bool,
) -> JobRecord | None:  # fmt: skip
    """running/cancelling → same, with ``progress``, while run ``attempt`` owns the job."""
    owns = owned_by(attempt, worker)

    def mutate(stored: Stored) -> JobRecord | None:
        if not owns(stored):
            return None
        stored.record.progress = progress
        return stored.record

    return update_record(conn, job_id, mutate, event=event)


def request_cancel(conn: redis.Redis, job_id: str) -> JobRecord | None:
    """running → cancelling; the run sees ``cancel_at`` and stops at its next batch."""

    def mutate(stored: Stored) -> JobRecord | None:
        if stored.record.status != JobStatus.running:
            return None
        stored.record.status = JobStatus.cancelling
        return stored.record

    return update_record(
        conn,
        job_id,
        mutate,
        message="cancel requested; the worker stops at the next batch",
        set_fields={"cancel_at": repr(utcnow().timestamp())},
    )


def finish_run(
    conn: redis.Redis,
    job_id: str,
    attempt: int,
    worker: str | None,
    status: JobStatus,
    *,
    result: Report | None = None,
    error: JobError | None = None,
) -> JobRecord | None:
    """running/cancelling → ``status``, if run ``attempt`` on ``worker`` still owns the job.

    This update is what publishes a success: the record then names ``attempt`` as the run whose
    artifacts are served (``output_attempt``). A job being cancelled ends ``cancelled`` unless the
    run succeeded (the work was done). None: a later run owns the job; this run changed nothing.
    """
    owns = owned_by(attempt, worker)

    def mutate(stored: Stored) -> JobRecord | None:
        if not owns(stored):
            return None
        record = stored.record
        final = status
        if record.status == JobStatus.cancelling and status != JobStatus.succeeded:
            final = JobStatus.cancelled  # what stopped it matters less than the cancel
        record.status, record.finished_at = final, utcnow()
        record.error = None if final == JobStatus.cancelled else error
        if result is not None and final == JobStatus.succeeded:
            record.result, record.output_attempt = result, attempt
            record.progress.phase = Phase.done
        return record

    return update_record(conn, job_id, mutate, message=final_message)


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
    """
    new_rq_job_id = new_run_id(job_id)
    now = utcnow()

    def mutate(stored: Stored) -> JobRecord | None:
        record = stored.record
        if record.status not in RUNNING:
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


# -- the end of a run, whoever saw it -------------------------------------------------------


@dataclass(frozen=True)
class RunEnd:
    """What a caller saw of the end of a job's run (RQ job ``rq_job_id``, attempt, worker).

    ``how``: ``finished`` (the run ended its job itself: ``status`` with ``result`` or
    ``error``); ``lost`` (its process died, or its worker: ``reason`` says how, and
    ``unstarted_reason`` what kept it from starting the job, if it had not); ``handed-back`` (a
    shutdown or an unavailable store took it away before it could run: never the job's fault).
    """

    job_id: str
    how: Literal["finished", "lost", "handed-back"]
    reason: str = ""
    rq_job_id: str | None = None
    attempt: int | None = None
    worker: str | None = None
    status: JobStatus | None = None
    result: Report | None = None
    error: JobError | None = None
    unstarted_reason: str = ""


def end_run(conn: redis.Redis, settings: Settings, seen: RunEnd) -> JobRecord | None:
    """The one place that decides what the end of a run makes of its job.

    Finished → :func:`finish_run`. Lost or handed back while running → :func:`recover_run`
    (cancelled if being cancelled, failed past the timeout or out of attempts, else queued again).
    Still queued (the run never started it): handed back → :func:`requeue_lost`; lost →
    :func:`fail_unstarted` (a run that cannot start a job would fail the next one the same way).
    A job that moved on (another run, a final status) is left alone: None.
    """
    if seen.how == "finished":
        if seen.status is None or seen.attempt is None:
            raise ValueError("a finished run needs its status and attempt")
        return finish_run(conn, seen.job_id, seen.attempt, seen.worker, seen.status,
                          result=seen.result, error=seen.error)  # fmt: skip
    stored = load(conn, seen.job_id)
    if stored is None or stored.record.status.is_final:
        return None
    if seen.rq_job_id is not None and stored.rq_job_id != seen.rq_job_id:
        return None
    if stored.record.status == JobStatus.queued:
        if seen.how == "handed-back":
            return stored.record if requeue_lost(conn, settings, stored, seen.reason) else None
        return fail_unstarted(conn, stored, seen.unstarted_reason or seen.reason)
    return recover_run(conn, settings, seen.job_id, reason=seen.reason, rq_job_id=seen.rq_job_id)
