"""One unreadable job record (written straight into a real Valkey) stops neither the reaper nor
retention nor any state transition: each is skipped, logged, and the other jobs are handled."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest

from recalib.contract import JobCreate, JobRecord, JobStatus
from recalib.jobs import states
from recalib.jobs.job_store import JobStore
from recalib.jobs.records import Stored, Unreadable, load, parse, update_record, utcnow
from recalib.jobs.recovery import Reaper
from recalib.keys import ACTIVE_KEY, FINISHED_KEY, events_key, job_key
from recalib.settings import Settings

MODEL = "f_" + "m" * 22
CALIB = "f_" + "c" * 22
BAD_RECORDS = {
    "not-json": b"{not json",
    "wrong-shape": b'{"id": 1, "tenant": "default"}',
    "null-float": None,  # a real record with options.prior_strength null: see _null_float
}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(redis_url="redis://unused", data_dir=tmp_path, worker_heartbeat_s=1)


@pytest.fixture
def store(redis_conn, settings: Settings) -> JobStore:
    return JobStore(redis_conn, settings)


def _null_float(store: JobStore) -> bytes:
    record, _ = store.create("default", JobCreate(model_file=MODEL, calibration_file=CALIB))
    raw = json.loads(record.model_dump_json())
    raw["request"]["options"]["prior_strength"] = None  # what 1e999 used to be stored as
    return json.dumps(raw).encode()


def _running_on_dead_worker(store: JobStore) -> JobRecord:
    record, _ = store.create("default", JobCreate(model_file=MODEL, calibration_file=CALIB))

    def start(stored: Stored) -> JobRecord:
        stored.record.status, stored.record.attempts = JobStatus.running, 1
        stored.record.worker = "gone"
        stored.record.started_at = utcnow() - timedelta(seconds=1)
        return stored.record

    return update_record(store.conn, record.id, start) or record


def _plant(store: JobStore, job_id: str, raw: bytes) -> None:
    conn = store.conn
    conn.hset(job_key(job_id), mapping={"record": raw, "rq": f"{job_id}_rdeadbeef"})
    conn.rpush(events_key(job_id), b"{not an event")
    conn.sadd(ACTIVE_KEY, job_id)
    conn.zadd(FINISHED_KEY, {job_id: time.time() - 10 * 24 * 3600})  # due for retention


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_the_reaper_skips_an_unreadable_record_and_reaps_the_others(
    store: JobStore, redis_conn, settings: Settings, kind: str
) -> None:
    raw = BAD_RECORDS[kind] or _null_float(store)
    bad_id = "j_" + "B" * 22
    _plant(store, bad_id, raw)
    assert isinstance(parse(bad_id, redis_conn.hgetall(job_key(bad_id))), Unreadable)
    # A readable queued job whose last event is corrupt: its check raises inside the pass.
    queued, _ = store.create("default", JobCreate(model_file=MODEL, calibration_file=CALIB))
    redis_conn.rpush(events_key(queued.id), b"{not an event either")
    dead = _running_on_dead_worker(store)

    reaper = Reaper(redis_conn, settings)
    assert reaper.run_once() == [dead.id]
    assert store.get("default", dead.id).status == JobStatus.queued  # run again
    assert reaper.apply_retention() == (1, 0)  # the planted job's id is due; nothing raised
    assert reaper.run_once() == []  # and the next pass is fine too


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_no_transition_touches_an_unreadable_record(store: JobStore, redis_conn, kind) -> None:
    raw = BAD_RECORDS[kind] or _null_float(store)
    bad_id = "j_" + "C" * 22
    _plant(store, bad_id, raw)
    assert states.start_run(redis_conn, bad_id, None, "w1", 2) is None
    assert states.cancel_queued(redis_conn, bad_id) is None
    assert states.request_cancel(redis_conn, bad_id) is None
    assert load(redis_conn, bad_id) is None
    assert redis_conn.hget(job_key(bad_id), "record") == raw  # left as it was, for a human
