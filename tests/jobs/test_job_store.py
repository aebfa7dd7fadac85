"""recalib.jobs.job_store on a real Valkey: records, listing, events, cancel, idempotency."""

from __future__ import annotations

from datetime import timedelta

import pytest
from rq.job import Job
from rq.job import JobStatus as RqStatus

from recalib.contract import JobCreate, JobOptions, JobRecord, JobStatus, Phase, Progress
from recalib.errors import (
    ConflictError,
    IdempotencyKeyReusedError,
    InvalidOptionError,
    NotFoundError,
)
from recalib.jobs.job_store import JobStore
from recalib.jobs.records import Stored, load, update_record, utcnow
from recalib.keys import events_key, job_key
from recalib.settings import Settings

MODEL = "f_" + "m" * 22
CALIB = "f_" + "c" * 22


@pytest.fixture
def store(redis_conn, tmp_path) -> JobStore:
    return JobStore(redis_conn, Settings(redis_url="redis://unused", data_dir=tmp_path))


def _request(seed: int = 0) -> JobCreate:
    return JobCreate(model_file=MODEL, calibration_file=CALIB, options=JobOptions(seed=seed))


def _mark_running(store: JobStore, job_id: str) -> JobRecord | None:
    """What the worker's task does when a run starts."""

    def mutate(stored: Stored) -> JobRecord:
        record = stored.record
        record.status, record.attempts, record.worker = JobStatus.running, 1, "w1"
        record.started_at = utcnow() - timedelta(seconds=42)
        record.progress = Progress(phase=Phase.loading)
        return record

    return update_record(store.conn, job_id, mutate, message="running")


def test_create_stores_a_queued_record_and_enqueues_its_run(store: JobStore) -> None:
    record, created = store.create("default", _request())
    assert created
    assert record.id.startswith("j_") and len(record.id) >= 24
    assert record.status == JobStatus.queued and record.attempts == 0
    assert record.tenant == "default" and len(record.request_sha256 or "") == 64
    assert store.get("default", record.id) == record
    assert [(e.seq, e.status) for e in store.events("default", record.id)] == [(1, "queued")]
    assert store.queue_depth() == 1
    stored = load(store.conn, record.id)
    assert stored is not None and stored.rq_job_id is not None
    rq_job = Job.fetch(stored.rq_job_id, connection=store.conn)
    assert rq_job.func_name == "worker.runner.task.run_recalibration"
    assert rq_job.args == (record.id,)
    assert rq_job.timeout == store.settings.job_timeout_s
    assert store.counts_by_status()[JobStatus.queued] == 1


def test_ids_are_unguessable(store: JobStore) -> None:
    ids = {store.create("default", _request())[0].id for _ in range(5)}
    assert len(ids) == 5
    assert all(len(job_id) >= 2 + 22 for job_id in ids)  # 16 random bytes


def test_list_is_newest_first_paginated_and_filtered(store: JobStore) -> None:
    ids = [store.create("default", _request(seed=i))[0].id for i in range(5)]
    first = store.list("default", limit=2)
    assert [r.id for r in first.items] == ids[::-1][:2]
    second = store.list("default", limit=2, cursor=first.next_cursor)
    assert [r.id for r in second.items] == ids[::-1][2:4]
    last = store.list("default", limit=2, cursor=second.next_cursor)
    assert [r.id for r in last.items] == [ids[0]]
    assert last.next_cursor is None
    store.cancel("default", ids[1])
    store.cancel("default", ids[3])
    cancelled = store.list("default", status=JobStatus.cancelled, limit=1)
    assert [r.id for r in cancelled.items] == [ids[3]]
    rest = store.list("default", status=JobStatus.cancelled, cursor=cancelled.next_cursor)
    assert [r.id for r in rest.items] == [ids[1]] and rest.next_cursor is None
    assert len(store.list("default", status=JobStatus.queued).items) == 3
    with pytest.raises(InvalidOptionError) as info:
        store.list("default", cursor="not-a-cursor")
    assert info.value.field == "cursor"


def test_cancel_queued_job_ends_it_and_takes_its_run_off_the_queue(store: JobStore) -> None:
    record, _ = store.create("default", _request())
    cancelled = store.cancel("default", record.id)
    assert cancelled.status == JobStatus.cancelled and cancelled.finished_at is not None
    assert [e.status for e in store.events("default", record.id)] == ["queued", "cancelled"]
    assert store.queue_depth() == 0
    stored = load(store.conn, record.id)
    assert stored is not None and stored.rq_job_id is not None
    assert Job.fetch(stored.rq_job_id, connection=store.conn).get_status() == RqStatus.CANCELED
    assert store.cancel("default", record.id) == cancelled  # final: returned unchanged
    counts = store.counts_by_status()
    assert counts[JobStatus.cancelled] == 1 and counts[JobStatus.queued] == 0


def test_cancel_running_job_asks_the_worker_to_stop(store: JobStore) -> None:
    record, _ = store.create("default", _request())
    _mark_running(store, record.id)
    cancelling = store.cancel("default", record.id)
    assert cancelling.status == JobStatus.cancelling
    stored = load(store.conn, record.id)
    assert stored is not None and stored.cancel_at is not None  # the worker's should_stop flag
    assert store.cancel("default", record.id).status == JobStatus.cancelling
    events = store.events("default", record.id)
    assert [e.status for e in events] == ["queued", "running", "cancelling"]
    assert [e.seq for e in store.events("default", record.id, after=1)] == [2, 3]


def test_idempotency_key_same_body_same_job_other_body_error(store: JobStore) -> None:
    first, created = store.create("default", _request(seed=1), idempotency_key="build-7")
    again, created_again = store.create("default", _request(seed=1), idempotency_key="build-7")
    assert created and not created_again
    assert again.id == first.id
    with pytest.raises(IdempotencyKeyReusedError) as info:
        store.create("default", _request(seed=2), idempotency_key="build-7")
    assert "build-7" in info.value.message and first.id in info.value.message
    other_tenant, created_other = store.create("acme", _request(seed=1), idempotency_key="build-7")
    assert created_other and other_tenant.id != first.id
    assert store.create("default", _request(seed=1))[0].id != first.id  # no key: a new job
    assert store.queue_depth() == 3


def test_other_tenants_jobs_are_not_found(store: JobStore) -> None:
    record, _ = store.create("acme", _request())
    for call in (
        lambda: store.get("default", record.id),
        lambda: store.events("default", record.id),
        lambda: store.cancel("default", record.id),
    ):
        with pytest.raises(NotFoundError):
            call()
    assert store.list("default").items == []
    assert store.get("acme", record.id).status == JobStatus.queued  # the cancel did nothing
    with pytest.raises(NotFoundError):
        store.get("acme", "j_" + "x" * 22)


def test_counts_and_duration_histogram_follow_finished_jobs(store: JobStore) -> None:
    done, _ = store.create("default", _request(seed=1))
    store.create("default", _request(seed=2))
    _mark_running(store, done.id)

    def succeed(stored: Stored) -> JobRecord:
        stored.record.status, stored.record.finished_at = JobStatus.succeeded, utcnow()
        return stored.record

    update_record(store.conn, done.id, succeed)
    counts = store.counts_by_status()
    assert counts[JobStatus.succeeded] == 1 and counts[JobStatus.queued] == 1
    assert counts[JobStatus.running] == 0
    buckets, sum_s, count = store.duration_histogram()
    assert count == 1 and 42 <= sum_s < 60
    assert dict(buckets)[30.0] == 0 and dict(buckets)[60.0] == 1
    assert buckets[-1] == (float("inf"), 1)
    assert [le for le, _ in buckets] == sorted(le for le, _ in buckets)


def test_an_unreadable_record_is_409_for_its_tenant_404_for_others_and_not_listed(
    store: JobStore,
) -> None:
    good, _ = store.create("default", _request())
    bad, _ = store.create("default", _request(seed=1))
    store.conn.hset(
        job_key(bad.id), "record", b'{"id": "%s", "tenant": "default"}' % bad.id.encode()
    )
    with pytest.raises(ConflictError, match="unreadable"):
        store.get("default", bad.id)
    with pytest.raises(ConflictError):
        store.cancel("default", bad.id)
    with pytest.raises(NotFoundError):
        store.get("someone-else", bad.id)
    assert [job.id for job in store.list("default").items] == [good.id]


def test_an_unreadable_event_is_skipped(store: JobStore) -> None:
    record, _ = store.create("default", _request())
    store.conn.rpush(events_key(record.id), b"{not an event")
    store.cancel("default", record.id)
    assert [e.status for e in store.events("default", record.id)] == ["queued", "cancelled"]
