"""The FastAPI app: :func:`create_app` wires settings, Redis, stores, auth, routes and problems.

Run it with ``recalib serve`` or ``uvicorn --factory service.main:create_app``. The app's lifespan
prepares the upload area (removing uploads that a killed process left half-done) and runs the
reaper (re-queues or fails jobs of dead workers) in a daemon thread until shutdown.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from recalib import __version__
from recalib.settings import Settings, get_settings
from service.api.routes import artifacts, files, health, jobs, metrics
from service.auth import ApiKeys
from service.file_store import FileStore
from service.job_store import JobStore
from service.metrics import ServiceCollector, metrics_registry
from service.problems import install_problem_handlers, use_problem_media_type
from service.reaper import Reaper

logger = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REAPER_JOIN_S = 10.0

DESCRIPTION = """\
Re-estimate the BatchNorm statistics of a PyTorch model on a sample of a new domain (AdaBN).

Upload the model and data (`POST /v1/files`), create a job (`POST /v1/jobs`), follow it
(`GET /v1/jobs/{id}` or its `/events`), then download `/report`, `/checkpoint` and `/folded`.
Errors are RFC 9457 `application/problem+json` documents. With `RECALIB_API_KEYS` set, every
`/v1` route needs `Authorization: Bearer <key>`.
"""


def connect_redis(settings: Settings) -> redis.Redis:
    """A Redis client for ``settings.redis_url`` (connects lazily, on first use)."""
    url = settings.redis_url
    if url is None:
        logger.warning("RECALIB_REDIS_URL is not set; using %s", DEFAULT_REDIS_URL)
        url = DEFAULT_REDIS_URL
    return redis.Redis.from_url(
        url, socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=30
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API. ``settings`` default to the environment (``RECALIB_*``)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="recalib",
        version=__version__,
        description=DESCRIPTION,
        lifespan=_lifespan,
    )
    conn = connect_redis(settings)
    app.state.settings = settings
    app.state.redis = conn
    app.state.api_keys = ApiKeys(settings.api_keys)
    app.state.job_store = JobStore(conn, settings)
    app.state.file_store = FileStore(settings.data_dir, conn, settings.max_upload_bytes)
    app.state.metrics_registry = metrics_registry(
        ServiceCollector(conn, settings, app.state.job_store, app.state.file_store)
    )
    install_problem_handlers(app)
    for module in (files, jobs, artifacts, health, metrics):
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        app.openapi_schema = use_problem_media_type(schema)
    return app.openapi_schema


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    state.api_keys.log_mode()
    state.file_store.uploads.open()
    stop = threading.Event()
    reaper = Reaper(state.redis, state.settings)
    thread = threading.Thread(
        target=_run_reaper,
        args=(reaper, stop, state.settings.reaper_interval_s),
        name="recalib-reaper",
        daemon=True,
    )
    thread.start()
    logger.info("recalib API %s ready; data in %s", __version__, state.settings.data_dir)
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=REAPER_JOIN_S)
        state.file_store.uploads.close()
        state.redis.close()


def _run_reaper(reaper: Reaper, stop: threading.Event, interval_s: float) -> None:
    """Keep the reaper going: an error (Redis restarting) is logged and the loop resumes."""
    while not stop.is_set():
        try:
            reaper.run_forever(stop)
        except Exception:
            logger.exception("reaper stopped by an error; restarting in %.1f s", interval_s)
            stop.wait(interval_s)
