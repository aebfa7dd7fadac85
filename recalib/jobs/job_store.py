"""The job store: what the API does with jobs (create, get, list, events, cancel, counts).

Status changes go through :mod:`recalib.jobs.states`; keys live in :mod:`recalib.keys`.
A stored record that does not parse is skipped by listings (and logged); fetched alone it is a
409 for the tenant it names and a 404 for everyone else, so one bad record never breaks a
listing, and never a 500.
"""

from __future__ import annotations

import builtins
import logging
import re

import redis

from recalib.contract import JobCreate, JobEvent, JobRecord, JobStatus, Page
from recalib.errors import (
    ConflictError,
    IdempotencyKeyReusedError,
    InvalidOptionError,
    NotFoundError,
)
from recalib.ids import new_job_id
from recalib.jobs import queue, states
from recalib.jobs.records import (
    DURATION_BUCKETS_S,
    Stored,
    Unreadable,
    parse,
    request_sha256,
    utcnow,
)
from recalib.keys import (
    DURATION_KEY,
    SEQ_KEY,
    STATUS_COUNTS_KEY,
    as_text,
    events_key,
    idem_key,
    job_index_key,
    job_key,
)
from recalib.settings import Settings

logger = logging.getLogger(__name__)

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
        :class:`IdempotencyKeyReusedError`. Entrances call
        :func:`recalib.admission.admit`, which checks the request first.
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
        seq = int(self.conn.incr(SEQ_KEY))  # type: ignore[arg-type]
        idem = idem_key(tenant, idempotency_key) if idempotency_key is not None else None
        earlier = states.create(self.conn, self.settings, record, seq, idem)
        if earlier is not None:
            if earlier.record.request_sha256 != record.request_sha256:
                raise IdempotencyKeyReusedError(
                    f"Idempotency-Key {idempotency_key!r} was used for job {earlier.record.id} "
                    "with another request body; send a new key for a new job",
                    field="Idempotency-Key",
                )
            return earlier.record, False
        return record, True

    def cancel(self, tenant: str, job_id: str) -> JobRecord:
        """Cancel a job; return its record.

        - queued → ``cancelled`` at once, and its RQ job is cancelled (it never runs);
        - running → ``cancelling``; the worker stops at the next batch and the job ends
          ``cancelled`` (a run that does not stop is killed via RQ's stop-job command by the
          reaper, see :class:`recalib.jobs.recovery.Reaper`);
        - cancelling or final → returned unchanged (cancelling twice is not an error).

        A run that completes before it sees the cancel ends ``succeeded``: the work was done.
        """
        stored = self._load_for(tenant, job_id)
        if stored.record.status == JobStatus.queued:
            done = states.cancel_queued(self.conn, job_id)
            if done is not None:
                if stored.rq_job_id:
                    queue.cancel_rq_job(self.conn, stored.rq_job_id)
                return done
        states.request_cancel(self.conn, job_id)
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
                as_text(m)
                for m in self.conn.zrevrangebylex(  # type: ignore[union-attr]
                    job_index_key(tenant), high, "-", start=0, num=_LIST_BATCH
                )
            ]
            with self.conn.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.hgetall(job_key(member.partition(":")[2]))
                raws = pipe.execute()
            for member, raw in zip(members, raws, strict=True):
                stored = parse(member.partition(":")[2], raw)
                if stored is None:  # deleted by retention
                    self.conn.zrem(job_index_key(tenant), member)
                    continue
                if isinstance(stored, Unreadable):
                    logger.error("job %s: record unreadable, not listed (%s)", stored.job_id,
                                 stored.reason)  # fmt: skip
                    continue
                record = stored.record
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
        events = []
        for raw in raws:  # type: ignore[union-attr]
            try:
                events.append(JobEvent.model_validate_json(raw))
            except ValueError as exc:  # pydantic's ValidationError is one
                logger.error("job %s: an event is unreadable, skipped (%s)", job_id, exc)
        return events

    def counts_by_status(self) -> dict[JobStatus, int]:
        """Stored jobs by status (every status present, 0 when none)."""
        raw = self.conn.hgetall(STATUS_COUNTS_KEY)
        counts = {as_text(k): int(v) for k, v in raw.items()}  # type: ignore[union-attr]
        return {status: max(0, counts.get(status.value, 0)) for status in JobStatus}

    def queue_depth(self) -> int:
        """RQ jobs waiting in the queue (not yet taken by a worker)."""
        return queue.queue_depth(self.conn, self.settings)

    def duration_histogram(self) -> tuple[builtins.list[tuple[float, int]], float, int]:
        """Run time of finished jobs (start of their last run → end): cumulative ``(le, count)``
        buckets ending with ``+inf``, the sum in seconds, the count."""
        raw = {as_text(k): as_text(v) for k, v in self.conn.hgetall(DURATION_KEY).items()}  # type: ignore[union-attr]
        buckets: builtins.list[tuple[float, int]] = []
        total = 0
        for bound in (*DURATION_BUCKETS_S, float("inf")):
            total += int(raw.get(f"le:{bound!r}", 0))
            buckets.append((bound, total))
        return buckets, float(raw.get("sum", 0.0)), total

    def _load_for(self, tenant: str, job_id: str) -> Stored:
        raw = self.conn.hgetall(job_key(job_id)) if job_id.startswith("j_") else {}
        stored = parse(job_id, raw)  # type: ignore[arg-type]
        if isinstance(stored, Unreadable):
            logger.error("job %s: record unreadable (%s)", job_id, stored.reason)
            if stored.tenant == tenant:
                raise ConflictError(
                    f"job {job_id}: its stored record is unreadable (written by another version "
                    "of recalib, or damaged); the server log has the details. Submit the job again",
                    field="job_id",
                )
            stored = None
        if stored is None or stored.record.tenant != tenant:
            raise NotFoundError(
                f"no job {job_id!r} (finished jobs are deleted after RECALIB_RETENTION_S)",
                field="job_id",
            )
        return stored
