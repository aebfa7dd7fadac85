"""A real webhook receiver for the tests: an ``http.server`` thread on 127.0.0.1.

It records every request (headers and body) and answers as ``status`` says (200, 500, …), after
``delay_s``. :meth:`Receiver.stop` closes its socket (senders then get "connection refused") and
:meth:`Receiver.start` opens it again on the same port, as a receiver that was down comes back.
Receivers check signatures with the real ``standardwebhooks`` package (:func:`verify`).
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int
    at: float


class Receiver:
    """Records POSTs; answers ``status`` after ``delay_s`` (both may change while it runs)."""

    def __init__(self, status: int = 200, delay_s: float = 0.0) -> None:
        self.status = status
        self.delay_s = delay_s
        self.received: list[Received] = []
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/recalib"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                time.sleep(receiver.delay_s)
                status = receiver.status
                with receiver._lock:
                    receiver.received.append(
                        Received(dict(self.headers.items()), body, status, time.monotonic())
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def messages(self, type_: str | None = None, answered: int | None = None) -> list[Received]:
        """Requests received so far, optionally of one ``type`` and answered with one status."""
        import json

        with self._lock:
            found = list(self.received)
        return [
            r
            for r in found
            if (type_ is None or json.loads(r.body)["type"] == type_)
            and (answered is None or r.answered == answered)
        ]

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def verify(secret: str, message: Received) -> dict[str, Any]:
    """The message's JSON as ``standardwebhooks`` verifies it (raises when the signature is bad)."""
    return dict(Webhook(secret).verify(message.body, message.headers))
