"""The API's background loops (the reaper, the webhook sender): daemon threads running passes.

What a pass does belongs to the job layer (:class:`recalib.jobs.recovery.Reaper`,
:class:`recalib.webhooks.sender.WebhookSender`). Here: the schedule, and that an error
(Redis restarting, a bug) is logged and the loop goes on, never ending the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis

from recalib.jobs.recovery import Reaper
from recalib.webhooks.sender import WebhookSender

logger = logging.getLogger(__name__)

Pass = Callable[[], bool]
"""One pass; True to run the next one at once (it had work), False to wait the interval."""


def run_forever(name: str, one_pass: Pass, stop: threading.Event, interval_s: float) -> None:
    """``one_pass`` every ``interval_s`` seconds until ``stop`` is set."""
    while not stop.is_set():
        busy = False
        try:
            busy = one_pass()
        except redis.RedisError as exc:
            logger.warning("%s pass skipped: Redis error %s", name, exc)
        except Exception:
            logger.exception("%s pass failed; next one in %.1f s", name, interval_s)
        if not busy:
            stop.wait(interval_s)


@dataclass
class Loop:
    """A started loop: set ``stop`` and join ``thread`` (at most ``join_s``) to end it."""

    thread: threading.Thread
    stop: threading.Event
    join_s: float

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=self.join_s)


def start(name: str, one_pass: Pass, interval_s: float, join_s: float) -> Loop:
    """Run ``one_pass`` in a daemon thread named ``recalib-<name>``."""
    stop = threading.Event()
    thread = threading.Thread(
        target=run_forever,
        args=(name, one_pass, stop, interval_s),
        name=f"recalib-{name}",
        daemon=True,
    )
    thread.start()
    return Loop(thread, stop, join_s)


def reaper_pass(reaper: Reaper) -> Pass:
    """A reaper pass, and retention when it is due."""

    def one_pass() -> bool:
        reaper.run_once()
        if reaper.due_for_retention():
            reaper.apply_retention()
        return False

    return one_pass


def sender_pass(sender: WebhookSender) -> Pass:
    """A webhook sender pass; the next comes at once after one that sent something."""
    return lambda: sender.run_once() > 0


REAPER_JOIN_S = 10.0
SENDER_JOIN_S = 15.0
"""How long shutdown waits for a sender pass in progress (its attempts are bounded by 10 s)."""
