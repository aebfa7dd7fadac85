"""worker.runner.task: one run of a job against a real Valkey, the real file store and pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from recalib import layout
from recalib.contract import JobCreate, JobRecord, JobStatus
from recalib.jobs import states
from recalib.jobs.job_store import JobStore
from recalib.jobs.records import load
from recalib.settings import Settings
from tests.worker.stored_files import store_files
from worker.runner.task import JobRun


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, data_dir=tmp_path, job_max_attempts=2)


def _start(conn, settings: Settings, job_id: str, worker: str) -> JobRecord:
    stored = load(conn, job_id)
    assert stored is not None
    record = states.start_run(conn, job_id, stored.rq_job_id, worker, settings.job_max_attempts)
    assert record is not None
    return record


@pytest.mark.slow
def test_a_superseded_run_finishing_first_leaves_the_live_run_its_success(
    redis_conn, settings: Settings, digits_files: dict[str, Path]
) -> None:
    """A run whose worker was declared dead (but was only slow) finishes before the new run."""
    ids = store_files(redis_conn, settings, digits_files)
    request = JobCreate(model_file=ids["model"], calibration_file=ids["calibration"])
    record, _ = JobStore(redis_conn, settings).create("default", request)
    first = _start(redis_conn, settings, record.id, "w1")
    states.recover_run(redis_conn, settings, record.id, reason="worker w1 died")
    second = _start(redis_conn, settings, record.id, "w2")
    assert (first.attempts, second.attempts) == (1, 2)

    JobRun(redis_conn, settings, first).execute()  # the stale run completes its work first
    stored = load(redis_conn, record.id)
    assert stored is not None and stored.record.status == JobStatus.running  # untouched
    assert not layout.attempt_dir(settings.data_dir, record.id, 1).exists()

    JobRun(redis_conn, settings, second).execute()
    done = load(redis_conn, record.id)
    assert done is not None, "job record vanished"
    assert done.record.status == JobStatus.succeeded, done.record.error
    assert done.record.output_attempt == 2
    out = layout.attempt_dir(settings.data_dir, record.id, 2)
    assert done.record.result is not None
    assert (out / done.record.result.checkpoint.file).is_file()
    assert (out / "report.json").is_file()
    assert not (out / "inputs").exists()
    assert not out.with_name("attempt-2.inputs").exists()
    job_dir = layout.job_dir(settings.data_dir, record.id)
    assert sorted(p.name for p in job_dir.iterdir()) == ["attempt-2"]
