"""The warm runner process (worker/runner/warm.py) and the worker's handle on it (supervise.py),
with a real Valkey, real files and real processes; this test plays the work horse's part.

- a run through the runner's socket ends the job's record as the in-process task would;
- a horse that goes away mid-run makes the runner exit at once (no unsupervised run);
- the runner dies with its worker (``PR_SET_PDEATHSIG``);
- recycling after ``RECALIB_RUNNER_MAX_JOBS`` jobs or past ``RECALIB_RUNNER_MAX_RSS_MB``, and
  replacement after an unclean run;
- the worker's side imports no torch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from recalib.contract import JobCreate, JobOptions, JobStatus
from recalib.jobs.job_store import JobStore
from recalib.jobs.records import load
from recalib.settings import Settings
from tests.live import REPO_ROOT, wait_until
from tests.worker.stored_files import store_files
from worker.runner.protocol import HORSE_GONE_EXIT, read_line, send_line
from worker.runner.supervise import RunnerProcess

WORKER = "w-test"


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings, also in the environment the runner inherits."""
    env = {
        "RECALIB_REDIS_URL": redis_url,
        "RECALIB_DATA_DIR": str(tmp_path / "data"),
        "RECALIB_WORKER_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(redis_url=redis_url, data_dir=tmp_path / "data")


@pytest.fixture
def runner(settings: Settings) -> Iterator[RunnerProcess]:
    process = RunnerProcess(settings, WORKER)
    process.start()
    try:
        assert process.wait_ready(tick=lambda: None, tick_s=1.0)
        yield process
    finally:
        process.close()


def _job(conn, settings: Settings, files: dict[str, Path], **options: object) -> tuple[str, str]:
    ids = store_files(conn, settings, files)
    request = JobCreate(
        model_file=ids["model"],
        calibration_file=ids["calibration"],
        eval_file=ids.get("evaluation"),
        options=JobOptions.model_validate(options),
    )
    record, _ = JobStore(conn, settings).create("default", request)
    stored = load(conn, record.id)
    assert stored is not None and stored.rq_job_id
    return record.id, stored.rq_job_id


def _ask(runner: RunnerProcess, job_id: str, rq_job_id: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(runner.socket_path))
    send_line(sock, {"job_id": job_id, "rq_job_id": rq_job_id, "worker": WORKER})
    return sock


@pytest.mark.slow
def test_a_run_through_the_socket_ends_the_record(
    redis_conn, settings: Settings, runner: RunnerProcess, digits_files
) -> None:
    for seed in (1, 2):  # the second run reuses the runner (and its cached model)
        job_id, rq_job_id = _job(redis_conn, settings, digits_files, seed=seed)
        with _ask(runner, job_id, rq_job_id) as sock:
            assert read_line(sock) == {"ok": True}
        stored = load(redis_conn, job_id)
        assert stored is not None
        assert stored.record.status == JobStatus.succeeded, stored.record.error
        assert (stored.record.worker, stored.record.attempts) == (WORKER, 1)
    assert runner.alive()


@pytest.mark.slow
def test_a_request_for_a_job_that_is_not_queued_changes_nothing(
    redis_conn, settings: Settings, runner: RunnerProcess, digits_files
) -> None:
    job_id, _ = _job(redis_conn, settings, digits_files)
    with _ask(runner, job_id, "another-run") as sock:  # a stale run of the job
        assert read_line(sock) == {"ok": True}
    stored = load(redis_conn, job_id)
    assert stored is not None and stored.record.status == JobStatus.queued
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # garbage: ignored
        sock.connect(str(runner.socket_path))
        sock.sendall(b"not json\n")
        assert read_line(sock) is None
    assert runner.alive()


@pytest.mark.slow
def test_a_horse_that_goes_away_mid_run_takes_the_runner_with_it(
    redis_conn, settings: Settings, runner: RunnerProcess, digits_files, digits_case, tmp_path
) -> None:
    long = tmp_path / "long.npz"  # 40,000 samples at batch_size 2: minutes of recalibration
    np.savez(long, inputs=np.tile(digits_case.shifted_calibration[0], (112, 1, 1, 1))[:40_000])
    files = digits_files | {"calibration": long}
    job_id, rq_job_id = _job(redis_conn, settings, files, batch_size=2)
    sock = _ask(runner, job_id, rq_job_id)

    def recalibrating() -> bool:
        stored = load(redis_conn, job_id)
        return stored is not None and stored.record.progress.phase.value == "recalibrating"

    wait_until(recalibrating, 90, "the run to recalibrate")
    sock.close()  # what the kernel does when the horse is SIGKILLed
    assert runner.popen is not None
    assert runner.popen.wait(timeout=15) == HORSE_GONE_EXIT
    assert runner.death() == f"exit status {HORSE_GONE_EXIT}"
    stored = load(redis_conn, job_id)
    assert stored is not None and stored.record.status == JobStatus.running  # the worker's call
    started = time.monotonic()
    late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with late, pytest.raises(ConnectionRefusedError):  # the next horse learns it at once
        late.connect(str(runner.socket_path))
    assert time.monotonic() - started < 1.0


PARENT = """
import sys, time
from recalib.settings import Settings
from worker.runner.supervise import RunnerProcess
runner = RunnerProcess(Settings(), "orphan-test")
runner.start()
assert runner.wait_ready(tick=lambda: None, tick_s=1.0)
print(runner.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_the_runner_dies_with_its_worker(settings: Settings) -> None:
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        runner_pid = int(parent.stdout.readline())
        assert Path(f"/proc/{runner_pid}").exists()
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        wait_until(lambda: not _alive(runner_pid), 10, f"runner {runner_pid} to die")
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_recycled_after_max_jobs_or_memory_and_replaced_after_an_unclean_run(
    settings: Settings,
) -> None:
    process = RunnerProcess(settings.model_copy(update={"runner_max_jobs": 2}), WORKER)
    process.start()
    try:
        first = process.pid
        process.after_job(clean=True)
        assert process.pid == first  # one job of two
        process.after_job(clean=True)
        second = process.pid
        assert second != first and process.jobs == 0 and not _alive(first)

        assert process.wait_ready(tick=lambda: None, tick_s=1.0)
        process.settings = settings.model_copy(update={"runner_max_rss_mb": 1})
        process.after_job(clean=True)  # any runner holds more than 1 MiB
        third = process.pid
        assert third != second and not _alive(second)

        process.settings = settings
        process.after_job(clean=False)  # its horse was killed: the run may still go on
        assert process.pid != third and not _alive(third) and process.alive()
        assert process.starts == 4
    finally:
        process.close()
    assert not process.alive()


def test_the_worker_side_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import worker.runner.process, worker.runner.task, worker.runner.proxy\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"
    )
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
