"""What one request may cost the API: capped headers and bodies, and a body idle timeout.

:class:`RequestLimits` is pure ASGI middleware around the whole app:

- request headers (names and values together) over ``RECALIB_HTTP_MAX_HEADER_BYTES`` are refused
  with 431 whatever the HTTP parser (uvicorn's h11 enforces a limit of its own while reading,
  httptools none);
- every body except an upload's is capped at ``RECALIB_MAX_REQUEST_BYTES``: a ``Content-Length``
  over the cap is answered 413 before anything is read, and a body without one (chunked) is
  refused with 413 as soon as what arrived passes the cap, so no route ever holds more than the
  cap in memory (FastAPI reads a JSON body whole before validating it). Uploads
  (``POST /v1/files``) stream to disk under their own cap, ``RECALIB_MAX_UPLOAD_BYTES``;
- any body, uploads included, that sends nothing for ``RECALIB_UPLOAD_IDLE_TIMEOUT_S`` is
  refused with 408 and the connection is closed, so a stalled client holds no connection, part
  file or worker thread for longer than that.

The body errors are raised from ``receive`` as HTTP exceptions, which reach the route (FastAPI
re-raises them while reading a body) and become problem documents in :mod:`service.problems`.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recalib.errors import PayloadTooLargeError
from service.problems import http_problem_response

CLOSE = {"Connection": "close"}


class BodyError(HTTPException):
    """An HTTP error about the request body (the problem's ``field`` is ``body``)."""

    field = "body"

    def __init__(self, status_code: int, detail: str, *, type_slug: str, title: str) -> None:
        super().__init__(status_code, detail, headers=CLOSE)
        self.type_slug, self.title = type_slug, title


def too_large(max_bytes: int) -> BodyError:
    return BodyError(
        413,
        f"the request body is larger than {max_bytes} bytes (RECALIB_MAX_REQUEST_BYTES); "
        "uploads go to POST /v1/files",
        type_slug=PayloadTooLargeError.type_slug,
        title=PayloadTooLargeError.title,
    )


def _head_too_large(max_bytes: int) -> HTTPException:
    return HTTPException(
        431,
        f"the request headers are larger than {max_bytes} bytes (RECALIB_HTTP_MAX_HEADER_BYTES)",
        headers=CLOSE,
    )


class RequestLimits:
    """Cap heads and bodies (bodies except where ``uncapped(scope)``); time out stalled bodies."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_header_bytes: int,
        idle_timeout_s: float,
        uncapped: Callable[[Scope], bool],
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.idle_timeout_s = idle_timeout_s
        self.uncapped = uncapped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head_bytes = sum(len(name) + len(value) for name, value in scope["headers"])
        if head_bytes > self.max_header_bytes:
            response = http_problem_response(_head_too_large(self.max_header_bytes), None)
            await response(scope, receive, send)
            return
        capped = not self.uncapped(scope)
        declared = Headers(scope=scope).get("content-length", "")
        if capped and declared.isdigit() and int(declared) > self.max_body_bytes:
            response = http_problem_response(too_large(self.max_body_bytes), scope.get("path"))
            await response(scope, receive, send)
            return
        responding = False

        async def watched_send(message: Message) -> None:
            nonlocal responding
            responding = True
            await send(message)

        await self.app(scope, self._limited(receive, capped, lambda: responding), watched_send)

    def _limited(self, receive: Receive, capped: bool, responding: Callable[[], bool]) -> Receive:
        received = 0
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done or responding():
                # The body was read, or the response began without it: such calls only watch
                # for a disconnect (streaming and file responses); a limit has nothing to stop.
                return await receive()
            try:
                with anyio.fail_after(self.idle_timeout_s):
                    message = await receive()
            except TimeoutError:
                raise BodyError(
                    408,
                    f"the request body stalled: nothing arrived for {self.idle_timeout_s:g} s "
                    "(RECALIB_UPLOAD_IDLE_TIMEOUT_S)",
                    type_slug="request-timeout",
                    title="Request timeout",
                ) from None
            if message["type"] != "http.request":
                body_done = True
                return message
            received += len(message.get("body", b""))
            body_done = not message.get("more_body", False)
            if capped and received > self.max_body_bytes:
                raise too_large(self.max_body_bytes)
            return message

        return limited_receive
