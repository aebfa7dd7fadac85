"""A queued job waits while the object store is down, instead of failing for it.

Before a run starts (:func:`wait_for_store`), the worker probes the store. While it does not
answer (or refuses the credentials) the run waits, up to ``STORE_WAIT_S``; then the job is
queued again, still ``queued``, so it runs once the store is back, on whichever worker takes it.
The local store is not waited for: a data directory that cannot be written fails the job with
the directory named (as before), since no waiting fixes a disk.
"""

from __future__ import annotations

import logging
import time

import redis

from recalib.errors import ServiceUnavailableError
from recalib.files.storage import open_storage
from recalib.jobs.states import RunEnd, end_run
from recalib.settings import Settings

logger = logging.getLogger(__name__)

STORE_WAIT_S = 30.0
PROBE_EVERY_S = 2.0


def wait_for_store(
    conn: redis.Redis,
    settings: Settings,
    job_id: str,
    rq_job_id: str | None,
    wait_s: float = STORE_WAIT_S,
) -> bool:
    """True when the store answers (at once, or within ``wait_s``); else the job's run is
    queued again and False is returned: this run must not start."""
    storage = open_storage(settings, who="worker")
    if storage.is_local:
        return True
    deadline = time.monotonic() + wait_s
    while True:
        try:
            storage.probe()
            return True
        except ServiceUnavailableError as exc:
            reason = exc.message
        if time.monotonic() >= deadline:
            break
        logger.warning("job %s waits for the store: %s", job_id, reason)
        time.sleep(PROBE_EVERY_S)
    seen = RunEnd(
        job_id, "handed-back", f"the store is unavailable ({reason})", rq_job_id=rq_job_id
    )
    if rq_job_id is not None:
        end_run(conn, settings, seen)
    return False
