"""Progress of a running job into its record, and the cancel flag back out of it."""

from __future__ import annotations

import logging
import time

import redis

from recalib.contract import Phase, Progress
from recalib.jobs import states
from recalib.keys import job_key

logger = logging.getLogger(__name__)


class ProgressWriter:
    """``on_progress``/``should_stop`` of one run: progress into the record as it happens.

    The record is updated at most every ``WRITE_EVERY_S`` (phase changes always), an event is
    appended at most every ``EVENT_EVERY_S`` (phase changes always); the cancel flag is read at
    most every ``STOP_CHECK_EVERY_S``. A Redis hiccup costs a progress update, never the run.
    """

    WRITE_EVERY_S = 0.25
    EVENT_EVERY_S = 1.0
    STOP_CHECK_EVERY_S = 0.5

    def __init__(self, conn: redis.Redis, job_id: str, attempt: int, worker: str | None) -> None:
        self.conn, self.job_id, self.attempt, self.worker = conn, job_id, attempt, worker
        self._phase: Phase | None = Phase.loading  # set by _start
        self._written_at = self._evented_at = self._checked_at = float("-inf")
        self._stop = False

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        phase_changed = progress.phase != self._phase
        if not phase_changed and now - self._written_at < self.WRITE_EVERY_S:
            return
        event = phase_changed or now - self._evented_at >= self.EVENT_EVERY_S

        try:
            states.record_progress(
                self.conn, self.job_id, self.attempt, self.worker, progress, event=event
            )
        except redis.RedisError as exc:
            logger.warning("job %s: progress not recorded: %s", self.job_id, exc)
            return
        self._phase, self._written_at = progress.phase, now
        if event:
            self._evented_at = now

    def should_stop(self) -> bool:
        """True once the job is being cancelled."""
        now = time.monotonic()
        if now - self._checked_at >= self.STOP_CHECK_EVERY_S:
            self._checked_at = now
            try:
                self._stop = bool(self.conn.hexists(job_key(self.job_id), "cancel_at"))
            except redis.RedisError as exc:
                logger.warning("job %s: cancel flag not read: %s", self.job_id, exc)
        return self._stop
