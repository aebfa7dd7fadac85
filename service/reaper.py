"""The reaper loop: a daemon thread of the API process runs :class:`Reaper` passes until stopped.

What a pass does, and its bounds, is :mod:`recalib.jobs.recovery`'s. Here: the schedule, and that
an error (Redis restarting, a bug) is logged and the loop goes on.
"""

from __future__ import annotations

import logging
import threading

import redis

from recalib.jobs.recovery import Reaper

logger = logging.getLogger(__name__)

JOIN_S = 10.0


def run_forever(reaper: Reaper, stop: threading.Event, interval_s: float) -> None:
    """A pass (and retention when due) every ``interval_s`` seconds until ``stop`` is set."""
    while not stop.is_set():
        try:
            reaper.run_once()
            if reaper.due_for_retention():
                reaper.apply_retention()
        except redis.RedisError as exc:
            logger.warning("reaper pass skipped: Redis error %s", exc)
        except Exception:
            logger.exception("reaper pass failed; next one in %.1f s", interval_s)
        stop.wait(interval_s)


def start(reaper: Reaper, interval_s: float) -> tuple[threading.Thread, threading.Event]:
    """Start the loop in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()
    thread = threading.Thread(
        target=run_forever, args=(reaper, stop, interval_s), name="recalib-reaper", daemon=True
    )
    thread.start()
    return thread, stop
