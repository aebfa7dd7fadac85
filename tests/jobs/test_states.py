"""recalib.jobs.states on a real Valkey: every transition; a stale writer changes nothing."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from rq.job import Job

from recalib.contract import (
    Artifact,
    CalibrationSummary,
    DataSplit,
    Estimator,
    JobCreate,
    JobError,
    JobOptions,
    JobRecord,
    JobStatus,
    Phase,
    Progress,
    Report,
    Verdict,
)
from recalib.ids import new_job_id
from recalib.jobs import states
from recalib.jobs.records import JOB_TIMEOUT, Stored, load, update_record, utcnow
from recalib.keys import ACTIVE_KEY, FINISHED_KEY
from recalib.settings import Settings

MODEL = "f_" + "m" * 22
CALIB = "f_" + "c" * 22


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(redis_url="redis://unused", data_dir=tmp_path, job_max_attempts=2)


@pytest.fixture
def conn(redis_conn):
    return redis_conn


def _queued(conn, settings: Settings, tenant: str = "default") -> JobRecord:
    record = JobRecord(
        id=new_job_id(),
        status=JobStatus.queued,
        created_at=utcnow(),
        request=JobCreate(model_file=MODEL, calibration_file=CALIB),
        tenant=tenant,
    )
    assert states.create(conn, settings, record, seq=1, idem=None) is None
    return record


def _stored(conn, job_id: str) -> Stored:
    stored = load(conn, job_id)
    assert stored is not None
    return stored


def _running(conn, settings: Settings, worker: str = "w1") -> tuple[JobRecord, str]:
    record = _queued(conn, settings)
    rq_job_id = _stored(conn, record.id).rq_job_id
    started = states.start_run(conn, record.id, rq_job_id, worker, settings.job_max_attempts)
    assert started is not None
    return started, str(rq_job_id)


def minimal_report() -> Report:
    """A valid report (what a succeeded run records); its numbers do not matter here."""
    return Report(
        recalib_version="test",
        model_format="pt2",
        bn_layers=1,
        skipped_layers=[],
        calibration=CalibrationSummary(
            samples=2, batches=1, available_samples=2, estimator=Estimator.population
        ),
        before=None,
        after=None,
        prediction_change=None,
        verdict=Verdict.unknown,
        layers=[],
        checkpoint=Artifact(file="m.pt2", format="pt2", sha256="0" * 64, bytes=1),
        data=DataSplit(calibration_file="c.npz", eval_file=None),
        options=JobOptions(),
        device="cpu",
        timings_s={},
    )


# -- created / queued ---------------------------------------------------------------------


def test_create_stores_queued_and_enqueues_one_run(conn, settings: Settings) -> None:
    record = _queued(conn, settings)
    stored = _stored(conn, record.id)
    assert stored.record.status == JobStatus.queued
    assert conn.sismember(ACTIVE_KEY, record.id)
    job = Job.fetch(str(stored.rq_job_id), connection=conn)
    assert job.args == (record.id,) and job.get_status() == "queued"


def test_create_with_a_used_idempotency_key_returns_the_earlier_job(
    conn, settings: Settings
) -> None:
    first = JobRecord(
        id=new_job_id(),
        status=JobStatus.queued,
        created_at=utcnow(),
        request=JobCreate(model_file=MODEL, calibration_file=CALIB),
        tenant="default",
    )
    second = first.model_copy(update={"id": new_job_id()})
    assert states.create(conn, settings, first, seq=1, idem="recalib:test:idem") is None
    earlier = states.create(conn, settings, second, seq=2, idem="recalib:test:idem")
    assert earlier is not None and earlier.record.id == first.id
    assert load(conn, second.id) is None  # nothing of the second was written


def test_start_run_takes_only_a_queued_job_on_its_current_run(conn, settings: Settings) -> None:
    record = _queued(conn, settings)
    rq_job_id = _stored(conn, record.id).rq_job_id
    assert states.start_run(conn, record.id, "stale_run", "w1", 2) is None
    started = states.start_run(conn, record.id, rq_job_id, "w1", 2)
    assert started is not None
    assert (started.status, started.attempts, started.worker) == (JobStatus.running, 1, "w1")
    assert started.progress.phase == Phase.loading and started.started_at is not None
    assert states.start_run(conn, record.id, rq_job_id, "w2", 2) is None  # already running


def test_cancel_queued_ends_it_and_its_run_can_no_longer_start(conn, settings: Settings) -> None:
    record = _queued(conn, settings)
    rq_job_id = _stored(conn, record.id).rq_job_id
    cancelled = states.cancel_queued(conn, record.id)
    assert cancelled is not None and cancelled.status == JobStatus.cancelled
    assert cancelled.finished_at is not None
    assert not conn.sismember(ACTIVE_KEY, record.id)
    assert conn.zscore(FINISHED_KEY, record.id) is not None
    assert states.start_run(conn, record.id, rq_job_id, "w1", 2) is None
    assert states.cancel_queued(conn, record.id) is None


def test_requeue_lost_gives_a_queued_job_a_new_run(conn, settings: Settings) -> None:
    record = _queued(conn, settings)
    stored = _stored(conn, record.id)
    assert states.requeue_lost(conn, settings, stored, "the queued run was lost")
    new_rq = _stored(conn, record.id).rq_job_id
    assert new_rq != stored.rq_job_id
    assert Job.fetch(str(new_rq), connection=conn).get_status() == "queued"
    assert not states.requeue_lost(conn, settings, stored, "again")  # its run changed since


def test_fail_unstarted_fails_only_the_same_queued_run(conn, settings: Settings) -> None:
    record = _queued(conn, settings)
    stored = _stored(conn, record.id)
    other = Stored(record=stored.record, rq_job_id="other_run", cancel_at=None)
    assert states.fail_unstarted(conn, other, "exit status 1") is None
    failed = states.fail_unstarted(conn, stored, "exit status 1")
    assert failed is not None and failed.status == JobStatus.failed
    assert failed.error is not None and "exit status 1" in failed.error.message


# -- running ------------------------------------------------------------------------------


def test_record_progress_only_by_the_run_that_owns_the_job(conn, settings: Settings) -> None:
    record, _ = _running(conn, settings)
    progress = Progress(phase=Phase.recalibrating, done=3, total=10)
    assert states.record_progress(conn, record.id, 2, "w1", progress, event=True) is None
    assert states.record_progress(conn, record.id, 1, "w9", progress, event=True) is None
    updated = states.record_progress(conn, record.id, 1, "w1", progress, event=False)
    assert updated is not None and updated.progress == progress


def test_request_cancel_marks_running_as_cancelling(conn, settings: Settings) -> None:
    record, _ = _running(conn, settings)
    cancelling = states.request_cancel(conn, record.id)
    assert cancelling is not None and cancelling.status == JobStatus.cancelling
    assert _stored(conn, record.id).cancel_at is not None
    assert states.request_cancel(conn, record.id) is None  # already cancelling


def test_finish_run_publishes_the_owning_attempt(conn, settings: Settings) -> None:
    record, _ = _running(conn, settings)
    done = states.finish_run(conn, record.id, 1, "w1", JobStatus.succeeded, result=minimal_report())
    assert done is not None and done.status == JobStatus.succeeded
    assert done.output_attempt == 1 and done.progress.phase == Phase.done
    assert done.result is not None and done.finished_at is not None
    again = states.finish_run(conn, record.id, 1, "w1", JobStatus.failed)
    assert again is None  # final: nothing changes it


def test_finish_run_of_a_superseded_run_changes_nothing(conn, settings: Settings) -> None:
    record, rq_job_id = _running(conn, settings)
    states.recover_run(conn, settings, record.id, reason="worker w1 died", rq_job_id=rq_job_id)
    new_rq = _stored(conn, record.id).rq_job_id
    second = states.start_run(conn, record.id, new_rq, "w2", settings.job_max_attempts)
    assert second is not None and second.attempts == 2
    stale = states.finish_run(
        conn, record.id, 1, "w1", JobStatus.succeeded, result=minimal_report()
    )
    assert stale is None
    assert _stored(conn, record.id).record.status == JobStatus.running
    live = states.finish_run(conn, record.id, 2, "w2", JobStatus.succeeded, result=minimal_report())
    assert live is not None and live.output_attempt == 2


def test_finish_run_of_a_cancelling_job(conn, settings: Settings) -> None:
    failing, _ = _running(conn, settings)
    states.request_cancel(conn, failing.id)
    error = JobError(type="invalid-data", message="bad")
    ended = states.finish_run(conn, failing.id, 1, "w1", JobStatus.failed, error=error)
    assert ended is not None and ended.status == JobStatus.cancelled and ended.error is None
    succeeding, _ = _running(conn, settings)
    states.request_cancel(conn, succeeding.id)
    done = states.finish_run(
        conn, succeeding.id, 1, "w1", JobStatus.succeeded, result=minimal_report()
    )
    assert done is not None and done.status == JobStatus.succeeded  # the work was done


def test_recover_run_requeues_while_runs_are_left_then_fails(conn, settings: Settings) -> None:
    record, rq_job_id = _running(conn, settings)
    assert states.recover_run(conn, settings, record.id, reason="x", rq_job_id="other") is None
    requeued = states.recover_run(conn, settings, record.id, reason="w1 died", rq_job_id=rq_job_id)
    assert requeued is not None and requeued.status == JobStatus.queued
    assert requeued.worker is None and requeued.started_at is None
    new_rq = _stored(conn, record.id).rq_job_id
    assert new_rq != rq_job_id
    assert Job.fetch(str(new_rq), connection=conn).get_status() == "queued"
    states.start_run(conn, record.id, new_rq, "w2", settings.job_max_attempts)
    failed = states.recover_run(conn, settings, record.id, reason="w2 died")
    assert failed is not None and failed.status == JobStatus.failed
    assert failed.error is not None and failed.error.type == states.WORKER_DIED
    assert "attempt 2 of 2" in failed.error.message


def test_recover_run_of_a_cancelling_job_cancels_it(conn, settings: Settings) -> None:
    record, _ = _running(conn, settings)
    states.request_cancel(conn, record.id)
    ended = states.recover_run(conn, settings, record.id, reason="horse killed")
    assert ended is not None and ended.status == JobStatus.cancelled


def test_recover_run_past_the_timeout_fails_it_as_timed_out(conn, settings: Settings) -> None:
    record, _ = _running(conn, settings)

    def started_long_ago(stored: Stored) -> JobRecord:
        stored.record.started_at = utcnow() - timedelta(seconds=settings.job_timeout_s + 1)
        return stored.record

    update_record(conn, record.id, started_long_ago, event=False)
    ended = states.recover_run(conn, settings, record.id, reason="horse killed")
    assert ended is not None and ended.status == JobStatus.failed
    assert ended.error is not None and ended.error.type == JOB_TIMEOUT
