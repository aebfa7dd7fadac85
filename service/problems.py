"""Every error response as RFC 9457 ``application/problem+json``: one mapping, installed once.

Our errors carry their HTTP status, type slug and title (:mod:`recalib.errors`); this module only
turns them into :class:`recalib.contract.Problem` bodies. Request validation errors become 422
problems naming the field, an unreachable Redis a 503, anything unexpected a 500 with no traceback
in the body (the traceback goes to the log).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from recalib.contract import Problem
from recalib.errors import InternalError, RecalibError, ServiceUnavailableError, UnauthorizedError

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE_URI = "https://recalib.dev/problems/"

# Locations FastAPI prefixes to a field path; the field name alone is what a user can act on.
_LOC_PREFIXES = {"body", "query", "path", "header", "cookie"}


def problem_type(slug: str) -> str:
    """The ``type`` URI of a problem slug (``not-found`` → ``https://recalib.dev/problems/not-found``)."""
    return PROBLEM_BASE_URI + slug


def problem_response(
    problem: Problem, headers: dict[str, str] | None = None, **extensions: Any
) -> JSONResponse:
    """A JSON response with the problem media type; ``extensions`` become extra members."""
    body = problem.model_dump(mode="json", exclude_none=True) | extensions
    return JSONResponse(
        body, status_code=problem.status, headers=headers, media_type=PROBLEM_MEDIA_TYPE
    )


def problem_from_error(exc: RecalibError, instance: str | None = None) -> Problem:
    """The problem for one of our errors: status, slug and title come from its class."""
    return Problem(
        type=problem_type(exc.type_slug),
        title=exc.title,
        status=exc.http_status,
        detail=exc.message,
        instance=instance,
        field=exc.field,
        file=exc.file,
    )


def field_of(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """``("body", "options", "batch_sizee")`` → ``"options.batch_sizee"``."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in _LOC_PREFIXES:
        parts = parts[1:]
    return ".".join(parts) or "body"


def _validation_problem(exc: RequestValidationError, instance: str) -> JSONResponse:
    errors = [
        {"field": _field_of_error(err), "message": _validation_message(err)} for err in exc.errors()
    ]
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    problem = Problem(
        type=problem_type("invalid-request"),
        title="Invalid request",
        status=422,
        detail=detail,
        instance=instance,
        field=first["field"],
    )
    return problem_response(problem, errors=errors)


def _field_of_error(err: dict[str, Any]) -> str:
    if err.get("type") == "json_invalid":  # loc is ("body", <character offset>)
        return "body"
    return field_of(err.get("loc", ()))


def _validation_message(err: dict[str, Any]) -> str:
    if err.get("type") == "json_invalid":
        loc = err.get("loc", ())
        where = f" at position {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        reason = (err.get("ctx") or {}).get("error") or "JSON decode error"
        return f"invalid JSON{where}: {reason}"
    if err.get("type") == "extra_forbidden":
        return "unknown field (check the spelling; /openapi.json lists the accepted ones)"
    return str(err.get("msg", "invalid value"))


def _http_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "HTTP error"


def _http_slug(status: int) -> str:
    return _http_phrase(status).lower().replace(" ", "-")


async def _on_recalib_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RecalibError):  # registered for RecalibError only
        return await _on_unexpected(request, exc)
    if exc.http_status >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    headers = (
        {"WWW-Authenticate": 'Bearer realm="recalib"'}
        if isinstance(exc, UnauthorizedError)
        else None
    )
    return problem_response(problem_from_error(exc, request.url.path), headers=headers)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        return await _on_unexpected(request, exc)
    return _validation_problem(exc, request.url.path)


def http_problem_response(exc: StarletteHTTPException, instance: str | None) -> JSONResponse:
    """The problem for an HTTP exception; its ``field``, ``type_slug`` and ``title`` attributes,
    where it has them, name the field and the problem type."""
    phrase = _http_phrase(exc.status_code)
    problem = Problem(
        type=problem_type(getattr(exc, "type_slug", None) or _http_slug(exc.status_code)),
        title=getattr(exc, "title", None) or phrase,
        status=exc.status_code,
        detail=str(exc.detail) if exc.detail else phrase,
        instance=instance,
        field=getattr(exc, "field", None),
    )
    return problem_response(problem, headers=dict(exc.headers or {}))


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):
        return await _on_unexpected(request, exc)
    return http_problem_response(exc, request.url.path)


async def _on_redis_down(request: Request, exc: Exception) -> JSONResponse:
    """Any Redis error is the backing service's: down (no answer) or refusing (a read-only
    replica, maxmemory reached, a script or auth error): 503, never 500."""
    logger.warning("Redis unavailable during %s %s: %s", request.method, request.url.path, exc)
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        detail = "the job database does not answer"
    else:  # it answered, and refused: say what it said (READONLY..., OOM...)
        detail = f"the job database refused the request ({type(exc).__name__}: {exc})"
    error = ServiceUnavailableError(f"Redis unavailable: {detail}; retry later")
    problem = problem_from_error(error, request.url.path)
    problem.title = "Redis unavailable"
    return problem_response(problem, headers={"Retry-After": "5"})


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    error = InternalError("internal error; the server log has the details")
    return problem_response(problem_from_error(error, request.url.path))


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` an ``application/problem+json`` response."""
    app.add_exception_handler(RecalibError, _on_recalib_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(redis.RedisError, _on_redis_down)
    app.add_exception_handler(Exception, _on_unexpected)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status documented as a :class:`Problem`."""
    return {
        status: {"model": Problem, "description": HTTPStatus(status).phrase} for status in statuses
    }


def use_problem_media_type(openapi: dict[str, Any]) -> dict[str, Any]:
    """Document error bodies as ``application/problem+json`` (FastAPI says ``application/json``)."""
    for operations in openapi.get("paths", {}).values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if str(status)[0] in "45" and "application/json" in content:
                    content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
    return openapi
