"""Every Redis key recalib writes, in one place, and ``as_text`` for what Redis answers.

All keys lie under ``recalib:``::

    job:<id>                      hash: ``record`` (JobRecord JSON), ``rq`` (the RQ job of the
                                  current run), ``cancel_at`` (epoch s a running job's cancel came)
    job:<id>:events               list of JobEvent JSON; an event's seq is its index + 1
    jobs:seq                      counter: each job's place in the listings
    jobs:index:<tenant>           zset (lexicographic) of ``<seq:012d>:<id>``; newest = greatest
    jobs:active                   ids of jobs not final (what the reaper watches)
    jobs:finished                 zset id → finished_at, epoch s (what retention deletes)
    jobs:idem:<tenant>:<sha256>   Idempotency-Key → job id
    stats:status, stats:duration  counts by status; run-time histogram of finished jobs
    files:index:<tenant>          zset (lexicographic) of ``<µs since epoch:017d>:<file id>``
    files:sha256:<tenant>         hash sha256 → file id
    workers, worker:<name>        live worker names; each worker's hash (expires without beats)
    reaper:lock                   held by the API process whose reaper is making a pass
    data-dir                      hash: the API's data directory (marker ``id``, ``path``, ``host``)
    job:<id>:webhook              hash: how far the sender has read the job's events (``cursor``,
                                  ``last_status``, ``last_progress_at``)
    job:<id>:deliveries           hash delivery id → WebhookDeliveryRecord JSON
    webhooks:watch                ids of jobs with a webhook whose events are not all read yet
    webhooks:due                  zset ``<job id>:<delivery id>`` → next attempt, epoch s
    webhooks:lock                 held by the API process whose sender is making a pass
"""

from __future__ import annotations

import hashlib

PREFIX = "recalib:"
SEQ_KEY = PREFIX + "jobs:seq"
ACTIVE_KEY = PREFIX + "jobs:active"
FINISHED_KEY = PREFIX + "jobs:finished"
STATUS_COUNTS_KEY = PREFIX + "stats:status"
DURATION_KEY = PREFIX + "stats:duration"
WORKERS_KEY = PREFIX + "workers"
REAPER_LOCK_KEY = PREFIX + "reaper:lock"
DATA_DIR_KEY = PREFIX + "data-dir"
WEBHOOK_WATCH_KEY = PREFIX + "webhooks:watch"
WEBHOOK_DUE_KEY = PREFIX + "webhooks:due"
WEBHOOK_LOCK_KEY = PREFIX + "webhooks:lock"


def as_text(value: bytes | str) -> str:
    """``value`` as str (Redis answers bytes), as rq's ``utils.as_text``."""
    return value.decode() if isinstance(value, bytes) else value


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def job_index_key(tenant: str) -> str:
    return f"{PREFIX}jobs:index:{tenant}"


def idem_key(tenant: str, key: str) -> str:
    return f"{PREFIX}jobs:idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"


def file_index_key(tenant: str) -> str:
    return f"{PREFIX}files:index:{tenant}"


def file_sha_key(tenant: str) -> str:
    return f"{PREFIX}files:sha256:{tenant}"


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


def webhook_state_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:webhook"


def deliveries_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:deliveries"
