"""Rendering and request helpers shared by the web page's routes.

Every page is rendered with Jinja2 (autoescape on: job ids, file names, error messages and
options all come from users) and carries a Content-Security-Policy that allows only the page's own
nonce'd inline ``<script>`` and ``<style>``, frames from this origin (``report.html``) and
connections to it (the SSE progress stream); the page itself may not be framed.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import redis
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader

from recalib.errors import NotFoundError, PayloadTooLargeError, RecalibError
from recalib.files.store import FileStore
from service.web import session

logger = logging.getLogger(__name__)

_templates = Jinja2Templates(
    env=Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
)
MAX_SMALL_FORM_BYTES = 8192
_CSP = (
    "default-src 'self'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
    "img-src 'self' data:; frame-src 'self'; connect-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Template ``name`` with the page's nonce, CSRF token and security headers."""
    nonce = secrets.token_urlsafe(16)
    token = session.csrf_token(request)
    keys = request.app.state.api_keys
    context |= {"nonce": nonce, "csrf_token": token, "keys_enabled": keys.enabled}
    response = _templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers.update(
        {
            "Content-Security-Policy": _CSP.format(nonce=nonce),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        }
    )
    session.set_csrf_cookie(response, request, token)
    return response


def error_page(request: Request, exc: RecalibError | redis.RedisError) -> HTMLResponse:
    """Our errors with their status and message; Redis down as 503."""
    if isinstance(exc, RecalibError):
        return render(request, "error.html", exc.http_status, message=exc.message)
    logger.warning("web page: the job store is unreachable: %s", exc)
    return render(request, "error.html", 503, message="the job store (Redis) is unreachable")


def tenant_of(request: Request, *, allow_cookie: bool | None = None) -> str:
    """The request's tenant (raises :class:`UnauthorizedError`)."""
    keys = request.app.state.api_keys
    return str(keys.tenant_for(session.authorization(request, allow_cookie=allow_cookie)))


def to_login(request: Request) -> RedirectResponse:
    """Send the browser to the login form, coming back here after."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)


def filename_of(files: FileStore, tenant: str, file_id: str | None) -> str | None:
    """The uploaded file's name; its id once it is deleted; None without a file."""
    if file_id is None:
        return None
    try:
        return files.get(tenant, file_id).filename
    except NotFoundError:
        return file_id


async def small_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body of at most 8 KiB, first value per name."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_SMALL_FORM_BYTES:
            raise PayloadTooLargeError(
                f"the form is over {MAX_SMALL_FORM_BYTES} bytes", field="body"
            )
    values = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: items[0] for name, items in values.items()}
