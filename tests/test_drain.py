"""Draining a worker (Kubernetes scale-down, node drain, rollout): one SIGTERM, then
``RECALIB_WORKER_DRAIN_TIMEOUT_S`` for the running job to finish before it is handed back.

Real processes (:class:`tests.live.Stack`). Whether a job "cannot finish in time" is made
certain, not guessed from its speed: its sandboxed job process is frozen (SIGSTOP) before the
worker is told to stop, as a job stuck in one call would be; the job that finishes in time is
thawed (SIGCONT) once the worker has armed its deadline.
"""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.job_watch import job_pids, runner_pids, start_recalibrating, worker_of
from tests.live import HANG_GUARD_S, Stack, job_body, wait_for_exit, wait_for_job, wait_until

FINAL = {"succeeded", "failed", "cancelled"}
ARMED = "draining: the running job has"


@pytest.fixture(scope="module")
def stack(live_redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    with Stack(live_redis_url, tmp_path_factory.mktemp("drain"), OMP_NUM_THREADS="1") as stack:
        stack.start_api()
        yield stack


@pytest.fixture(scope="module")
def client(stack: Stack):
    with stack.client() as client:
        yield client


def freeze_job_process(stack: Stack, worker: str) -> int:
    """SIGSTOP the job process the worker's warm runner forked; its pid."""
    runners = runner_pids(stack.workers[worker].pid)
    assert len(runners) == 1, runners
    (job_pid,) = wait_until(lambda: job_pids(runners[0]), HANG_GUARD_S, "the job process")
    os.kill(job_pid, signal.SIGSTOP)
    return job_pid


def succeeded_events(client: httpx.Client, job_id: str) -> list[dict]:
    events = client.get(f"/v1/jobs/{job_id}/events").json()
    return [event for event in events if event["status"] == "succeeded"]


@pytest.mark.slow
def test_a_job_that_ends_within_the_drain_deadline_succeeds_once(
    client: httpx.Client, stack: Stack, digits_ids, longer_calibration_id
) -> None:
    stack.start_worker("patient", RECALIB_WORKER_DRAIN_TIMEOUT_S=str(int(HANG_GUARD_S)))
    ids = digits_ids | {"calibration": longer_calibration_id}
    job_id, worker = start_recalibrating(client, stack, job_body(ids, batch_size=4, seed=3))
    assert worker == "patient"
    job_pid = freeze_job_process(stack, worker)
    stack.workers[worker].signal(signal.SIGTERM)
    wait_until(lambda: ARMED in stack.workers[worker].log(), HANG_GUARD_S, "the drain to arm")
    os.kill(job_pid, signal.SIGCONT)

    done = wait_for_job(client, job_id, FINAL, timeout_s=HANG_GUARD_S)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert stack.workers.pop(worker).popen.wait(timeout=HANG_GUARD_S) == 0
    assert len(succeeded_events(client, job_id)) == 1


@pytest.mark.slow
def test_a_job_past_the_drain_deadline_is_handed_back_and_runs_once_elsewhere(
    client: httpx.Client, stack: Stack, digits_ids, longer_calibration_id
) -> None:
    stack.start_worker("hasty", RECALIB_WORKER_DRAIN_TIMEOUT_S="2")
    ids = digits_ids | {"calibration": longer_calibration_id}
    job_id, worker = start_recalibrating(client, stack, job_body(ids, batch_size=4, seed=4))
    assert worker == "hasty"
    job_pid = freeze_job_process(stack, worker)
    stack.workers[worker].signal(signal.SIGTERM)  # once, as the kubelet does

    drained = stack.workers.pop(worker)
    drained.popen.wait(timeout=HANG_GUARD_S)  # it exits on its own, before any SIGKILL
    log = drained.log()
    assert ARMED in log and "RECALIB_WORKER_DRAIN_TIMEOUT_S=2 s; handing it back" in log
    wait_for_exit(lambda: [job_pid], "the frozen job process to die with its runner")
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["attempts"] == 1, job
    messages = [e["message"] for e in client.get(f"/v1/jobs/{job_id}/events").json()]
    assert (
        "the worker was shut down while running the job (attempt 1 of 2); queued to run again"
        in messages
    )

    stack.start_worker("heir")
    done = wait_for_job(client, job_id, FINAL, timeout_s=HANG_GUARD_S)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert worker_of(stack, job_id) == "heir"
    assert len(succeeded_events(client, job_id)) == 1
