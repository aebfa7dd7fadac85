"""The worker process: RQ's forking ``Worker``, one job at a time, on one device.

RQ forks a work horse per job from this process, so heartbeats, RQ's stop-job command, the job
timeout and warm/cold shutdown all work on the horse as RQ intends. RQ's ``SimpleWorker`` is not
used: it runs jobs in-process, ignores the stop-job command and stops heart-beating during a job.
What the horse does depends on ``RECALIB_WORKER_MODE``:

- ``warm`` (default): it keeps a warm runner (:mod:`worker.runner.supervise`,
  :mod:`worker.runner.warm`: a spawned process with torch loaded once, which forks a sandboxed
  process per job) and each horse, cheap to fork, hands its job to it (:mod:`worker.runner.task`,
  :mod:`worker.runner.client`). A runner that dies is replaced; the job is reconciled as below.
- ``fork``: each horse starts a one-shot runner of its own, paying torch's import every job.

Either way this process and its horses never import torch, and never run a user's model: the
sandbox level (``RECALIB_SANDBOX``) is checked before the worker starts, and it refuses to start,
in one line naming the missing mechanism, when the kernel or container cannot provide it.

Either way the device is detected in a short-lived subprocess, and :class:`RecalibWorker`

- writes the worker's whole hash in ``recalib:worker:<name>`` (device, state, current job, pid,
  hostname) at every RQ heartbeat, so ``live_workers()`` lists it, the reaper can tell it died,
  and a Redis that lost the hash (restarted without persistence) has all of it again a beat later;
- checks that its data directory is the API's (:mod:`recalib.files.data_dir`): at start (it
  refuses to start, in one line naming ``RECALIB_DATA_DIR``) and before each job (the job fails
  with that message instead of "the uploaded file no longer exists");
- ends the record of a run whose horse (or runner) died (killed, out of memory, stopped by a
  cancel) as soon as the horse exits: cancelled, re-queued or failed
  (:func:`recalib.jobs.states.end_run`);
- makes a horse and the runner die with their worker (``PR_SET_PDEATHSIG``), so no orphan keeps
  running a job that the reaper will give to another worker.

SIGTERM (``docker stop``) is RQ's warm shutdown: the running job finishes first. A second
SIGTERM (or SIGINT) is a cold shutdown: the horse (and the runner) is killed and the job handed
back (re-queued). With ``RECALIB_WORKER_DRAIN_TIMEOUT_S`` the worker sends itself that second
SIGTERM when the running job has not finished that long after the first: the job is handed back
before the platform's SIGKILL (Kubernetes' ``terminationGracePeriodSeconds``) would lose it to
the reaper's slower path.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Any

import redis
from rq import Worker
from rq.job import Job
from rq.queue import Queue
from rq.worker import WorkerStatus

from recalib.errors import ServiceUnavailableError
from recalib.files import data_dir
from recalib.jobs import records, workers
from recalib.jobs.connection import connect_redis, redis_url, require_redis
from recalib.jobs.states import RunEnd, end_run, fail_unstarted
from recalib.settings import Settings, get_settings
from worker.runner.procs import (
    default_worker_name,
    describe_wait_status,
    detect_device,
    die_with_parent,
)
from worker.runner.protocol import RUNNER_LOST_EXIT
from worker.runner.sandboxed import SANDBOX_ENV
from worker.runner.supervise import RunnerProcess
from worker.sandbox.levels import check as check_sandbox

logger = logging.getLogger(__name__)

__all__ = ["RecalibWorker", "default_worker_name", "detect_device", "run_worker"]


class RecalibWorker(Worker):
    """RQ's forking worker plus recalib's worker registry, run reconciliation and (warm mode,
    ``runner`` given) the warm runner its horses hand their runs to."""

    def __init__(
        self,
        *args: Any,
        settings: Settings,
        device: str,
        runner: RunnerProcess | None = None,
        sandbox: str = "",
        **kwargs: Any,
    ) -> None:
        self.settings = settings
        self.device = device
        self.runner = runner
        self.registry_ttl_s = workers.worker_ttl_s(settings)
        self._horse_exit = ""
        self._horse_status: int | None = None
        self._who_died = "the work horse"
        self._drain_timer: threading.Timer | None = None
        # The whole registry hash, written at every beat: a Redis that lost it (restarted
        # without persistence, flushed) gets all of it back at the next beat, not just a state.
        self._registry: dict[str, str | int] = {
            "device": device,
            "state": "starting",
            "current_job": "",
            "pid": os.getpid(),  # this process's, also when a forked horse beats
            "hostname": socket.gethostname(),
            "sandbox": sandbox,
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

    # -- shutdown ----------------------------------------------------------------------------

    def handle_warm_shutdown_request(self) -> None:
        """The first SIGTERM: with a drain deadline and a job running, arm the hand-back."""
        super().handle_warm_shutdown_request()
        drain_s = self.settings.worker_drain_timeout_s
        if drain_s > 0 and self._drain_timer is None and self.get_state() == WorkerStatus.BUSY:
            logger.info("draining: the running job has %d s to finish, or goes back", drain_s)
            # A thread, not SIGALRM: RQ's horse monitor owns the alarm.
            self._drain_timer = threading.Timer(drain_s, self._drain_deadline_passed)
            self._drain_timer.daemon = True
            self._drain_timer.start()

    def _drain_deadline_passed(self) -> None:
        """The second SIGTERM, to this process: RQ's cold shutdown hands the job back."""
        logger.warning(
            "the running job did not finish within RECALIB_WORKER_DRAIN_TIMEOUT_S=%d s; "
            "handing it back to the queue",
            self.settings.worker_drain_timeout_s,
        )
        os.kill(os.getpid(), signal.SIGTERM)

    def _disarm_drain(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()

    # -- runs ------------------------------------------------------------------------------

    def work(self, *args: Any, **kwargs: Any) -> bool:
        if self.runner is not None:
            self.runner.start()  # imports torch while the worker registers and waits for jobs
        try:
            return bool(super().work(*args, **kwargs))
        finally:
            self._disarm_drain()
            if self.runner is not None:
                self.runner.close()

    def dequeue_job_and_maintain_ttl(self, *args: Any, **kwargs: Any) -> Any:
        """Take a job only once the runner is ready (its start never counts against a job)."""
        if self.runner is not None:
            self.runner.ensure()
            self.runner.wait_ready(tick=self.heartbeat, tick_s=self.settings.worker_heartbeat_s)
        return super().dequeue_job_and_maintain_ttl(*args, **kwargs)

    def execute_job(self, job: Job, queue: Queue) -> None:
        job_id = str(job.args[0]) if job.args else ""
        self._beat(state="busy", current_job=job_id)
        self._refuse_if_wrong_data_dir(job_id, job.id)
        self._horse_exit, self._horse_status = "", None
        self._who_died = "the work horse"
        if self.runner is not None:
            self.runner.ensure()
            self.runner.export()  # read by the horse forked next
        try:
            super().execute_job(job, queue)
        except SystemExit:  # cold shutdown: the horse was killed; hand the job back
            if self.runner is not None:
                self.runner.kill()  # before the record is touched: it was running the job
            reason = "the worker was shut down while running the job"
            self._reconcile(job_id, job.id, reason, handing_back=True)
            raise
        finally:
            if self._stop_requested:  # the job ended in time: the worker exits, nothing handed back
                self._disarm_drain()
            self._beat(current_job="")
        if self.runner is not None:  # a runner that died, or is past its limits, is replaced
            self.runner.after_job()
        reason = f"{self._who_died} died while running the job"
        if self._horse_exit:
            reason += f" ({self._horse_exit}; out of memory?)"
        self._reconcile(job_id, job.id, reason)

    def wait_for_horse(self) -> tuple[int | None, int | None, Any]:
        pid, status, rusage = super().wait_for_horse()
        if pid:
            self._horse_status = status
        return pid, status, rusage

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
        lost = ret_val is not None and os.WIFEXITED(ret_val)
        if self.runner is not None and lost and os.WEXITSTATUS(ret_val) == RUNNER_LOST_EXIT:
            self._who_died = "the job runner"  # the horse saw its runner die: say how it died
            self._horse_exit = self.runner.death()
        else:
            self._horse_exit = describe_wait_status(ret_val)  # None: RQ killed it, past timeout
            # the runner kills the job's process itself when the horse's connection closes
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)

    def _reconcile(
        self, job_id: str, rq_job_id: str, reason: str, *, handing_back: bool = False
    ) -> None:
        """After a horse exits: a run that did not end its job's record is ended here, by
        :func:`recalib.jobs.states.end_run` (lost, or handed back on a shutdown)."""
        how = "handed-back" if handing_back else "lost"
        unstarted = self._horse_exit or "its task failed before it began"
        seen = RunEnd(job_id, how, reason, rq_job_id=rq_job_id, unstarted_reason=unstarted)
        try:
            end_run(self.connection, self.settings, seen)
        except redis.RedisError:
            logger.exception("job %s: run not reconciled; the reaper will", job_id)

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        die_with_parent()
        super().main_work_horse(job, queue)


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
    sandbox = check_sandbox(settings.sandbox)  # fail closed: one line naming what is missing
    os.environ[SANDBOX_ENV] = f"{sandbox.level}:{','.join(sandbox.mechanisms)}"
    logger.info("sandbox %s", sandbox.describe())
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
    os.environ["RECALIB_WORKER_DEVICE"] = device  # read by the task in the horse or runner
    get_settings.cache_clear()
    settings = settings.model_copy(update={"worker_device": device})
    name = name or default_worker_name()
    runner = RunnerProcess(settings, name) if settings.worker_mode == "warm" else None
    _preload()
    beat_s = settings.worker_heartbeat_s
    worker = RecalibWorker(
        [settings.queue_name],
        name=name,
        connection=redis.Redis.from_url(redis_url(settings)),
        worker_ttl=beat_s + 15,  # RQ blocks on the queue for worker_ttl - 15 s between beats
        job_monitoring_interval=beat_s,  # beats while a horse runs
        settings=settings,
        device=device,
        runner=runner,
        sandbox=sandbox.describe(),
    )
    logger.info(
        "worker %s on %s, queue %s, %s mode",
        worker.name,
        device,
        settings.queue_name,
        settings.worker_mode,
    )
    return bool(worker.work(burst=burst, logging_level=settings.log_level))


def _preload() -> None:
    """Import the torch-free task once, here, so that each forked horse starts with it loaded."""
    import worker.runner.task  # noqa: F401
