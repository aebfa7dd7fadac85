"""The worker process: RQ's forking ``Worker``, one job at a time, on one device.

Each job runs in a fresh work horse forked from this process, so a crash, a leak or a wedged GPU
context dies with the horse. RQ's ``SimpleWorker`` is not used: it runs jobs in-process, ignores
the stop-job command and stops heart-beating during a job.

CUDA must never be initialised in this parent process: a CUDA context does not survive
``fork()``, and every forked horse would fail on its first CUDA call. So this process never calls
``torch.cuda.*``; it imports torch (to share the import with its horses) but detects the device in
a short-lived subprocess (:func:`detect_device`).

On top of RQ, :class:`RecalibWorker`

- writes the worker's whole hash in ``recalib:worker:<name>`` (device, state, current job, pid,
  hostname) at every RQ heartbeat, so ``live_workers()`` lists it, the reaper can tell it died,
  and a Redis that lost the hash (restarted without persistence) has all of it again a beat later;
- checks that its data directory is the API's (:mod:`recalib.jobs.data_dir`): at start (it
  refuses to start, in one line naming ``RECALIB_DATA_DIR``) and before each job (the job fails
  with that message instead of "the uploaded file no longer exists");
- ends the record of a run whose horse died (killed, out of memory, stopped by a cancel) as
  soon as the horse exits: cancelled, re-queued or failed (:func:`recalib.jobs.states.recover_run`);
- makes a horse die with its worker (``PR_SET_PDEATHSIG``), so no orphan keeps running a job
  that the reaper will give to another worker.

SIGTERM (``docker stop``) is RQ's warm shutdown: the running job finishes first. A second
SIGTERM (or SIGINT) is a cold shutdown: the horse is killed and the job handed back (re-queued).
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from typing import Any

import redis
from rq import Worker
from rq.job import Job
from rq.queue import Queue

from recalib.contract import JobStatus
from recalib.errors import ServiceUnavailableError
from recalib.jobs import data_dir, records, workers
from recalib.jobs.connection import connect_redis, redis_url, require_redis
from recalib.jobs.states import fail_unstarted, recover_run, requeue_lost
from recalib.settings import Settings, get_settings

logger = logging.getLogger(__name__)

DETECT_DEVICE = (
    "import torch\n"
    "print('cuda:0' if torch.cuda.is_available() else "
    "'mps' if torch.backends.mps.is_available() else 'cpu')"
)
_PR_SET_PDEATHSIG = 1


def detect_device(timeout_s: float = 120.0) -> str:
    """``cuda:0`` if this process could use CUDA, else ``mps`` or ``cpu``, asked of a subprocess.

    A subprocess, because initialising CUDA here would break the forked work horses.
    """
    result = subprocess.run(
        [sys.executable, "-c", DETECT_DEVICE],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    device = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode != 0 or not device:
        logger.warning("device detection failed (%s); using cpu", result.stderr.strip()[-300:])
        return "cpu"
    return device


class RecalibWorker(Worker):
    """RQ's forking worker plus recalib's worker registry and run reconciliation."""

    def __init__(self, *args: Any, settings: Settings, device: str, **kwargs: Any) -> None:
        self.settings = settings
        self.device = device
        self.registry_ttl_s = workers.worker_ttl_s(settings)
        self._horse_exit = ""
        # The whole registry hash, written at every beat: a Redis that lost it (restarted
        # without persistence, flushed) gets all of it back at the next beat, not just a state.
        self._registry: dict[str, str | int] = {
            "device": device,
            "state": "starting",
            "current_job": "",
            "pid": os.getpid(),  # this process's, also when a forked horse beats
            "hostname": socket.gethostname(),
        }
        super().__init__(*args, **kwargs)

    # -- registry --------------------------------------------------------------------------

    def _beat(self, pipeline: Any = None, **changes: str | int) -> None:
        """Set ``changes`` and write the whole registry hash (with a fresh TTL)."""
        self._registry.update(changes)
        target = pipeline if pipeline is not None else self.connection
        workers.beat(target, self.name, self.registry_ttl_s, **self._registry)

    def register_birth(self) -> None:
        super().register_birth()
        self._beat(state="started", current_job="")

    def register_death(self) -> None:
        super().register_death()
        workers.unregister(self.connection, self.name)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        super().heartbeat(timeout, pipeline)
        self._beat(pipeline, state=self.get_state())

    def set_state(self, state: str, pipeline: Any = None) -> None:
        super().set_state(state, pipeline)
        self._beat(pipeline, state=state)

    # -- runs ------------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        job_id = str(job.args[0]) if job.args else ""
        self._beat(state="busy", current_job=job_id)
        self._refuse_if_wrong_data_dir(job_id, job.id)
        self._horse_exit = ""
        try:
            super().execute_job(job, queue)
        except SystemExit:  # cold shutdown: the horse was killed; hand the job back
            reason = "the worker was shut down while running the job"
            self._reconcile(job_id, job.id, reason, handing_back=True)
            raise
        finally:
            self._beat(current_job="")
        reason = "the work horse died while running the job"
        if self._horse_exit:
            reason += f" ({self._horse_exit}; out of memory?)"
        self._reconcile(job_id, job.id, reason)

    def _refuse_if_wrong_data_dir(self, job_id: str, rq_job_id: str) -> None:
        """Fail a queued job, naming ``RECALIB_DATA_DIR``, when this worker's data directory is
        not the API's (its inputs are not here); its horse then finds it final and does nothing."""
        try:
            wrong = data_dir.problem(self.connection, self.settings)
            if wrong is None:
                return
            logger.error("job %s: %s", job_id, wrong.message)
            stored = records.load(self.connection, job_id)
            if stored is not None and stored.rq_job_id == rq_job_id:
                fail_unstarted(self.connection, stored, wrong.message)
        except redis.RedisError:
            logger.exception("job %s: data directory not checked", job_id)

    def handle_work_horse_killed(
        self, job: Job, retpid: int | None, ret_val: int | None, rusage: Any
    ) -> None:
        if ret_val is None:  # RQ killed it itself: 60 s past the job timeout
            self._horse_exit = "killed by its worker after the job timeout"
        elif os.WIFSIGNALED(ret_val):
            self._horse_exit = f"killed by {signal.Signals(os.WTERMSIG(ret_val)).name}"
        else:
            self._horse_exit = f"exit status {os.WEXITSTATUS(ret_val)}"
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)

    def _reconcile(
        self, job_id: str, rq_job_id: str, reason: str, *, handing_back: bool = False
    ) -> None:
        """After a horse exits: a run that did not end its job's record is ended here.

        Running/cancelling → :func:`recover_run` (cancelled, re-queued or failed). Still queued
        (the horse exited before the task marked it running): re-queued on a shutdown, else
        failed, since a horse that cannot start a job would fail the next run the same way.
        """
        try:
            stored = records.load(self.connection, job_id)
            if stored is None or stored.rq_job_id != rq_job_id or stored.record.status.is_final:
                return
            if stored.record.status != JobStatus.queued:
                recover_run(
                    self.connection, self.settings, job_id, reason=reason, rq_job_id=rq_job_id
                )
            elif handing_back:
                requeue_lost(self.connection, self.settings, stored, reason)
            else:
                detail = self._horse_exit or "its task failed before it began"
                fail_unstarted(self.connection, stored, detail)
        except redis.RedisError:
            logger.exception("job %s: run not reconciled; the reaper will", job_id)

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        _die_with_parent()
        super().main_work_horse(job, queue)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the worker) dies."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        logger.debug("prctl(PR_SET_PDEATHSIG) unavailable")
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def default_worker_name() -> str:
    """``<hostname>-<pid>-<random>``: a restarted container (same hostname, pid 1) must not
    collide with its previous life, whose RQ worker key outlives it for a while."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def run_worker(
    settings: Settings,
    *,
    device: str | None = None,
    name: str | None = None,
    burst: bool = False,
) -> bool:
    """Work the queue until stopped (or, with ``burst``, until it is empty).

    ``device`` (default ``settings.worker_device``; ``auto`` is detected in a subprocess) is
    handed to the jobs through ``RECALIB_WORKER_DEVICE``: a job's ``options.device == "auto"``
    becomes this device. Heartbeats every ``worker_heartbeat_s`` seconds, idle or busy.
    Returns whether any job was processed.
    """
    probe = connect_redis(settings)  # logs which Redis, and whether the URL was the default
    try:
        require_redis(probe, settings)  # one line and a non-zero exit, not a silent retry loop
        logger.info("data directory %s", data_dir.describe(settings))
        wrong = data_dir.problem(probe, settings)
    finally:
        probe.close()
    if wrong is not None and wrong.definite:  # every job would fail: one line, exit 1
        raise ServiceUnavailableError(wrong.message, field="RECALIB_DATA_DIR")
    if wrong is not None:
        logger.warning("%s; the API has not said which data directory it uses", wrong.message)
    device = device or settings.worker_device
    if device == "auto":
        device = detect_device()
    os.environ["RECALIB_WORKER_DEVICE"] = device  # read by the task in the horse
    get_settings.cache_clear()
    settings = settings.model_copy(update={"worker_device": device})
    _preload()
    beat_s = settings.worker_heartbeat_s
    worker = RecalibWorker(
        [settings.queue_name],
        name=name or default_worker_name(),
        connection=redis.Redis.from_url(redis_url(settings)),
        worker_ttl=beat_s + 15,  # RQ blocks on the queue for worker_ttl - 15 s between beats
        job_monitoring_interval=beat_s,  # beats while a horse runs
        settings=settings,
        device=device,
    )
    logger.info("worker %s on %s, queue %s", worker.name, device, settings.queue_name)
    return bool(worker.work(burst=burst, logging_level=settings.log_level))


def _preload() -> None:
    """Import the task and the pipeline (torch) once, here, so that each forked horse starts
    with them loaded. Importing torch does not initialise CUDA; nothing here may call it."""
    try:
        import worker.pipeline
        import worker.runner.task  # noqa: F401
    except ImportError:
        logger.exception("the pipeline cannot be imported; jobs will fail until it can")
