"""Live workers: each ``recalib worker`` keeps a small hash in Redis that expires without beats.

``recalib:worker:<name>`` holds ``device``, ``state`` (idle/busy/...), ``current_job`` (our job
id, empty when idle), ``last_heartbeat`` (ISO 8601), ``pid`` and ``hostname``. The worker writes
all of it every ``RECALIB_WORKER_HEARTBEAT_S`` seconds (also while a job runs: the worker's
parent process beats, not the work horse; a hash that Redis lost comes back whole) with a TTL of
3 beats, so a worker that dies vanishes from :func:`live_workers` at most
``3 × RECALIB_WORKER_HEARTBEAT_S`` after its last beat; the reaper reads the same hash to find
jobs whose worker died.
"""

from __future__ import annotations

from datetime import UTC, datetime

import redis
from redis.client import Pipeline

from recalib.contract import WorkerInfo
from recalib.keys import WORKERS_KEY, as_text, worker_key
from recalib.settings import Settings

MISSED_BEATS = 3


def worker_ttl_s(settings: Settings) -> int:
    """Seconds a worker stays listed after its last heartbeat."""
    return MISSED_BEATS * settings.worker_heartbeat_s


def beat(
    conn: redis.Redis | Pipeline,
    name: str,
    ttl_s: int,
    **fields: str | int,
) -> None:
    """Refresh a worker's hash (and set ``fields``: pass all of them, so that a hash Redis lost
    is whole again); it expires ``ttl_s`` seconds from now."""
    mapping: dict[str, str | int] = {"last_heartbeat": datetime.now(UTC).isoformat(), **fields}
    conn.hset(worker_key(name), mapping=mapping)  # type: ignore[arg-type]
    conn.expire(worker_key(name), ttl_s)
    conn.sadd(WORKERS_KEY, name)


def unregister(conn: redis.Redis, name: str) -> None:
    with conn.pipeline() as pipe:
        pipe.delete(worker_key(name))
        pipe.srem(WORKERS_KEY, name)
        pipe.execute()


def read_worker(conn: redis.Redis, name: str) -> WorkerInfo | None:
    """A live worker's info, None when its hash has expired (it died or stopped)."""
    raw = conn.hgetall(worker_key(name))
    return _info(name, raw) if raw else None  # type: ignore[arg-type]


def live_workers(conn: redis.Redis, settings: Settings) -> list[WorkerInfo]:
    """Workers that beat within the last ``3 × worker_heartbeat_s`` seconds, sorted by name."""
    del settings  # the TTL set by each worker decides liveness
    names = sorted(as_text(n) for n in conn.smembers(WORKERS_KEY))  # type: ignore[union-attr]
    with conn.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(worker_key(name))
        raws = pipe.execute()
    workers: list[WorkerInfo] = []
    for name, raw in zip(names, raws, strict=True):
        if not raw:
            conn.srem(WORKERS_KEY, name)
            continue
        workers.append(_info(name, raw))
    return workers


def _info(name: str, raw: dict[bytes, bytes]) -> WorkerInfo:
    fields = {as_text(k): as_text(v) for k, v in raw.items()}
    beat_at = fields.get("last_heartbeat")
    return WorkerInfo(
        name=name,
        device=fields.get("device", "unknown"),
        state=fields.get("state", "unknown"),
        current_job=fields.get("current_job") or None,
        sandbox=fields.get("sandbox") or None,
        last_heartbeat=datetime.fromisoformat(beat_at) if beat_at else None,
    )
