"""The work horse of a warm worker: hands its run to the worker's warm runner and waits for it.

The horse stays what RQ supervises (heartbeats, stop-job, the job timeout, warm and cold
shutdown all act on it, exactly as with a horse that runs the job itself); the runner
(:mod:`worker.runner.warm`) does the work and ends the job's record. What can happen here:

- the runner answers: the run is over (its record says how), the horse exits normally;
- the runner dies (end of file, or no runner to connect to): the horse exits with
  :data:`~worker.runner.protocol.RUNNER_LOST_EXIT`; its worker says how the runner died and
  recovers the job, as for a horse that died;
- RQ's job timeout (SIGALRM here): the horse kills the runner, waits until it is gone, then fails
  the job naming ``RECALIB_JOB_TIMEOUT_S`` if the run still owns it (as the in-process task does);
- the horse itself is killed (stop-job, cold shutdown, the 60 s past the timeout): the runner
  sees the connection close and exits; the worker starts a new one.

Torch-free: a horse forked from a warm worker never imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path

import redis
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from recalib.contract import JobStatus
from recalib.jobs import records, states
from recalib.jobs.connection import redis_url
from recalib.settings import Settings, get_settings
from worker.runner.protocol import (
    PID_ENV,
    RUNNER_LOST_EXIT,
    SOCKET_ENV,
    RunRequest,
    encode_request,
    read_line,
    send_line,
)

logger = logging.getLogger(__name__)

RUNNER_EXIT_WAIT_S = 30.0


class RunnerError(RuntimeError):
    """The runner could not start the run (its message says why)."""


def warm_runner_socket() -> str | None:
    """The runner's socket path when this process is a warm worker's horse, else None."""
    return os.environ.get(SOCKET_ENV) or None


def run_in_runner(job_id: str) -> None:
    """Have the warm runner run job ``job_id`` once; return when the run has ended."""
    settings = get_settings()
    rq_job = get_current_job()
    request = RunRequest(
        job_id=job_id,
        rq_job_id=rq_job.id if rq_job else None,
        worker=os.environ.get("RQ_WORKER_ID", f"pid-{os.getpid()}"),
    )
    path = os.environ[SOCKET_ENV]
    runner_pid = int(os.environ.get(PID_ENV) or 0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
            send_line(sock, encode_request(request))
            reply = read_line(sock, still_there=lambda: _alive(runner_pid))
        except JobTimeoutException:
            logger.warning("job %s: job timeout; stopping the runner", job_id)
            _stop_runner(sock)
            _fail_timed_out(settings, request)
            return
        except OSError as exc:
            logger.error("job %s: the job runner is gone (%s)", job_id, exc)
            os._exit(RUNNER_LOST_EXIT)
    if reply is None:
        logger.error("job %s: the job runner died during the run", job_id)
        os._exit(RUNNER_LOST_EXIT)
    if not reply.get("ok"):
        raise RunnerError(str(reply.get("error") or "the runner could not run the job"))


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (not gone, not a zombie its worker has yet to reap)."""
    if pid <= 0:
        return True  # unknown: end of file decides
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc here: end of file decides
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _stop_runner(sock: socket.socket) -> None:
    """SIGKILL the runner and wait until its end of the connection closes (it wrote its last)."""
    pid = int(os.environ.get(PID_ENV) or 0)
    if pid > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + RUNNER_EXIT_WAIT_S
    sock.settimeout(0.5)
    while time.monotonic() < deadline and _alive(pid):
        try:
            if not sock.recv(4096):
                return
        except TimeoutError:
            continue
        except OSError:
            return
    if _alive(pid):
        logger.warning("the runner did not die within %.0f s of SIGKILL", RUNNER_EXIT_WAIT_S)


def _fail_timed_out(settings: Settings, request: RunRequest) -> None:
    """Fail the job as timed out, if this run (attempt, worker, RQ job) still owns it."""
    from worker.runner.task import _Run

    conn = redis.Redis.from_url(redis_url(settings))
    try:
        stored = records.load(conn, request.job_id)
        if stored is None or (request.rq_job_id and stored.rq_job_id != request.rq_job_id):
            return
        record = stored.record
        if record.status not in (JobStatus.running, JobStatus.cancelling):
            return  # never started (the worker fails it) or already ended
        if record.worker != request.worker:
            return
        _Run(conn, settings, record).finish(JobStatus.failed, error=states.timeout_error(settings))
    finally:
        conn.close()
