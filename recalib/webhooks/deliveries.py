"""Webhook deliveries in Redis: which job events become messages, and each message's attempts.

A job created with a webhook is put on the watch set (:func:`recalib.jobs.states.create`). The
sender (:mod:`recalib.webhooks.sender`) calls :meth:`Deliveries.plan` on every pass: it reads
the job's events past its cursor and turns each into a message of the kinds the job asked for:

- ``started``: an event that moved the job into ``running`` (each run: a re-queued job starts
  again);
- ``progress``: a later event of the run, at most one per ``RECALIB_WEBHOOK_PROGRESS_INTERVAL_S``
  of event time;
- ``completed``: the final event (``data.job`` holds the job as ``GET /v1/jobs/{id}`` shows it).

The cursor, the new deliveries and their due times are written in one transaction, so a message is
planned exactly once. Its body is fixed when planned (every attempt sends the same bytes under the
same ``webhook-id``); it is signed at each attempt. Keys: :mod:`recalib.keys`.
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import timedelta

import redis

from recalib import defaults
from recalib.contract import JobEvent, JobPublic, JobRecord, JobStatus
from recalib.contract.webhooks import (
    DeliveryState,
    Webhook,
    WebhookAttempt,
    WebhookDelivery,
    WebhookDeliveryRecord,
    WebhookEvent,
)
from recalib.inputs.outbound import OutboundPolicy
from recalib.jobs import records
from recalib.keys import (
    WEBHOOK_DUE_KEY,
    WEBHOOK_WATCH_KEY,
    as_text,
    deliveries_key,
    events_key,
    webhook_state_key,
)
from recalib.settings import Settings
from recalib.webhooks.signing import WebhookSecrets

logger = logging.getLogger(__name__)

RUNNING = (JobStatus.running, JobStatus.cancelling)


def check_webhook(webhook: Webhook | None, tenant: str, settings: Settings) -> None:
    """At job creation: the URL passes the outbound rules (``webhook.url``) and ``tenant`` has a
    signing secret (``webhook``); a :class:`UserError` (422) naming the field otherwise."""
    if webhook is None:
        return
    OutboundPolicy(settings.outbound_allow_hosts).check_url(webhook.url, field="webhook.url")
    WebhookSecrets(settings.webhook_secrets).require(tenant, field="webhook")


def new_message_id() -> str:
    return "msg_" + secrets.token_urlsafe(16)


def backoff_s(failed_attempts: int) -> float:
    """Wait after the ``failed_attempts``-th failure: 1, 2, 4 … s, at most the cap."""
    return float(min(2.0 ** (failed_attempts - 1), defaults.WEBHOOK_MAX_BACKOFF_S))


def classify(event: JobEvent, previous: JobStatus | None) -> WebhookEvent | None:
    """The webhook event kind of a job event, given the status of the event before it."""
    if event.status.is_final:
        return WebhookEvent.completed
    if event.status == JobStatus.running and previous not in RUNNING:
        return WebhookEvent.started
    if event.status in RUNNING:
        return WebhookEvent.progress
    return None  # queued (created, or again after a lost run)


def payload(kind: WebhookEvent, job_id: str, event: JobEvent, job: JobRecord | None) -> str:
    """The message body (Standard Webhooks: ``type``, ``timestamp``, ``data``)."""
    data: dict[str, object] = {"job_id": job_id, "event": event.model_dump(mode="json")}
    if job is not None:
        data["job"] = job.model_dump(mode="json", include=set(JobPublic.model_fields))
    body = {"type": f"job.{kind.value}", "timestamp": event.at.isoformat(), "data": data}
    return json.dumps(body, separators=(",", ":"))


class Deliveries:
    """Planning, scheduling and recording of webhook deliveries (no HTTP here)."""

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings

    # -- planning ---------------------------------------------------------------------------

    def plan_all(self) -> int:
        """Plan the new events of every watched job; the number of deliveries planned."""
        planned = 0
        for member in sorted(self.conn.smembers(WEBHOOK_WATCH_KEY)):  # type: ignore[union-attr]
            job_id = as_text(member)
            try:
                planned += self.plan(job_id)
            except redis.RedisError:
                raise
            except Exception:  # one bad job must not stop the others' webhooks
                logger.exception("job %s: planning its webhooks failed; skipped", job_id)
        return planned

    def plan(self, job_id: str) -> int:
        """Turn the job's events past the cursor into deliveries; the number planned."""
        stored = records.load(self.conn, job_id)
        webhook = stored.record.request.webhook if stored is not None else None
        if stored is None or webhook is None:  # deleted (retention) or unreadable
            self.conn.srem(WEBHOOK_WATCH_KEY, job_id)
            return 0
        state = {
            as_text(k): as_text(v)
            for k, v in self.conn.hgetall(webhook_state_key(job_id)).items()  # type: ignore[union-attr]
        }
        cursor = int(state.get("cursor", 0))
        previous = JobStatus(state["last_status"]) if "last_status" in state else None
        last_progress_at = float(state.get("last_progress_at", "-inf"))
        raws = self.conn.lrange(events_key(job_id), cursor, -1)
        new: list[WebhookDeliveryRecord] = []
        finished = False
        for raw in raws:  # type: ignore[union-attr]
            cursor += 1
            try:
                event = JobEvent.model_validate_json(raw)
            except ValueError as exc:
                logger.error("job %s: event %d unreadable, no webhook for it (%s)", job_id,
                             cursor, exc)  # fmt: skip
                continue
            kind = classify(event, previous)
            previous = event.status
            if kind == WebhookEvent.progress:
                at_s = event.at.timestamp()
                if at_s - last_progress_at < self.settings.webhook_progress_interval_s:
                    continue
                last_progress_at = at_s
            elif kind == WebhookEvent.started:
                last_progress_at = event.at.timestamp()
            finished = finished or event.status.is_final
            if kind is None or kind not in webhook.events:
                continue
            job = None
            if kind == WebhookEvent.completed:  # the record as it ended (reloaded: it is final)
                final = records.load(self.conn, job_id)
                job = final.record if final is not None else stored.record
            new.append(self._delivery(stored.record, webhook.url, kind, event, job))
        self._save_plan(job_id, cursor, previous, last_progress_at, new, finished)
        return len(new)

    def _delivery(
        self,
        record: JobRecord,
        url: str,
        kind: WebhookEvent,
        event: JobEvent,
        job: JobRecord | None,
    ) -> WebhookDeliveryRecord:
        now = records.utcnow()
        return WebhookDeliveryRecord(
            id=new_message_id(),
            type=f"job.{kind.value}",
            seq=event.seq,
            created_at=now,
            next_attempt_at=now,
            tenant=record.tenant,
            url=url,
            payload=payload(kind, record.id, event, job),
        )

    def _save_plan(
        self,
        job_id: str,
        cursor: int,
        previous: JobStatus | None,
        last_progress_at: float,
        new: list[WebhookDeliveryRecord],
        finished: bool,
    ) -> None:
        state: dict[str, str] = {"cursor": str(cursor), "last_progress_at": repr(last_progress_at)}
        if previous is not None:
            state["last_status"] = previous.value
        with self.conn.pipeline() as pipe:  # MULTI: the cursor moves with its deliveries
            pipe.hset(webhook_state_key(job_id), mapping=state)  # type: ignore[arg-type]
            for delivery in new:
                pipe.hset(deliveries_key(job_id), delivery.id, delivery.model_dump_json())
                due = delivery.created_at.timestamp()
                pipe.zadd(WEBHOOK_DUE_KEY, {f"{job_id}:{delivery.id}": due})
            if finished:  # nothing follows a final event
                pipe.srem(WEBHOOK_WATCH_KEY, job_id)
            pipe.execute()
        for delivery in new:
            logger.info("job %s: webhook %s (%s) planned", job_id, delivery.id, delivery.type)

    # -- scheduling and recording -----------------------------------------------------------

    def due(self, limit: int) -> list[tuple[str, WebhookDeliveryRecord]]:
        """Up to ``limit`` deliveries whose next attempt is due, oldest first."""
        now_s = records.utcnow().timestamp()
        members = self.conn.zrangebyscore(WEBHOOK_DUE_KEY, "-inf", now_s, start=0, num=limit)
        found = []
        for member in members:  # type: ignore[union-attr]
            job_id, _, delivery_id = as_text(member).partition(":")
            delivery = self.get(job_id, delivery_id)
            if delivery is None or delivery.state != DeliveryState.pending:
                self.conn.zrem(WEBHOOK_DUE_KEY, member)  # the job was deleted, or done already
                continue
            found.append((job_id, delivery))
        return found

    def get(self, job_id: str, delivery_id: str) -> WebhookDeliveryRecord | None:
        raw = self.conn.hget(deliveries_key(job_id), delivery_id)
        if raw is None:
            return None
        try:
            return WebhookDeliveryRecord.model_validate_json(raw)  # type: ignore[arg-type]
        except ValueError as exc:
            logger.error("job %s: delivery %s unreadable (%s)", job_id, delivery_id, exc)
            return None

    def record_attempt(
        self, job_id: str, delivery: WebhookDeliveryRecord, attempt: WebhookAttempt
    ) -> WebhookDeliveryRecord:
        """Append ``attempt``; decide delivered, retry (when) or failed; store it."""
        delivery.attempts.append(attempt)
        ok = attempt.status_code is not None and 200 <= attempt.status_code < 300
        wait_s = backoff_s(len(delivery.attempts))
        next_at = attempt.at + timedelta(seconds=wait_s)
        give_up_at = delivery.created_at + timedelta(seconds=self.settings.webhook_retry_s)
        member = f"{job_id}:{delivery.id}"
        with self.conn.pipeline() as pipe:
            if ok or next_at > give_up_at:
                delivery.state = DeliveryState.delivered if ok else DeliveryState.failed
                delivery.next_attempt_at = None
                pipe.zrem(WEBHOOK_DUE_KEY, member)
            else:
                delivery.next_attempt_at = next_at
                pipe.zadd(WEBHOOK_DUE_KEY, {member: next_at.timestamp()})
            pipe.hset(deliveries_key(job_id), delivery.id, delivery.model_dump_json())
            pipe.execute()
        self._log(job_id, delivery, attempt)
        return delivery

    def _log(self, job_id: str, delivery: WebhookDeliveryRecord, attempt: WebhookAttempt) -> None:
        outcome = attempt.error or f"HTTP {attempt.status_code}"
        n = len(delivery.attempts)
        if delivery.state == DeliveryState.delivered:
            logger.info("job %s: webhook %s delivered (attempt %d)", job_id, delivery.id, n)
        elif delivery.state == DeliveryState.failed:
            logger.warning(
                "job %s: webhook %s failed for good after %d attempts over %d s: %s",
                job_id, delivery.id, n, self.settings.webhook_retry_s, outcome,
            )  # fmt: skip
        else:
            logger.info("job %s: webhook %s attempt %d: %s; next at %s", job_id, delivery.id, n,
                        outcome, delivery.next_attempt_at)  # fmt: skip

    # -- reading ----------------------------------------------------------------------------

    def for_job(self, job_id: str) -> list[WebhookDelivery]:
        """The job's deliveries in event order (the payload and tenant left out)."""
        raws = self.conn.hvals(deliveries_key(job_id))
        found = []
        for raw in raws:  # type: ignore[union-attr]
            try:
                found.append(WebhookDeliveryRecord.model_validate_json(raw))
            except ValueError as exc:
                logger.error("job %s: a delivery is unreadable, not listed (%s)", job_id, exc)
        found.sort(key=lambda d: (d.seq, d.created_at))
        return [WebhookDelivery.model_validate(d.model_dump(exclude={"tenant", "payload"}))
                for d in found]  # fmt: skip
