"""The RQ side of jobs: enqueue a run by dotted path, cancel or stop it, read the queue.

Each run of a job is one RQ job whose id is ``<job id>_r<random>``; the job record keeps the id of
its current run (``rq`` in its hash), so a stale run can tell it is stale. RQ's own statuses and
registries are bookkeeping only: our record in Redis (:mod:`recalib.jobs.records`) is the truth.

The task is named by its dotted path, so the API never imports the worker.
"""

from __future__ import annotations

import logging

import redis
from rq import Queue
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RqStatus

from recalib.settings import Settings

logger = logging.getLogger(__name__)

TASK = "worker.runner.task.run_recalibration"
RESULT_TTL_S = 600  # the result lives in our record; RQ's copy is only for debugging
FAILURE_TTL_S = 24 * 3600


def rq_queue(conn: redis.Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=conn)


def enqueue_run(conn: redis.Redis, settings: Settings, job_id: str, rq_job_id: str) -> None:
    """Enqueue one run of ``job_id`` (``worker.tasks.run_recalibration(job_id)``).

    ``settings.job_timeout_s`` becomes RQ's job timeout: the work horse gets SIGALRM then, and is
    killed by its worker 60 s later if it has not stopped.
    """
    rq_queue(conn, settings).enqueue_call(
        TASK,
        args=(job_id,),
        job_id=rq_job_id,
        timeout=settings.job_timeout_s,
        result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S,
        description=f"recalibrate {job_id}",
    )


def cancel_rq_job(conn: redis.Redis, rq_job_id: str) -> None:
    """Take a queued run off the queue (no-op when it is gone or already taken)."""
    try:
        Job.fetch(rq_job_id, connection=conn).cancel()
    except (NoSuchJobError, InvalidJobOperation) as exc:
        logger.debug("RQ job %s not cancelled: %s", rq_job_id, exc)


def stop_rq_job(conn: redis.Redis, rq_job_id: str) -> bool:
    """Ask the worker running ``rq_job_id`` to kill its work horse; False if none runs it."""
    try:
        send_stop_job_command(conn, rq_job_id)
    except (NoSuchJobError, InvalidJobOperation) as exc:
        logger.debug("RQ job %s not stopped: %s", rq_job_id, exc)
        return False
    return True


def rq_job_state(conn: redis.Redis, rq_job_id: str) -> tuple[RqStatus | None, str | None]:
    """RQ's status of a run and the name of the worker that took it (None, None when gone)."""
    try:
        job = Job.fetch(rq_job_id, connection=conn)
    except NoSuchJobError:
        return None, None
    return job.get_status(refresh=False), job.worker_name


def queue_depth(conn: redis.Redis, settings: Settings) -> int:
    """Runs waiting in the queue."""
    return int(rq_queue(conn, settings).count)
