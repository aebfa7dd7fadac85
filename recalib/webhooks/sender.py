"""The webhook sender: a pass plans new deliveries and makes the attempts that are due.

Passes run in the API process (the loop is :mod:`service.background`), never on a request's path,
under a Redis lock so that several API replicas take turns. The due attempts of a pass are made
concurrently (at most ``WEBHOOK_PARALLEL``), each bounded as a whole by ``WEBHOOK_TIMEOUT_S``
(connecting by ``WEBHOOK_CONNECT_TIMEOUT_S``), so a receiver that is down, slow or answering 500
costs one attempt its time and never touches the job. Every attempt is recorded on its delivery
(:mod:`recalib.webhooks.deliveries`); the URL is checked against the outbound rules again at each
attempt (and at each redirect, which is not followed: a 3xx is a failed attempt), since DNS may
answer differently than when the job was created.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import redis
from redis.exceptions import LockError

from recalib import __version__, defaults
from recalib.contract.webhooks import WebhookAttempt, WebhookDeliveryRecord
from recalib.errors import RecalibError
from recalib.inputs.outbound import OutboundPolicy
from recalib.jobs.records import utcnow
from recalib.keys import WEBHOOK_LOCK_KEY
from recalib.settings import Settings
from recalib.webhooks.deliveries import Deliveries
from recalib.webhooks.signing import WebhookSecrets, sign

logger = logging.getLogger(__name__)

FIELD = "webhook.url"
LOCK_S = 60.0
"""The sender lock's expiry: longer than one pass (planning plus one round of attempts)."""
MAX_ERROR_CHARS = 300


class WebhookSender:
    """Plans and sends the webhooks of every job; see the module docstring."""

    def __init__(
        self,
        conn: redis.Redis,
        settings: Settings,
        secrets: WebhookSecrets | None = None,
        *,
        parallel: int = defaults.WEBHOOK_PARALLEL,
        timeout_s: float = defaults.WEBHOOK_TIMEOUT_S,
    ) -> None:
        self.conn = conn
        self.deliveries = Deliveries(conn, settings)
        self.secrets = secrets or WebhookSecrets(settings.webhook_secrets)
        self.policy = OutboundPolicy(settings.outbound_allow_hosts)
        self.parallel = parallel
        self.timeout_s = timeout_s

    def run_once(self) -> int:
        """One pass; returns the number of attempts made (0 when another sender holds the lock)."""
        lock = self.conn.lock(WEBHOOK_LOCK_KEY, timeout=LOCK_S, blocking=False)
        if not lock.acquire():
            return 0
        try:
            self.deliveries.plan_all()
            due = self.deliveries.due(self.parallel)
            if not due:
                return 0
            attempts = asyncio.run(self._attempt_all([d for _, d in due]))
            for (job_id, delivery), attempt in zip(due, attempts, strict=True):
                self.deliveries.record_attempt(job_id, delivery, attempt)
            return len(due)
        finally:
            try:
                lock.release()
            except LockError:
                logger.warning("webhook sender lock expired during a pass")

    async def _attempt_all(self, due: list[WebhookDeliveryRecord]) -> list[WebhookAttempt]:
        timeout = httpx.Timeout(self.timeout_s, connect=defaults.WEBHOOK_CONNECT_TIMEOUT_S)
        hooks = {"request": [self._check_request]}
        async with httpx.AsyncClient(
            timeout=timeout, follow_redirects=False, event_hooks=hooks, trust_env=False
        ) as client:
            return list(await asyncio.gather(*(self._attempt(client, d) for d in due)))

    async def _check_request(self, request: httpx.Request) -> None:
        # Resolving the host blocks: in a thread, so the other attempts go on meanwhile.
        await asyncio.to_thread(self.policy.check_url, str(request.url), field=FIELD)

    async def _attempt(
        self, client: httpx.AsyncClient, delivery: WebhookDeliveryRecord
    ) -> WebhookAttempt:
        at, started = utcnow(), time.monotonic()
        status_code, error = None, None
        try:
            request = self._request(client, delivery)
            async with asyncio.timeout(self.timeout_s):
                response = await client.send(request, stream=True)  # the body is never read
                status_code = response.status_code
                await response.aclose()
        except TimeoutError:
            error = f"no answer within {self.timeout_s:g} s"
        except RecalibError as exc:  # outbound rules, or no secret
            error = exc.message
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        duration_ms = round((time.monotonic() - started) * 1000)
        if error is not None:
            error = error[:MAX_ERROR_CHARS]
        return WebhookAttempt(at=at, duration_ms=duration_ms, status_code=status_code, error=error)

    def _request(self, client: httpx.AsyncClient, delivery: WebhookDeliveryRecord) -> httpx.Request:
        key = self.secrets.require(delivery.tenant, field="RECALIB_WEBHOOK_SECRETS")
        body = delivery.payload.encode()
        timestamp_s = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": f"recalib/{__version__}",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(timestamp_s),
            "webhook-signature": sign(key, delivery.id, timestamp_s, body),
        }
        return client.build_request("POST", delivery.url, content=body, headers=headers)
