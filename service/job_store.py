"""Job records in Redis: our own status, progress, events and indexes (not RQ's job status).

Keys, all under ``recalib:``::

    job:<id>                      hash: ``record`` (JobRecord JSON), ``rq`` (the RQ job of the
                                  current run), ``cancel_at`` (epoch s a running job's cancel came)
    job:<id>:events               list of JobEvent JSON; an event's seq is its index + 1
    jobs:seq                      counter: each job's place in the listings
    jobs:index:<tenant>           zset (lexicographic) of ``<seq:012d>:<id>``; newest = greatest
    jobs:active                   ids of jobs not final (what the reaper watches)
    jobs:finished                 zset id → finished_at, epoch s (what retention deletes)
    jobs:idem:<tenant>:<sha256>   Idempotency-Key → job id
    stats:status, stats:duration  counts by status; run-time histogram of finished jobs

Every change of a record goes through :func:`update_record` (WATCH/MULTI/EXEC), so the API
(cancel), the worker (progress, result) and the reaper never lose each other's writes, and each
change appends its event and keeps the counters in the same transaction. A mutation returns
``None`` to leave the record alone: that is how a stale writer (an earlier run) is turned away.

This module is torch-free: the API imports it.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

import redis
from redis.client import Pipeline

from recalib.contract import JobCreate, JobEvent, JobRecord, JobStatus, Page
from recalib.errors import IdempotencyKeyReusedError, InvalidOptionError, NotFoundError
from recalib.settings import Settings
from service import queue

PREFIX = "recalib:"
SEQ_KEY = PREFIX + "jobs:seq"
ACTIVE_KEY = PREFIX + "jobs:active"
FINISHED_KEY = PREFIX + "jobs:finished"
STATUS_COUNTS_KEY = PREFIX + "stats:status"
DURATION_KEY = PREFIX + "stats:duration"
DURATION_BUCKETS_S = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0)
_CURSOR_RE = re.compile(r"^\d{12}:j_[A-Za-z0-9_-]{16,64}$")
_LIST_BATCH = 200


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def index_key(tenant: str) -> str:
    return f"{PREFIX}jobs:index:{tenant}"


def idem_key(tenant: str, key: str) -> str:
    return f"{PREFIX}jobs:idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"


def new_job_id() -> str:
    return "j_" + secrets.token_urlsafe(16)


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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _parse(fields: Mapping[bytes, bytes]) -> Stored | None:
    if b"record" not in fields:
        return None
    cancel_at = fields.get(b"cancel_at")
    rq_job_id = fields.get(b"rq")
    return Stored(
        record=JobRecord.model_validate_json(fields[b"record"]),
        rq_job_id=_text(rq_job_id) if rq_job_id else None,
        cancel_at=float(cancel_at) if cancel_at else None,
    )


def load(conn: redis.Redis | Pipeline, job_id: str) -> Stored | None:
    """The stored job, or None if there is none (no tenant check: for the worker and reaper)."""
    return _parse(conn.hgetall(job_key(job_id)))  # type: ignore[arg-type]


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
    when the job does not exist). An event (status, progress, ``message``) is appended unless
    ``event`` is False; ``set_fields`` are written into the job's hash alongside. ``message`` and
    ``set_fields`` may be functions of the new record.
    """

    def transaction(pipe: Pipeline) -> JobRecord | None:
        stored = _parse(pipe.hgetall(job_key(job_id)))  # type: ignore[arg-type]
        if stored is None:
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
            pipe.rpush(events_key(job_id), _event(seq, new, text).model_dump_json())
        _account(pipe, old, new)
        return new

    result = conn.transaction(
        transaction,  # type: ignore[arg-type]
        job_key(job_id),
        events_key(job_id),
        value_from_callable=True,
    )
    return cast(JobRecord | None, result)


def _event(seq: int, record: JobRecord, message: str | None) -> JobEvent:
    return JobEvent(
        seq=seq, at=utcnow(), status=record.status, progress=record.progress, message=message
    )


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
        pipe.srem(ACTIVE_KEY, record.id)
        pipe.zrem(FINISHED_KEY, record.id)
        pipe.hincrby(STATUS_COUNTS_KEY, record.status.value, -1)
        if record.idempotency_key is not None:
            pipe.delete(idem_key(record.tenant, record.idempotency_key))
        pipe.execute()
    # The index entry is dropped lazily by JobStore.list (its member holds a sequence number).


class JobStore:
    """Jobs of all tenants. Methods raise :class:`NotFoundError` for another tenant's job."""

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings

    # -- writing ---------------------------------------------------------------------------

    def create(
        self, tenant: str, request: JobCreate, *, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Store a queued job and enqueue its run; return ``(record, created)``.

        With an ``idempotency_key``, the same key and body give back the job created first
        (``created`` False); the same key with another body raises
        :class:`IdempotencyKeyReusedError`. The caller has checked the file ids.
        """
        record = JobRecord(
            id=new_job_id(),
            status=JobStatus.queued,
            created_at=utcnow(),
            request=request,
            tenant=tenant,
            idempotency_key=idempotency_key,
            request_sha256=request_sha256(request),
        )
        rq_job_id = queue.new_rq_job_id(record.id)
        seq = int(self.conn.incr(SEQ_KEY))  # type: ignore[arg-type]
        idem = idem_key(tenant, idempotency_key) if idempotency_key is not None else None

        def transaction(pipe: Pipeline) -> Stored | None:
            existing = pipe.get(idem) if idem is not None else None
            stored = load(pipe, _text(existing)) if existing else None  # type: ignore[arg-type]
            if stored is not None:
                return stored
            pipe.multi()
            if idem is not None:
                pipe.set(idem, record.id)
            pipe.hset(
                job_key(record.id), mapping={"record": record.model_dump_json(), "rq": rq_job_id}
            )
            pipe.rpush(events_key(record.id), _event(1, record, "queued").model_dump_json())
            pipe.zadd(index_key(tenant), {f"{seq:012d}:{record.id}": 0})
            pipe.sadd(ACTIVE_KEY, record.id)
            pipe.hincrby(STATUS_COUNTS_KEY, JobStatus.queued.value, 1)
            return None

        watches = [idem] if idem is not None else []
        earlier = cast(
            Stored | None,
            self.conn.transaction(transaction, *watches, value_from_callable=True),  # type: ignore[arg-type]
        )
        if earlier is not None:
            if earlier.record.request_sha256 != record.request_sha256:
                raise IdempotencyKeyReusedError(
                    f"Idempotency-Key {idempotency_key!r} was used for job {earlier.record.id} "
                    "with another request body; send a new key for a new job",
                    field="Idempotency-Key",
                )
            return earlier.record, False
        queue.enqueue_run(self.conn, self.settings, record.id, rq_job_id)
        return record, True

    def cancel(self, tenant: str, job_id: str) -> JobRecord:
        """Cancel a job; return its record.

        - queued → ``cancelled`` at once, and its RQ job is cancelled (it never runs);
        - running → ``cancelling``; the worker stops at the next batch and the job ends
          ``cancelled`` (a run that does not stop is killed via RQ's stop-job command by the
          reaper, see :class:`service.reaper.Reaper`);
        - cancelling or final → returned unchanged (cancelling twice is not an error).

        A run that completes before it sees the cancel ends ``succeeded``: the work was done.
        """
        stored = self._load_for(tenant, job_id)
        if stored.record.status == JobStatus.queued:
            done = update_record(
                self.conn, job_id, _cancel_queued, message="cancelled before it ran"
            )
            if done is not None:
                if stored.rq_job_id:
                    queue.cancel_rq_job(self.conn, stored.rq_job_id)
                return done
        update_record(
            self.conn,
            job_id,
            _cancel_running,
            message="cancel requested; the worker stops at the next batch",
            set_fields={"cancel_at": repr(utcnow().timestamp())},
        )
        return self.get(tenant, job_id)

    # -- reading ---------------------------------------------------------------------------

    def get(self, tenant: str, job_id: str) -> JobRecord:
        """The record of a job of ``tenant``; :class:`NotFoundError` otherwise."""
        return self._load_for(tenant, job_id).record

    def list(
        self,
        tenant: str,
        *,
        status: JobStatus | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page[JobRecord]:
        """Jobs of ``tenant``, newest first, optionally only those with ``status``."""
        if cursor is not None and not _CURSOR_RE.match(cursor):
            raise InvalidOptionError("cursor is not one this API returned", field="cursor")
        high = "(" + cursor if cursor else "+"
        items: builtins.list[JobRecord] = []
        last_member: str | None = None
        while True:
            members = [
                _text(m)
                for m in self.conn.zrevrangebylex(  # type: ignore[union-attr]
                    index_key(tenant), high, "-", start=0, num=_LIST_BATCH
                )
            ]
            with self.conn.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.hget(job_key(member.partition(":")[2]), "record")
                raws = pipe.execute()
            for member, raw in zip(members, raws, strict=True):
                if raw is None:  # deleted by retention
                    self.conn.zrem(index_key(tenant), member)
                    continue
                record = JobRecord.model_validate_json(raw)
                if status is not None and record.status != status:
                    continue
                if len(items) == limit:
                    return Page[JobRecord](items=items, next_cursor=last_member)
                items.append(record)
                last_member = member
            if len(members) < _LIST_BATCH:
                return Page[JobRecord](items=items, next_cursor=None)
            high = "(" + members[-1]

    def events(self, tenant: str, job_id: str, *, after: int = 0) -> builtins.list[JobEvent]:
        """Events of a job with ``seq > after``, in order."""
        self._load_for(tenant, job_id)
        raws = self.conn.lrange(events_key(job_id), max(0, after), -1)
        return [JobEvent.model_validate_json(raw) for raw in raws]  # type: ignore[union-attr]

    def counts_by_status(self) -> dict[JobStatus, int]:
        """Stored jobs by status (every status present, 0 when none)."""
        raw = self.conn.hgetall(STATUS_COUNTS_KEY)
        counts = {_text(k): int(v) for k, v in raw.items()}  # type: ignore[union-attr]
        return {status: max(0, counts.get(status.value, 0)) for status in JobStatus}

    def queue_depth(self) -> int:
        """RQ jobs waiting in the queue (not yet taken by a worker)."""
        return queue.queue_depth(self.conn, self.settings)

    def duration_histogram(self) -> tuple[builtins.list[tuple[float, int]], float, int]:
        """Run time of finished jobs (start of their last run → end): cumulative ``(le, count)``
        buckets ending with ``+inf``, the sum in seconds, the count."""
        raw = {_text(k): _text(v) for k, v in self.conn.hgetall(DURATION_KEY).items()}  # type: ignore[union-attr]
        buckets: builtins.list[tuple[float, int]] = []
        total = 0
        for bound in (*DURATION_BUCKETS_S, float("inf")):
            total += int(raw.get(f"le:{bound!r}", 0))
            buckets.append((bound, total))
        return buckets, float(raw.get("sum", 0.0)), total

    def _load_for(self, tenant: str, job_id: str) -> Stored:
        stored = load(self.conn, job_id) if job_id.startswith("j_") else None
        if stored is None or stored.record.tenant != tenant:
            raise NotFoundError(
                f"no job {job_id!r} (finished jobs are deleted after RECALIB_RETENTION_S)",
                field="job_id",
            )
        return stored


def _cancel_queued(stored: Stored) -> JobRecord | None:
    record = stored.record
    if record.status != JobStatus.queued:
        return None
    record.status = JobStatus.cancelled
    record.finished_at = utcnow()
    return record


def _cancel_running(stored: Stored) -> JobRecord | None:
    record = stored.record
    if record.status != JobStatus.running:
        return None
    record.status = JobStatus.cancelling
    return record
