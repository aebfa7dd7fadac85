"""The webhook sender loop: a daemon thread of the API process runs sender passes until stopped.

What a pass does is :mod:`recalib.jobs.webhook_sender`'s. Here: the schedule, and that an error
(Redis restarting, a bug) is logged and the loop goes on.
"""

from __future__ import annotations

import logging
import threading

import redis

from recalib.jobs.webhook_sender import WebhookSender

logger = logging.getLogger(__name__)

JOIN_S = 15.0
"""How long shutdown waits for a pass in progress (its attempts are bounded by 10 s)."""


def run_forever(sender: WebhookSender, stop: threading.Event, interval_s: float) -> None:
    """A pass every ``interval_s`` seconds (at once again after a pass that sent something)."""
    while not stop.is_set():
        sent = 0
        try:
            sent = sender.run_once()
        except redis.RedisError as exc:
            logger.warning("webhook pass skipped: Redis error %s", exc)
        except Exception:
            logger.exception("webhook pass failed; next one in %.1f s", interval_s)
        if not sent:
            stop.wait(interval_s)


def start(sender: WebhookSender, interval_s: float) -> tuple[threading.Thread, threading.Event]:
    """Start the loop in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()
    thread = threading.Thread(
        target=run_forever, args=(sender, stop, interval_s), name="recalib-webhooks", daemon=True
    )
    thread.start()
    return thread, stop
