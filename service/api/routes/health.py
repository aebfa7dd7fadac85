"""``/healthz`` (the process answers) and ``/readyz`` (Redis answers, the store takes a probe
write: the data directory, or the object store with our credentials; and, with
``RECALIB_READY_REQUIRES_WORKER``, a live worker can take the queue)."""

from __future__ import annotations

import logging

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from recalib.contract import Readiness, WorkerInfo
from recalib.errors import RecalibError
from recalib.files.storage import Storage, open_storage
from recalib.jobs.workers import live_workers, worker_ttl_s
from recalib.settings import Settings
from service.api.deps import RedisDep, SettingsDep

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the API process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready; `detail` says why."}},
    summary="Readiness: Redis answers, the data directory is writable (and a worker is alive)",
)
def readyz(request: Request, conn: RedisDep, settings: SettingsDep) -> JSONResponse:
    readiness = check_readiness(conn, settings, request.app.state.storage)
    return JSONResponse(
        readiness.model_dump(mode="json"), status_code=200 if readiness.ready else 503
    )


def check_readiness(
    conn: redis.Redis, settings: Settings, storage: Storage | None = None
) -> Readiness:
    """Ping Redis, write and delete a probe object in the store, list live workers.

    Not ready without a live worker only when ``settings.ready_requires_worker`` (``recalib
    serve``): an API deployed on its own must stay in rotation while its workers (re)start.
    """
    problems: list[str] = []
    workers: list[WorkerInfo] = []
    redis_ok = False
    try:
        redis_ok = bool(conn.ping())
        workers = live_workers(conn, settings)
    except redis.RedisError as exc:
        problems.append(f"Redis does not answer ({type(exc).__name__})")
    storage_problem = _storage_problem(storage or open_storage(settings))
    storage_ok = storage_problem is None
    if storage_problem is not None:
        problems.append(storage_problem)
    workers_ok = bool(workers) or not settings.ready_requires_worker
    if redis_ok and not workers_ok:
        problems.append(
            "no live worker can take the queue (none beat within 3 × RECALIB_WORKER_HEARTBEAT_S "
            f"= {worker_ttl_s(settings)} s; RECALIB_READY_REQUIRES_WORKER is on)"
        )
    return Readiness(
        ready=redis_ok and storage_ok and workers_ok,
        redis=redis_ok,
        storage_writable=storage_ok,
        workers=workers,
        detail="; ".join(problems) or None,
    )


def _storage_problem(storage: Storage) -> str | None:
    """None when a probe object can be written and deleted, else what is wrong."""
    try:
        storage.probe()
    except RecalibError as exc:
        logger.warning("readiness probe: %s", exc)
        if storage.is_local:
            return f"data directory {storage.url} is not writable"
        return str(exc)
    return None
