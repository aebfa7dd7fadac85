"""Job records in Redis: store, load, change atomically, forget (keys in :mod:`recalib.keys`).

A new job is written by :func:`insert_queued`; every change of a record goes through
:func:`update_record` (WATCH/MULTI/EXEC), so the API (cancel), the worker (progress, result) and
the reaper never lose each other's writes, and each change appends its event and keeps the
counters in the same transaction. A mutation returns ``None`` to leave the record alone: that is
how a stale writer (an earlier run) is turned away. Which changes exist is decided in
:mod:`recalib.jobs.states`, the only caller (the helpers at the end are what its transitions test
and write).

A record that cannot be parsed (written by another version, or corrupted) is :class:`Unreadable`,
never an exception: one bad record must not break a listing, a worker or the reaper.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

import redis
from pydantic import ValidationError
from redis.client import Pipeline

from recalib.contract import JobCreate, JobError, JobEvent, JobRecord, JobStatus
from recalib.keys import (
    ACTIVE_KEY,
    DURATION_KEY,
    FINISHED_KEY,
    STATUS_COUNTS_KEY,
    WEBHOOK_WATCH_KEY,
    as_text,
    deliveries_key,
    events_key,
    idem_key,
    job_index_key,
    job_key,
    webhook_state_key,
)
from recalib.settings import Settings

logger = logging.getLogger(__name__)

DURATION_BUCKETS_S = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0)
WORKER_DIED = "worker-died"
JOB_TIMEOUT = "job-timeout"
RUNNING = (JobStatus.running, JobStatus.cancelling)


def utcnow() -> datetime:
    return datetime.now(UTC)


def request_sha256(request: JobCreate) -> str:
    """sha256 of the request's canonical JSON (sorted keys, no spaces, defaults filled in)."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Stored:
    """A job as stored: the record and the bookkeeping fields beside it."""

    record: JobRecord
    rq_job_id: str | None
    cancel_at: float | None


@dataclass
class Unreadable:
    """A job hash whose record does not parse; ``reason`` says why (for the log).

    ``tenant`` is the record's ``tenant`` member when the JSON still has a string there (so its
    owner can be told the record is unreadable while others keep getting 404), else None.
    """

    job_id: str
    reason: str
    tenant: str | None = None


def parse(job_id: str, fields: Mapping[bytes, bytes]) -> Stored | Unreadable | None:
    """The stored job from its hash; None when there is none."""
    if b"record" not in fields:
        return None
    try:
        record = JobRecord.model_validate_json(fields[b"record"])
    except ValidationError as exc:
        reason = f"{exc.error_count()} validation error(s): {_first_error(exc)}"
        return Unreadable(job_id, reason, _tenant_of(fields[b"record"]))
    cancel_at = fields.get(b"cancel_at")
    rq_job_id = fields.get(b"rq")
    return Stored(
        record=record,
        rq_job_id=as_text(rq_job_id) if rq_job_id else None,
        cancel_at=float(cancel_at) if cancel_at else None,
    )


def _first_error(exc: ValidationError) -> str:
    first = exc.errors(include_input=False, include_url=False)[0]
    return f"{'.'.join(str(p) for p in first['loc']) or 'record'}: {first['msg']}"


def _tenant_of(raw: bytes) -> str | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    tenant = value.get("tenant") if isinstance(value, dict) else None
    return tenant if isinstance(tenant, str) else None


def load(conn: redis.Redis | Pipeline, job_id: str) -> Stored | None:
    """The stored job, or None if there is none or it is unreadable (logged).

    No tenant check: for the worker and the reaper.
    """
    stored = parse(job_id, conn.hgetall(job_key(job_id)))  # type: ignore[arg-type]
    if isinstance(stored, Unreadable):
        logger.error("job %s: record unreadable, left alone (%s)", job_id, stored.reason)
        return None
    return stored


def update_record(
    conn: redis.Redis,
    job_id: str,
    mutate: Callable[[Stored], JobRecord | None],
    *,
    message: str | Callable[[JobRecord], str | None] | None = None,
    event: bool = True,
    set_fields: Mapping[str, str] | Callable[[JobRecord], Mapping[str, str]] | None = None,
) -> JobRecord | None:
    """Apply ``mutate`` to a job atomically; return the new record, or None if nothing changed.

    ``mutate`` gets a copy of the stored job and returns the new record or None (no change; also
    when the job does not exist or is unreadable). An event (status, progress, ``message``) is
    appended unless ``event`` is False; ``set_fields`` are written into the job's hash alongside.
    ``message`` and ``set_fields`` may be functions of the new record.
    """

    def transaction(pipe: Pipeline) -> JobRecord | None:
        stored = parse(job_id, pipe.hgetall(job_key(job_id)))  # type: ignore[arg-type]
        if not isinstance(stored, Stored):
            return None
        old = stored.record.model_copy(deep=True)
        new = mutate(stored)
        if new is None:
            return None
        seq = int(pipe.llen(events_key(job_id))) + 1  # type: ignore[arg-type]
        fields = dict(set_fields(new) if callable(set_fields) else set_fields or {})
        text = message(new) if callable(message) else message
        pipe.multi()
        pipe.hset(job_key(job_id), mapping={"record": new.model_dump_json(), **fields})  # type: ignore[dict-item]
        if event:
            pipe.rpush(events_key(job_id), event_of(seq, new, text).model_dump_json())
        _account(pipe, old, new)
        return new

    result = conn.transaction(
        transaction,  # type: ignore[arg-type]
        job_key(job_id),
        events_key(job_id),
        value_from_callable=True,
    )
    return cast(JobRecord | None, result)


def insert_queued(pipe: Pipeline, record: JobRecord, rq_job_id: str, seq: int) -> None:
    """Write a new ``queued`` job (inside the caller's MULTI): the record beside its run
    ``rq_job_id``, its first event, its index entry (``seq`` orders it), the counters."""
    pipe.hset(job_key(record.id), mapping={"record": record.model_dump_json(), "rq": rq_job_id})
    pipe.rpush(events_key(record.id), event_of(1, record, "queued").model_dump_json())
    pipe.zadd(job_index_key(record.tenant), {f"{seq:012d}:{record.id}": 0})
    pipe.sadd(ACTIVE_KEY, record.id)
    if record.request.webhook is not None:  # the webhook sender follows its events
        pipe.sadd(WEBHOOK_WATCH_KEY, record.id)
    pipe.hincrby(STATUS_COUNTS_KEY, JobStatus.queued.value, 1)


def event_of(seq: int, record: JobRecord, message: str | None) -> JobEvent:
    return JobEvent(
        seq=seq, at=utcnow(), status=record.status, progress=record.progress, message=message
    )


# -- what the transitions of :mod:`recalib.jobs.states` test and write ----------------------


def owned_by(attempt: int, worker: str | None) -> Callable[[Stored], bool]:
    """Whether run ``attempt`` on ``worker`` still owns a job (running or cancelling)."""

    def owns(stored: Stored) -> bool:
        record = stored.record
        return record.status in RUNNING and record.attempts == attempt and record.worker == worker

    return owns


def timeout_error(settings: Settings) -> JobError:
    return JobError(
        type=JOB_TIMEOUT,
        message=(
            f"the job ran longer than RECALIB_JOB_TIMEOUT_S ({settings.job_timeout_s} s) and was "
            "stopped; raise the limit or use fewer samples (options.max_samples)"
        ),
    )


def final_message(record: JobRecord) -> str:
    """The event message of a job's final status."""
    if record.status == JobStatus.succeeded:
        return "succeeded"
    if record.status == JobStatus.cancelled:
        return "cancelled"
    return record.error.message if record.error else record.status.value


def _account(pipe: Pipeline, old: JobRecord, new: JobRecord) -> None:
    """Counters, the active set and the finished index follow a status change."""
    if old.status == new.status:
        return
    pipe.hincrby(STATUS_COUNTS_KEY, old.status.value, -1)
    pipe.hincrby(STATUS_COUNTS_KEY, new.status.value, 1)
    if not new.status.is_final:
        pipe.sadd(ACTIVE_KEY, new.id)
        return
    pipe.srem(ACTIVE_KEY, new.id)
    finished_at = new.finished_at or utcnow()
    pipe.zadd(FINISHED_KEY, {new.id: finished_at.timestamp()})
    if new.started_at is not None:
        duration_s = max(0.0, (finished_at - new.started_at).total_seconds())
        bucket = next((b for b in DURATION_BUCKETS_S if duration_s <= b), float("inf"))
        pipe.hincrby(DURATION_KEY, f"le:{bucket!r}", 1)
        pipe.hincrbyfloat(DURATION_KEY, "sum", duration_s)


def delete_job(conn: redis.Redis, record: JobRecord) -> None:
    """Forget a job entirely (retention): record, events, indexes, counters."""
    with conn.pipeline() as pipe:
        pipe.delete(job_key(record.id), events_key(record.id))
        pipe.delete(webhook_state_key(record.id), deliveries_key(record.id))
        pipe.srem(ACTIVE_KEY, record.id)
        pipe.zrem(FINISHED_KEY, record.id)
        pipe.hincrby(STATUS_COUNTS_KEY, record.status.value, -1)
        if record.idempotency_key is not None:
            pipe.delete(idem_key(record.tenant, record.idempotency_key))
        pipe.execute()
    # The index entry is dropped lazily by JobStore.list (its member holds a sequence number).
