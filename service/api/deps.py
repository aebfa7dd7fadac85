"""Route dependencies as ``Annotated`` aliases, so route signatures read like prose.

Everything is built once per app by :func:`service.main.create_app` and kept on ``app.state``.
The dependencies are ``async def`` although they do no I/O: FastAPI runs a plain ``def``
dependency in the thread pool, one thread hop per dependency per request.
"""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import Depends, Path, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from recalib.files.artifacts import ArtifactStore
from recalib.files.store import FileStore
from recalib.ids import FILE_ID_PATTERN, JOB_ID_PATTERN
from recalib.jobs.job_store import JobStore
from recalib.settings import Settings
from service.auth import ApiKeys
from service.web import session

# Declared for the OpenAPI document; the header is checked by ApiKeys (auto_error off).
_bearer = HTTPBearer(
    auto_error=False,
    description="`Authorization: Bearer <key>`; required when the server has RECALIB_API_KEYS.",
)


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _redis(request: Request) -> redis.Redis:
    return request.app.state.redis


async def _job_store(request: Request) -> JobStore:
    return request.app.state.job_store


async def _file_store(request: Request) -> FileStore:
    return request.app.state.file_store


async def _artifact_store(request: Request) -> ArtifactStore:
    return request.app.state.artifact_store


async def _tenant(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> str:
    keys: ApiKeys = request.app.state.api_keys
    return keys.tenant_for(session.authorization(request))  # the header; cookie for GET/HEAD


SettingsDep = Annotated[Settings, Depends(_settings)]
RedisDep = Annotated[redis.Redis, Depends(_redis)]
JobStoreDep = Annotated[JobStore, Depends(_job_store)]
FileStoreDep = Annotated[FileStore, Depends(_file_store)]
TenantDep = Annotated[str, Depends(_tenant)]
ArtifactStoreDep = Annotated[ArtifactStore, Depends(_artifact_store)]

JobIdPath = Annotated[str, Path(pattern=JOB_ID_PATTERN, examples=["j_Zx81bQe0LsP3mNaa"])]
FileIdPath = Annotated[str, Path(pattern=FILE_ID_PATTERN, examples=["f_3kq0cV2m9xLr8tQw"])]

PageLimitQuery = Annotated[int, Query(ge=1, le=500)]
"""Items per page of a list (default it in the route: 50)."""
CursorQuery = Annotated[str | None, Query(max_length=128)]
"""Where a list page starts: the ``next_cursor`` of the page before."""
