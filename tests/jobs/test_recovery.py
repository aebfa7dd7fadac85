"""recalib.jobs.recovery on a real Valkey: dead workers, lost runs, cancels, lock, retention."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rq.job import Job
from rq.job import JobStatus as RqStatus

from recalib import layout
from recalib.contract import FileRecord, JobCreate, JobRecord, JobStatus
from recalib.errors import NotFoundError
from recalib.jobs import recovery as reaper_module
from recalib.jobs import workers
from recalib.jobs.job_store import JobStore
from recalib.jobs.records import Stored, load, update_record, utcnow
from recalib.jobs.recovery import Reaper
from recalib.keys import REAPER_LOCK_KEY, job_key
from recalib.settings import Settings
from service import background

MODEL = "f_" + "m" * 22
CALIB = "f_" + "c" * 22


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        redis_url="redis://unused",
        data_dir=tmp_path,
        worker_heartbeat_s=1,
        job_max_attempts=2,
        job_timeout_s=600,
        retention_s=3600,
    )


@pytest.fixture
def store(redis_conn, settings: Settings) -> JobStore:
    return JobStore(redis_conn, settings)


@pytest.fixture
def reaper(redis_conn, settings: Settings) -> Reaper:
    return Reaper(redis_conn, settings)


def _job(store: JobStore, *, attempts: int = 1, started_ago_s: float = 1.0) -> JobRecord:
    """A job whose run started on worker w1 (as the worker's task marks it)."""
    record, _ = store.create("default", JobCreate(model_file=MODEL, calibration_file=CALIB))

    def start(stored: Stored) -> JobRecord:
        stored.record.status, stored.record.attempts = JobStatus.running, attempts
        stored.record.worker = "w1"
        stored.record.started_at = utcnow() - timedelta(seconds=started_ago_s)
        return stored.record

    return update_record(store.conn, record.id, start) or record


def _worker_alive(conn, current_job: str) -> None:
    workers.beat(conn, "w1", 30, device="cpu", state="busy", current_job=current_job)


def test_a_run_of_a_dead_worker_is_queued_again(store: JobStore, reaper: Reaper) -> None:
    record = _job(store, attempts=1)
    old_rq = load(store.conn, record.id).rq_job_id  # type: ignore[union-attr]
    assert reaper.run_once() == [record.id]
    stored = load(store.conn, record.id)
    assert stored is not None and stored.record.status == JobStatus.queued
    assert stored.record.attempts == 1 and stored.record.worker is None
    assert stored.rq_job_id != old_rq
    assert Job.fetch(stored.rq_job_id, connection=store.conn).get_status() == RqStatus.QUEUED
    message = store.events("default", record.id)[-1].message
    assert message == "worker w1 died while running the job (attempt 1 of 2); queued to run again"
    assert reaper.run_once() == []  # idempotent


def test_the_last_attempt_of_a_dead_worker_fails(store: JobStore, reaper: Reaper) -> None:
    record = _job(store, attempts=2)
    assert reaper.run_once() == [record.id]
    failed = store.get("default", record.id)
    assert failed.status == JobStatus.failed and failed.finished_at is not None
    assert failed.error is not None and failed.error.type == "worker-died"
    assert failed.error.message == "worker w1 died while running the job (attempt 2 of 2)"
    assert store.counts_by_status()[JobStatus.failed] == 1


def test_a_live_worker_on_the_job_is_left_alone(store: JobStore, reaper: Reaper) -> None:
    record = _job(store)
    _worker_alive(store.conn, record.id)
    assert reaper.run_once() == []
    assert store.get("default", record.id).status == JobStatus.running
    _worker_alive(store.conn, "")  # the worker lives but moved on: its horse died
    assert reaper.run_once() == [record.id]
    assert store.get("default", record.id).status == JobStatus.queued


def test_a_run_past_the_job_timeout_fails_with_the_setting_named(
    store: JobStore, redis_conn, settings: Settings
) -> None:
    record = _job(store, started_ago_s=700)
    assert Reaper(redis_conn, settings).run_once() == [record.id]
    error = store.get("default", record.id).error
    assert error is not None and error.type == "job-timeout"
    assert "RECALIB_JOB_TIMEOUT_S (600 s)" in error.message


def test_cancelling_job_of_a_dead_worker_ends_cancelled(store: JobStore, reaper: Reaper) -> None:
    record = _job(store)
    assert store.cancel("default", record.id).status == JobStatus.cancelling
    assert reaper.run_once() == [record.id]
    assert store.get("default", record.id).status == JobStatus.cancelled


def test_a_run_that_ignores_its_cancel_gets_rqs_stop_command(
    store: JobStore, reaper: Reaper
) -> None:
    record = _job(store)
    _worker_alive(store.conn, record.id)
    store.cancel("default", record.id)
    rq_job_id = load(store.conn, record.id).rq_job_id  # type: ignore[union-attr]
    store.conn.hset(f"rq:job:{rq_job_id}", "worker_name", "w1")  # RQ's record of who runs it
    pubsub = store.conn.pubsub()
    pubsub.subscribe("rq:pubsub:w1")
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    assert reaper.run_once() == []  # within the grace period: the worker may stop by itself
    assert pubsub.get_message(timeout=0.2) is None
    store.conn.hset(job_key(record.id), "cancel_at", repr(time.time() - 10))
    reaper.run_once()
    message = pubsub.get_message(timeout=2)
    assert message is not None
    assert json.loads(message["data"]) == {"command": "stop-job", "job_id": rq_job_id}
    pubsub.close()


def test_a_lost_queued_run_is_enqueued_again(
    store: JobStore, reaper: Reaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept, _ = store.create("default", JobCreate(model_file=MODEL, calibration_file=CALIB))
    lost, _ = store.create("default", JobCreate(model_file=MODEL, calibration_file=CALIB))
    lost_rq = load(store.conn, lost.id).rq_job_id  # type: ignore[union-attr]
    Job.fetch(lost_rq, connection=store.conn).delete()  # e.g. Redis lost it
    assert reaper.run_once() == []  # just queued: within QUEUED_GRACE_S
    monkeypatch.setattr(reaper_module, "QUEUED_GRACE_S", 0.0)
    assert reaper.run_once() == [lost.id]
    stored = load(store.conn, lost.id)
    assert stored is not None and stored.record.status == JobStatus.queued
    assert Job.fetch(stored.rq_job_id, connection=store.conn).get_status() == RqStatus.QUEUED
    assert store.get("default", kept.id).status == JobStatus.queued
    assert store.queue_depth() == 2


def test_one_pass_at_a_time_across_replicas(store: JobStore, reaper: Reaper) -> None:
    record = _job(store)
    other_replica = store.conn.lock(REAPER_LOCK_KEY, timeout=30)
    assert other_replica.acquire(blocking=False)
    assert reaper.run_once() == []
    assert store.get("default", record.id).status == JobStatus.running
    other_replica.release()
    assert reaper.run_once() == [record.id]


def _finish(store: JobStore, job_id: str, ago_s: float) -> None:
    def mutate(stored: Stored) -> JobRecord:
        stored.record.status = JobStatus.failed
        stored.record.finished_at = utcnow() - timedelta(seconds=ago_s)
        return stored.record

    update_record(store.conn, job_id, mutate)


def _upload(data_dir: Path, file_id: str, age_s: float) -> None:
    created = datetime.now(UTC) - timedelta(seconds=age_s)
    record = FileRecord(
        id=file_id, filename="x.npz", bytes=1, sha256="0" * 64, created_at=created, tenant="t"
    )
    layout.files_dir(data_dir).mkdir(parents=True, exist_ok=True)
    layout.file_path(data_dir, file_id).write_bytes(b"x")
    layout.file_meta_path(data_dir, file_id).write_text(record.model_dump_json())


def test_retention_deletes_old_jobs_and_files_not_in_use(
    store: JobStore, reaper: Reaper, settings: Settings
) -> None:
    old, _ = store.create("default", JobCreate(model_file=MODEL, calibration_file=CALIB))
    recent, _ = store.create("default", JobCreate(model_file=MODEL, calibration_file=CALIB))
    _finish(store, old.id, ago_s=7200)
    _finish(store, recent.id, ago_s=60)
    layout.attempt_dir(settings.data_dir, old.id, 1).mkdir(parents=True)
    old_file, used_file = "f_" + "o" * 22, CALIB
    active, _ = store.create("default", JobCreate(model_file=MODEL, calibration_file=used_file))
    for file_id in (old_file, used_file):
        _upload(settings.data_dir, file_id, age_s=7200)
    _upload(settings.data_dir, MODEL, age_s=60)
    assert reaper.apply_retention() == (1, 1)
    with pytest.raises(NotFoundError):
        store.get("default", old.id)
    assert not layout.job_dir(settings.data_dir, old.id).exists()
    assert store.get("default", recent.id).status == JobStatus.failed
    assert not layout.file_meta_path(settings.data_dir, old_file).exists()
    assert not layout.file_path(settings.data_dir, old_file).exists()
    assert layout.file_path(settings.data_dir, used_file).exists()  # a queued job needs it
    assert layout.file_path(settings.data_dir, MODEL).exists()
    assert store.counts_by_status()[JobStatus.failed] == 1
    assert [r.id for r in store.list("default").items] == [active.id, recent.id]


def test_run_forever_passes_until_stopped(store: JobStore, redis_conn, settings: Settings) -> None:
    record = _job(store)
    fast = Reaper(redis_conn, settings.model_copy(update={"reaper_interval_s": 0.05}))
    stop = threading.Event()
    thread = threading.Thread(
        target=background.run_forever,
        args=("reaper", background.reaper_pass(fast), stop, 0.05),
    )
    thread.start()
    deadline = time.monotonic() + 5
    while store.get("default", record.id).status == JobStatus.running:
        assert time.monotonic() < deadline, "the reaper did not pass"
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive()
