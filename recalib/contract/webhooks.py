"""Webhooks: what a client asks for (``JobCreate.webhook``) and what it can see of the deliveries.

A delivery is one message (one ``webhook-id``) sent, and retried until the receiver answers 2xx or
``RECALIB_WEBHOOK_RETRY_S`` has passed; every attempt is recorded on it.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field, field_validator

from recalib.contract.base import Input, Output

MAX_WEBHOOK_URL_CHARS = 2048


class WebhookEvent(StrEnum):
    """What a job's webhook is sent for (the message ``type`` is ``job.<event>``).

    - ``started``: a run of the job began (again after a worker died and the job was re-queued);
    - ``progress``: the job's progress moved (throttled: at most one per
      ``RECALIB_WEBHOOK_PROGRESS_INTERVAL_S``);
    - ``completed``: the job ended: succeeded, failed or cancelled (``data.job`` has the result).
    """

    started = "started"
    progress = "progress"
    completed = "completed"


class Webhook(Input):
    """Where to send a job's events, signed per the Standard Webhooks specification."""

    url: str = Field(
        max_length=MAX_WEBHOOK_URL_CHARS,
        description=(
            "An http(s) URL reachable under the server's outbound rules (public addresses unless "
            "RECALIB_OUTBOUND_ALLOW_HOSTS lists the host)."
        ),
        examples=["https://ci.example.com/hooks/recalib"],
    )
    events: list[WebhookEvent] = Field(
        default_factory=lambda: [WebhookEvent.completed],
        min_length=1,
        max_length=3,
        description="The events to send (default: completed only).",
    )

    @field_validator("events")
    @classmethod
    def _distinct(cls, events: list[WebhookEvent]) -> list[WebhookEvent]:
        if len(set(events)) != len(events):
            raise ValueError(f"events must be distinct, got {[e.value for e in events]}")
        return events


class DeliveryState(StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class WebhookAttempt(Output):
    """One POST of a delivery: the receiver's HTTP status, or why there was none."""

    at: datetime
    duration_ms: int
    status_code: int | None = None
    error: str | None = None


class WebhookDelivery(Output):
    """What ``GET /v1/jobs/{id}/deliveries`` shows of one message."""

    id: str = Field(description="The `webhook-id` header: the same on every attempt.")
    type: str = Field(description="`job.started`, `job.progress` or `job.completed`.")
    seq: int = Field(description="The job event (`/events` seq) the message reports.")
    state: DeliveryState = DeliveryState.pending
    created_at: datetime
    next_attempt_at: datetime | None = None
    attempts: list[WebhookAttempt] = Field(default_factory=list)


class WebhookDeliveryRecord(WebhookDelivery):
    """A delivery as stored: with the tenant (whose secret signs it), the receiver's URL and the
    exact body sent."""

    tenant: str
    url: str
    payload: str
