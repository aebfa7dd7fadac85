"""The warm runner process (worker/runner/warm.py) and the worker's handle on it (supervise.py),
with a real Valkey, real files and real processes; this test plays the work horse's part.

- jobs through the runner's socket end their records, each in a fresh sandboxed process;
- a trusted side that goes away mid-job has the job's process killed at once (no unsupervised
  job), and the runner takes the next job;
- the runner dies with its worker (``PR_SET_PDEATHSIG``);
- recycling after ``RECALIB_RUNNER_MAX_JOBS`` jobs or past ``RECALIB_RUNNER_MAX_RSS_MB``, and
  replacement of a runner that died;
- the worker's side imports no torch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from recalib.contract import JobCreate, JobOptions, JobSpec, JobStatus
from recalib.jobs.job_store import JobStore
from recalib.jobs.records import load
from recalib.settings import Settings
from tests.live import REPO_ROOT, wait_until
from tests.worker.stored_files import store_files
from worker.runner.protocol import (
    SOCKET_ENV,
    JobRequest,
    LineReader,
    encode_request,
    read_line,
    send_line,
)
from worker.runner.supervise import RunnerProcess
from worker.runner.task import JobRun, start
from worker.sandbox.confine import JobConfinement

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


def _spec_request(tmp_path: Path, files: dict[str, Path], **options: object) -> JobRequest:
    """A job's request as a trusted side would send it, for files already in ``tmp_path``."""
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir()
    scratch.mkdir()
    spec = JobSpec(
        model_path=str(files["model"]),
        calibration_path=str(files["calibration"]),
        options=JobOptions.model_validate(options),
        out_dir=str(out),
    )
    inputs = tuple(str(files[role]) for role in ("model", "calibration"))
    confinement = JobConfinement(inputs=inputs, out_dir=str(out), tmp_dir=str(scratch))
    return JobRequest(spec=spec.model_dump(mode="json"), confinement=confinement, level="strict")


@pytest.mark.slow
def test_jobs_through_the_socket_end_their_records(
    redis_conn, settings: Settings, runner: RunnerProcess, digits_files, monkeypatch
) -> None:
    monkeypatch.setenv(SOCKET_ENV, str(runner.socket_path))
    for seed in (1, 2):  # the second job reuses the runner; its process is a fresh fork
        job_id, rq_job_id = _job(redis_conn, settings, digits_files, seed=seed)
        record = start(redis_conn, settings, job_id, rq_job_id)
        assert record is not None
        JobRun(redis_conn, settings, record).execute()
        stored = load(redis_conn, job_id)
        assert stored is not None
        assert stored.record.status == JobStatus.succeeded, stored.record.error
        assert stored.record.result is not None and stored.record.result.sandbox is not None
        assert stored.record.result.sandbox.level == "strict"
    assert runner.alive()


@pytest.mark.slow
def test_a_garbled_request_is_ignored(runner: RunnerProcess) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(runner.socket_path))
        sock.sendall(b"not json\n")
        assert read_line(sock) is None  # closed without an answer
    assert runner.alive()


@pytest.mark.slow
def test_a_trusted_side_that_goes_away_mid_job_has_its_job_killed(
    runner: RunnerProcess, digits_files, digits_case, tmp_path
) -> None:
    long = tmp_path / "long.npz"  # 40,000 samples at batch_size 2: minutes of recalibration
    np.savez(long, inputs=np.tile(digits_case.shifted_calibration[0], (112, 1, 1, 1))[:40_000])
    request = _spec_request(tmp_path, {"model": digits_files["model"], "calibration": long},
                            batch_size=2)  # fmt: skip
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(runner.socket_path))
    send_line(sock, encode_request(request))
    reader, pid, phase = LineReader(sock), None, None
    while phase != "recalibrating":
        event = reader.read()
        assert event is not None and event.get("event") != "exit", event
        pid = event.get("pid", pid)
        phase = (event.get("progress") or {}).get("phase", phase)
    assert pid is not None and _alive(pid)
    sock.close()  # what the kernel does when the horse is SIGKILLed
    wait_until(lambda: not _alive(pid), 10, f"job process {pid} to be killed")
    assert runner.alive()  # the runner holds nothing of the job: it stays
    again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with again:
        again.connect(str(runner.socket_path))  # and takes the next job


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
def test_recycled_after_max_jobs_or_memory_and_replaced_when_it_died(
    settings: Settings,
) -> None:
    process = RunnerProcess(settings.model_copy(update={"runner_max_jobs": 2}), WORKER)
    process.start()
    try:
        first = process.pid
        process.after_job()
        assert process.pid == first  # one job of two
        process.after_job()
        second = process.pid
        assert second != first and process.jobs == 0 and not _alive(first)

        assert process.wait_ready(tick=lambda: None, tick_s=1.0)
        process.settings = settings.model_copy(update={"runner_max_rss_mb": 1})
        process.after_job()  # any runner holds more than 1 MiB
        third = process.pid
        assert third != second and not _alive(second)

        process.settings = settings
        assert third is not None
        os.kill(third, signal.SIGKILL)
        wait_until(lambda: not _alive(third), 10, "the runner to die")
        process.after_job()  # it died: replaced
        assert process.pid != third and process.alive()
        assert process.starts == 4
    finally:
        process.close()
    assert not process.alive()


def test_the_worker_side_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import worker.runner.process, worker.runner.task, worker.runner.client\n"
        "import worker.runner.sandboxed, worker.sandbox.levels\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"
    )
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_a_runner_socket_dir_left_by_a_killed_worker_is_removed(settings: Settings) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is now free: a worker that died without closing its runner
    stale = Path(tempfile.gettempdir()) / f"recalib-runner-{dead.pid}-left"
    stale.mkdir()
    (stale / "runner.sock").touch()
    process = RunnerProcess(settings, WORKER)
    try:
        assert process.socket_path.parent.name.startswith(f"recalib-runner-{os.getpid()}-")
        assert not stale.exists()
    finally:
        process.close()
    assert not process.socket_path.parent.exists()


def test_a_deep_tmpdir_still_gives_a_usable_socket_path(settings, tmp_path, monkeypatch) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    process = RunnerProcess(settings, WORKER)
    try:
        assert len(str(process.socket_path)) <= 107  # sun_path: 108 bytes with its NUL
        process.start()
        assert process.wait_ready(tick=lambda: None, tick_s=1.0)
    finally:
        process.close()
