"""Talking to an MLflow registry: ``models:/`` URIs, the client, and what its errors mean.

Credentials come from MLflow's own environment variables (``MLFLOW_TRACKING_TOKEN``,
``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``...). Requests are retried at most
:data:`MAX_RETRIES` times with a :data:`REQUEST_TIMEOUT_S` timeout (MLflow's defaults would
hold a job for minutes when the server is down) unless the operator set MLflow's variables for
them. ``mlflow`` is imported only here and in :mod:`recalib.registry.models`, only when used.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

from recalib.errors import InvalidOptionError, NotFoundError, ServiceUnavailableError

SCHEME = "models"
MAX_RETRIES, REQUEST_TIMEOUT_S = 2, 30
MODELS_URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))$")
_QUIET_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(MAX_RETRIES),
    "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S),
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


@dataclass(frozen=True)
class ModelRef:
    """A ``models:/`` URI, parsed: a version number or an alias."""

    name: str
    version: str | None
    alias: str | None


def parse_models_uri(uri: str, field: str = "model_uri") -> ModelRef:
    """``uri`` parsed (:class:`InvalidOptionError` naming ``field`` if no ``models:/`` URI)."""
    match = MODELS_URI_RE.match(uri)
    if match is None:
        raise InvalidOptionError(
            f"{field}: {uri!r} is not models:/<name>/<version> or models:/<name>@<alias>",
            field=field,
        )
    return ModelRef(match["name"], match["version"], match["alias"])


def check_configured(tracking_uri: str, field: str) -> None:
    """Refuse (422 naming ``field``) a registry request on a server that has no registry."""
    if not tracking_uri:
        raise InvalidOptionError(
            f"{field}: this server has no MLflow registry; the operator sets "
            "RECALIB_MLFLOW_TRACKING_URI (and installs recalib[mlflow] on the workers)",
            field=field,
        )


@contextlib.contextmanager
def registry_client(tracking_uri: str, field: str) -> Iterator[Any]:
    """An ``MlflowClient`` on ``tracking_uri``, with bounded retries while it is in use."""
    check_configured(tracking_uri, field)
    try:
        from mlflow import MlflowClient
    except ImportError as exc:
        raise ServiceUnavailableError(
            f"{field}: the MLflow client is not installed on this worker; the operator installs "
            "recalib[mlflow] (mlflow-skinny)"
        ) from exc
    saved = {name: os.environ.get(name) for name in _QUIET_ENV}
    os.environ.update({k: v for k, v in _QUIET_ENV.items() if saved[k] is None})
    try:
        yield MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)


def reraise(exc: Exception, what: str, field: str, tracking_uri: str) -> NoReturn:
    """Turn an MLflow exception into ours: missing → 404-type, unreachable → unavailable."""
    code = getattr(exc, "error_code", None)
    if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
        message = str(exc).split(": ", 1)[-1]
        raise NotFoundError(f"{field}: {what}: {message}", field=field) from exc
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        raise ServiceUnavailableError(
            f"{field}: the MLflow registry refused {what} ({code}); the operator checks the "
            "worker's MLflow credentials (MLFLOW_TRACKING_TOKEN or _USERNAME/_PASSWORD)"
        ) from exc
    raise ServiceUnavailableError(
        f"{field}: {what} failed at the MLflow registry {_safe(tracking_uri)} "
        f"({type(exc).__name__}: {str(exc)[:200]})"
    ) from exc


def _safe(uri: str) -> str:
    """``uri`` without any ``user:password@`` part (for messages and logs)."""
    return re.sub(r"//[^/@]*@", "//", uri)
