"""Browser sessions of the web page: the API key in a cookie, and CSRF protection of its forms.

A browser cannot add ``Authorization: Bearer`` to a link, an ``<iframe>`` or an ``EventSource``,
so the login form stores the key in the ``recalib_key`` cookie (HttpOnly: no script reads it;
SameSite=Strict: no other site's page makes the browser send it; Secure over HTTPS). The cookie is
honoured for safe methods (GET, HEAD) of the whole API, never for ones that change anything: a
POST, DELETE… needs the header, or is one of the web page's forms, which are CSRF-checked.

CSRF: every form carries a token equal to the ``recalib_csrf`` cookie (double submit: another site
can neither read nor set that cookie), and a request whose ``Origin`` names another host is refused.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from recalib.errors import UserError

KEY_COOKIE = "recalib_key"
CSRF_COOKIE = "recalib_csrf"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD"})
MAX_KEY_CHARS = 1024


class CsrfError(UserError):
    """A form post without the page's token, or from another site's page."""

    type_slug = "csrf"
    title = "Forbidden"
    http_status = 403


def authorization(request: Request, *, allow_cookie: bool | None = None) -> str | None:
    """The request's ``Authorization`` header; without one, ``Bearer <key cookie>`` when cookies
    count (by default: for safe methods only)."""
    header = request.headers.get("authorization")
    if header:
        return header
    if allow_cookie is None:
        allow_cookie = request.method in SAFE_METHODS
    key = request.cookies.get(KEY_COOKIE)
    if allow_cookie and key and len(key) <= MAX_KEY_CHARS:
        return f"Bearer {key}"
    return None


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_key_cookie(response: Response, request: Request, key: str) -> None:
    """Remember ``key`` for this browser session (no expiry: it goes when the browser closes)."""
    response.set_cookie(
        KEY_COOKIE, key, httponly=True, samesite="strict", secure=_secure(request), path="/"
    )


def clear_key_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        KEY_COOKIE, httponly=True, samesite="strict", secure=_secure(request), path="/"
    )


def csrf_token(request: Request) -> str:
    """The browser's CSRF token (its cookie), or a new one; pass it to :func:`set_csrf_cookie`."""
    token = request.cookies.get(CSRF_COOKIE, "")
    return token if 32 <= len(token) <= 128 else secrets.token_urlsafe(32)


def set_csrf_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        CSRF_COOKIE, token, httponly=True, samesite="strict", secure=_secure(request), path="/"
    )


def check_origin(request: Request) -> None:
    """Refuse a request whose ``Origin`` (or, lacking it, ``Referer``) is another host."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if source is None:
        return  # not a browser, or one that sends neither: the token still has to match
    host = request.headers.get("host", "")
    if source == "null" or urlsplit(source).netloc != host:
        raise CsrfError("the form was posted from another site's page; reload this page")


def check_csrf(request: Request, submitted: str | None) -> None:
    """The form's token must equal the CSRF cookie, and the post come from this host's page."""
    check_origin(request)
    expected = request.cookies.get(CSRF_COOKIE, "")
    if not expected or not submitted or not hmac.compare_digest(expected, submitted):
        raise CsrfError("the form's security token is missing or stale; reload the page")


def safe_next(target: str | None) -> str:
    """A local path to go to after login (``/`` for anything else: no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
