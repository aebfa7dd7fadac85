"""The job store: what the API does with jobs (create, get, list, events, cancel, counts).

Records, keys and the one way to change a record live in :mod:`service.job_records`; the run of a
job is enqueued by dotted path (:mod:`service.queue`), so the API never imports torch.

This module is torch-free: the API imports it.
"""

from __future__ import annotations

import builtins
import re
from typing import cast

import redis
from redis.client import Pipeline

from recalib.contract import JobCreate, JobEvent, JobRecord, JobStatus, Page
from recalib.errors import IdempotencyKeyReusedError, InvalidOptionError, NotFoundError
from recalib.settings import Settings
from service import queue
from service.job_records import (
    ACTIVE_KEY,
    DURATION_BUCKETS_S,
    DURATION_KEY,
    SEQ_KEY,
    STATUS_COUNTS_KEY,
    Stored,
    event_of,
    events_key,
    idem_key,
    index_key,
    job_key,
    load,
    new_job_id,
    request_sha256,
    text,
    update_record,
    utcnow,
)

_CURSOR_RE = re.compile(r"^\d{12}:j_[A-Za-z0-9_-]{16,64}$")
_LIST_BATCH = 200


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
            stored = load(pipe, text(existing)) if existing else None  # type: ignore[arg-type]
            if stored is not None:
                return stored
            pipe.multi()
            if idem is not None:
                pipe.set(idem, record.id)
            pipe.hset(
                job_key(record.id), mapping={"record": record.model_dump_json(), "rq": rq_job_id}
            )
            pipe.rpush(events_key(record.id), event_of(1, record, "queued").model_dump_json())
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
                text(m)
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
        counts = {text(k): int(v) for k, v in raw.items()}  # type: ignore[union-attr]
        return {status: max(0, counts.get(status.value, 0)) for status in JobStatus}

    def queue_depth(self) -> int:
        """RQ jobs waiting in the queue (not yet taken by a worker)."""
        return queue.queue_depth(self.conn, self.settings)

    def duration_histogram(self) -> tuple[builtins.list[tuple[float, int]], float, int]:
        """Run time of finished jobs (start of their last run → end): cumulative ``(le, count)``
        buckets ending with ``+inf``, the sum in seconds, the count."""
        raw = {text(k): text(v) for k, v in self.conn.hgetall(DURATION_KEY).items()}  # type: ignore[union-attr]
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
