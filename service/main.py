"""The FastAPI app: :func:`create_app` wires settings, Redis, stores, auth, routes and problems.

Run it with ``recalib serve`` or ``uvicorn --factory service.main:create_app``. The OpenAPI
document is at ``/openapi.json``; FastAPI's ``/docs`` and ``/redoc`` are off: they load scripts
from a CDN without Subresource Integrity and carry no Content-Security-Policy, on the origin that
holds the web page's login cookie.

The app's lifespan prepares the upload area (removing uploads that a killed process left
half-done) and runs the reaper (re-queues or fails jobs of dead workers) in a daemon thread until
shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from recalib import __version__, defaults
from recalib.files import data_dir
from recalib.files.artifacts import ArtifactStore
from recalib.files.storage import open_storage, scratch_root
from recalib.files.store import FileStore
from recalib.jobs.connection import connect_redis
from recalib.jobs.job_store import JobStore
from recalib.jobs.recovery import Reaper
from recalib.settings import Settings, get_settings
from recalib.webhooks.sender import WebhookSender
from recalib.webhooks.signing import WebhookSecrets
from service import background
from service.api.main import api_router
from service.auth import ApiKeys
from service.limits import RequestLimits
from service.metrics import ServiceCollector, metrics_registry
from service.problems import install_problem_handlers, use_problem_media_type

logger = logging.getLogger(__name__)


DESCRIPTION = """\
Re-estimate the BatchNorm statistics of a PyTorch model on a sample of a new domain (AdaBN).

Upload the model and data (`POST /v1/files`), create a job (`POST /v1/jobs`), follow it
(`GET /v1/jobs/{id}` or its `/events`), then download `/report`, `/checkpoint` and `/folded`.
Errors are RFC 9457 `application/problem+json` documents. With `RECALIB_API_KEYS` set, every
`/v1` route needs `Authorization: Bearer <key>`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API. ``settings`` default to the environment (``RECALIB_*``)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="recalib",
        version=__version__,
        description=DESCRIPTION,
        lifespan=_lifespan,
        docs_url=None,  # see the module docstring: no CDN scripts on the cookie's origin
        redoc_url=None,
    )
    conn = connect_redis(settings)
    app.state.settings = settings
    app.state.redis = conn
    app.state.api_keys = ApiKeys(settings.api_keys)
    app.state.webhook_secrets = WebhookSecrets(settings.webhook_secrets)  # bad entries fail here
    app.state.job_store = JobStore(conn, settings)
    storage = open_storage(settings)
    app.state.storage = storage
    app.state.file_store = FileStore(storage, conn, settings.max_upload_bytes)
    app.state.artifact_store = ArtifactStore(storage, scratch_root(settings))
    app.state.metrics_registry = metrics_registry(
        ServiceCollector(conn, settings, app.state.job_store, app.state.file_store)
    )
    install_problem_handlers(app)
    app.add_middleware(
        RequestLimits,  # type: ignore[arg-type]
        max_body_bytes=settings.max_request_bytes,
        max_header_bytes=settings.http_max_header_bytes,
        idle_timeout_s=settings.upload_idle_timeout_s,
        uncapped=_is_upload,
    )
    app.include_router(api_router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


STREAMED_UPLOADS = frozenset({("POST", "/v1/files"), ("POST", "/submit")})
"""Routes whose bodies stream to disk under RECALIB_MAX_UPLOAD_BYTES (the API's upload and the
web page's submit form), not under the JSON cap RECALIB_MAX_REQUEST_BYTES."""


def _is_upload(scope: dict[str, Any]) -> bool:
    return (scope.get("method"), scope.get("path", "").rstrip("/")) in STREAMED_UPLOADS


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
    state.file_store.open()
    data_dir.publish(state.redis, state.settings, state.storage)  # a worker can tell its own
    reaper = Reaper(state.redis, state.settings, state.file_store, state.artifact_store)
    sender = WebhookSender(state.redis, state.settings, state.webhook_secrets)
    loops = [
        background.start(
            "reaper",
            background.reaper_pass(reaper),
            state.settings.reaper_interval_s,
            background.REAPER_JOIN_S,
        ),
        background.start(
            "webhooks",
            background.sender_pass(sender),
            defaults.WEBHOOK_POLL_S,
            background.SENDER_JOIN_S,
        ),
    ]
    logger.info("recalib API %s ready; data in %s", __version__, state.storage.describe())
    try:
        yield
    finally:
        for loop in loops:
            loop.stop.set()
        for loop in loops:
            loop.close()
        state.file_store.close()
        state.redis.close()
