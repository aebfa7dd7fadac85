"""``/login`` and ``/logout``: the API key in an HttpOnly, SameSite=Strict cookie (see
:mod:`service.web.session`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from recalib.errors import RecalibError, UnauthorizedError
from service.web import session
from service.web.pages import render, small_form

router = APIRouter(include_in_schema=False)


@router.get("/login", response_class=HTMLResponse)
def login_page(
    request: Request, next_path: Annotated[str | None, Query(alias="next", max_length=2048)] = None
) -> Response:
    return render(request, "login.html", next_path=session.safe_next(next_path), error=None)


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the key; remember it in the cookie and go back where the user came from."""
    form: dict[str, str] = {}
    try:
        form = await small_form(request)
        session.check_csrf(request, form.get(session.CSRF_FIELD))
        key = form.get("key", "").strip()
        if len(key) > session.MAX_KEY_CHARS:
            raise UnauthorizedError("wrong API key")
        request.app.state.api_keys.tenant_for(f"Bearer {key}")
    except RecalibError as exc:
        status = 401 if isinstance(exc, UnauthorizedError) else exc.http_status
        next_path = session.safe_next(form.get("next"))
        return render(request, "login.html", status, next_path=next_path, error=exc.message)
    response = RedirectResponse(session.safe_next(form.get("next")), status_code=303)
    if request.app.state.api_keys.enabled:
        session.set_key_cookie(response, request, key)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    try:
        form = await small_form(request)
        session.check_csrf(request, form.get(session.CSRF_FIELD))
    except RecalibError as exc:
        return render(request, "error.html", exc.http_status, message=exc.message)
    response = RedirectResponse("/login", status_code=303)
    session.clear_key_cookie(response, request)
    return response
