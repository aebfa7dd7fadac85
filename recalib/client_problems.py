"""The client's half of :mod:`recalib.errors`: a problem document (RFC 9457) the server answers
turned back into the error class it names, and a local validation error into
:class:`~recalib.errors.InvalidOptionError` naming the field.
"""

from __future__ import annotations

import httpx

from recalib.errors import (
    InternalError,
    InvalidOptionError,
    RecalibError,
    ServiceUnavailableError,
    UserError,
)


def raise_for_problem(response: httpx.Response) -> None:
    """Raise the :mod:`recalib.errors` class a 4xx/5xx problem document names."""
    if response.status_code < 400:
        return
    try:
        problem = response.json()
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    slug = str(problem.get("type", "")).rstrip("/").rsplit("/", 1)[-1]
    cls = _error_classes().get(slug) or _class_for_status(response.status_code)
    detail = problem.get("detail") or f"HTTP {response.status_code} from {response.request.url}"
    raise cls(str(detail), field=problem.get("field"), file=problem.get("file"))


def _error_classes() -> dict[str, type[RecalibError]]:
    classes: dict[str, type[RecalibError]] = {"invalid-request": InvalidOptionError}
    pending: list[type[RecalibError]] = [RecalibError]
    while pending:
        cls = pending.pop()
        classes.setdefault(cls.type_slug, cls)
        pending.extend(cls.__subclasses__())
    return classes


def _class_for_status(status: int) -> type[RecalibError]:
    if status == 503:
        return ServiceUnavailableError
    return UserError if status < 500 else InternalError


def invalid_option(exc: ValueError) -> InvalidOptionError:
    """``exc`` (pydantic's ``ValidationError`` is a ``ValueError``) naming its first field."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and errors():
        first = errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        return InvalidOptionError(f"{field}: {first.get('msg')}", field=field or None)
    return InvalidOptionError(str(exc))
