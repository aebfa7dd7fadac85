"""Warm workers with real processes: the runner that outlives jobs, and what may go wrong around it.

The worker ``w1`` recycles its runner every 3 jobs (``RECALIB_RUNNER_MAX_JOBS=3``); tests run in
file order and count on it. Faults common to both modes (killed runner, stuck batch, timeout,
warm/cold shutdown) are in ``tests/test_faults.py``, which runs in the default (warm) mode.
"""

from __future__ import annotations

import os
import re
import signal
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from recalib.jobs.records import load
from tests.job_watch import event_at, job_pids, runner_pids, running_in
from tests.live import (
    HANG_GUARD_S,
    Stack,
    create_job,
    job_body,
    session_pids,
    upload,
    wait_for_exit,
    wait_for_job,
    wait_until,
)
from tests.worker.formats_files import digit_pngs

FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def stack(live_redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    with Stack(live_redis_url, tmp_path_factory.mktemp("warm"), OMP_NUM_THREADS="1") as stack:
        stack.start_api()
        stack.start_worker("w1", RECALIB_RUNNER_MAX_JOBS="3")
        yield stack


@pytest.fixture(scope="module")
def client(stack: Stack):
    with stack.client() as client:
        yield client


def _run(client: httpx.Client, ids: dict[str, str], **options: object) -> dict:
    done = wait_for_job(client, create_job(client, job_body(ids, **options))["id"], FINAL, 180)
    assert done["status"] == "succeeded", done["error"]
    return done


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _queued(event: dict) -> bool:
    return bool(event["status"] == "queued")


def _one_runner(worker_pid: int) -> int:
    runners = wait_until(lambda: runner_pids(worker_pid), HANG_GUARD_S, "the worker's runner")
    assert len(runners) == 1, runners
    return int(runners[0])


@pytest.mark.slow
def test_jobs_share_one_warm_runner_each_in_a_sandboxed_process_of_its_own(
    client: httpx.Client, stack: Stack, digits_ids
) -> None:
    worker = stack.workers["w1"]
    runner = _one_runner(worker.pid)
    first = _run(client, digits_ids, seed=1)
    second = _run(client, digits_ids, seed=2)
    assert runner_pids(worker.pid) == [runner]  # the same runner ran both
    log = worker.log()
    assert re.search(rf"job {second['id']} attempt 1: succeeded", log)
    for done in (first, second):
        assert done["result"]["sandbox"]["level"] == "strict"
        assert set(done["result"]["sandbox"]["mechanisms"]) >= {"seccomp", "netns"}
    assert job_pids(runner) == []  # each job's process is gone with its job
    assert not _maps_torch(worker.pid)  # the worker itself never loads torch
    assert _maps_torch(runner)
    assert first["result"]["runtime"]["oom_retries"] == []


@pytest.mark.slow
def test_the_runner_is_recycled_after_its_job_limit(
    client: httpx.Client, stack: Stack, digits_ids
) -> None:
    worker = stack.workers["w1"]
    old = _one_runner(worker.pid)
    _run(client, digits_ids, seed=3)  # the third job of this runner: recycled after it
    wait_until(lambda: runner_pids(worker.pid) not in ([], [old]), HANG_GUARD_S, "a new runner")
    new = _one_runner(worker.pid)
    assert new != old
    assert "3 jobs (RECALIB_RUNNER_MAX_JOBS)" in worker.log()
    _run(client, digits_ids, seed=4)
    assert runner_pids(worker.pid) == [new]


@pytest.mark.slow
def test_a_killed_horse_takes_its_job_process_and_the_job_runs_again(
    client: httpx.Client, stack: Stack, digits_ids, long_calibration_id, record_property
) -> None:
    worker = stack.workers["w1"]
    ids = digits_ids | {"calibration": long_calibration_id}
    job_id = create_job(client, job_body(ids, batch_size=2))["id"]
    running_in(client, job_id, "recalibrating")
    runner = _one_runner(worker.pid)
    jobs = job_pids(runner)
    assert len(jobs) == 1, jobs
    horses = [p for p in session_pids(worker.pid) if p not in (worker.pid, runner, *jobs)]
    assert len(horses) == 1, horses
    seen = len(client.get(f"/v1/jobs/{job_id}/events").json())
    killed_at = time.monotonic()
    os.kill(horses[0], signal.SIGKILL)
    # Only the worker's wait on its horse queues the job again (the worker lives and beats, so
    # the reaper never takes it): had it missed the death, the job would stay running and this
    # wait fail at its guard. How soon is measured, not bounded: a busy machine delays it.
    requeued_at = event_at(client, job_id, seen, _queued, "the job to be queued again",
                           HANG_GUARD_S)  # fmt: skip
    record_property("horse_kill_to_requeued_s", round(requeued_at - killed_at, 2))
    assert runner in runner_pids(worker.pid)  # the runner holds nothing of the job: it stays
    wait_for_exit(lambda: jobs, "the job's process to be killed")
    messages = [e["message"] or "" for e in client.get(f"/v1/jobs/{job_id}/events").json()]
    assert any("work horse died" in m and "killed by SIGKILL" in m for m in messages), messages
    running_in(client, job_id, "recalibrating")
    assert client.get(f"/v1/jobs/{job_id}").json()["attempts"] == 2
    assert _one_runner(worker.pid) == runner  # the same runner runs attempt 2, in a new process
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    done = wait_for_job(client, job_id, FINAL, timeout_s=HANG_GUARD_S)
    assert done["status"] == "cancelled"
    assert worker.alive()


@pytest.mark.slow
def test_a_killed_runner_is_seen_at_once_and_takes_its_job_process(
    client: httpx.Client, stack: Stack, digits_ids, digits_case, tmp_path: Path, record_property
) -> None:
    """The job's process holds a copy of the horse's connection: the horse must not wait for
    end of file alone to learn that the runner died, and the job's process dies with it."""
    inputs, labels = digits_case.shifted_calibration
    archive = tmp_path / "digits.zip"
    pngs = digit_pngs(np.tile(inputs, (4, 1, 1, 1)), len(inputs) * 4)  # a few thousand
    with zipfile.ZipFile(archive, "w") as zipped:
        for i, png in enumerate(pngs):
            zipped.writestr(f"set/{labels[i % len(labels)]}/img{i:05d}.png", png)
    ids = {"model": digits_ids["model"], "calibration": upload(client, archive)}
    body = job_body(ids, batch_size=2, preprocess={"mode": "L"})
    job_id = create_job(client, body)["id"]
    running_in(client, job_id, "recalibrating")
    worker = stack.workers["w1"]
    runner = _one_runner(worker.pid)
    jobs = job_pids(runner)
    assert len(jobs) == 1, jobs
    seen = len(client.get(f"/v1/jobs/{job_id}/events").json())
    killed_at = time.monotonic()
    os.kill(runner, signal.SIGKILL)
    requeued_at = event_at(client, job_id, seen, _queued, "the job to be queued again",
                           HANG_GUARD_S)  # fmt: skip
    took_s = requeued_at - killed_at
    record_property("runner_kill_to_requeued_s", round(took_s, 2))
    # "At once" is the point: the horse asks every 0.5 s whether its runner lives (0.2-0.6 s
    # measured, also at a load average of 12 on 2 cores). What this tells it from is waiting for
    # end of file, which processes forked from the job's (DataLoader workers) delay by torch's
    # 5 s watchdog (5.2 s measured before fbbaaf2). A busy machine never shortens that wait: a
    # bound just under it leaves a busy machine the most room and still tells the two apart.
    assert took_s < 4.5, f"{took_s:.1f} s"
    wait_for_exit(lambda: jobs, "the job's process to die with its runner")
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
    wait_for_job(client, job_id, FINAL, timeout_s=HANG_GUARD_S)


@pytest.mark.slow
def test_the_runner_and_horse_die_with_their_worker(
    client: httpx.Client, stack: Stack, digits_ids, long_calibration_id, record_property
) -> None:
    worker = stack.workers["w1"]
    ids = digits_ids | {"calibration": long_calibration_id}
    job_id = create_job(client, job_body(ids, batch_size=2, seed=5))["id"]
    running_in(client, job_id, "recalibrating")
    children = [p for p in session_pids(worker.pid) if p != worker.pid]
    assert len(children) >= 2  # the runner and the horse
    killed_at = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL)  # the worker alone, not its session
    # The ends themselves are waited for (a busy machine delays them: 10 s once was not enough
    # at a load average of 5-6), and measured; the reaper's bound is test_faults' subject.
    gone_at = wait_for_exit(lambda: session_pids(worker.pid), "the runner and horse to die")
    record_property("worker_kill_to_children_gone_s", round(gone_at - killed_at, 2))

    def left_running() -> bool:
        return client.get(f"/v1/jobs/{job_id}").json()["status"] != "running"

    wait_until(left_running, HANG_GUARD_S, "the reaper to recover the job")
    record_property("worker_kill_to_recovered_s", round(time.monotonic() - killed_at, 2))
    stored = load(stack.conn, job_id)
    assert stored is not None and stored.record.status.value == "queued"
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    stack.workers.pop("w1").stop()


@pytest.mark.slow
def test_a_fork_mode_worker_runs_each_job_in_a_one_shot_runner(
    client: httpx.Client, stack: Stack, digits_ids
) -> None:
    worker = stack.start_worker("f1", RECALIB_WORKER_MODE="fork")
    done = _run(client, digits_ids, seed=6)
    assert load(stack.conn, done["id"]).record.worker == "f1"  # type: ignore[union-attr]
    assert runner_pids(worker.pid) == []  # no runner of its own: each horse starts one
    assert "fork mode" in worker.log()
    assert "ready (sandbox strict" in worker.log()
    assert done["result"]["sandbox"]["level"] == "strict"
    assert not _maps_torch(worker.pid)  # neither worker nor horse loads torch
