"""recalib.inputs.uri_fetch: an https input has a total deadline (RECALIB_URI_FETCH_DEADLINE_S).

httpx's timeouts are per read, so a source that trickles a byte every half second would hold
a worker until the job's timeout. A real HTTPS server (self-signed, trusted by the test)
trickles the body, trickles the headers, or redirects slowly to a short trickle (each hop
under the deadline, the whole fetch over it).
"""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from recalib.errors import UserError
from recalib.inputs.outbound import OutboundPolicy
from recalib.inputs.uri_fetch import FetchContext, Sink, fetch
from recalib.settings import get_settings

DEADLINE_S = 2
TRICKLE_S = 0.5


class _Trickle(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        with contextlib.suppress(OSError):  # the client hangs up at its deadline
            if self.path == "/body.npz":
                self._trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n", b"x" * 16)
            elif self.path == "/headers.npz":
                self._trickle(b"HTTP/1.1 200 OK\r\nX-Slow: ", b"y" * 16)
            elif self.path == "/redirect.npz":
                time.sleep(1.5)
                self.wfile.write(
                    b"HTTP/1.1 302 Found\r\nLocation: /short.npz\r\nContent-Length: 0\r\n\r\n"
                )
            elif self.path == "/short.npz":  # 1.5 s alone: under the deadline
                self._trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", b"abc")

    def _trickle(self, head: bytes, slow: bytes) -> None:
        self.wfile.write(head)
        self.wfile.flush()
        for byte in slow:
            time.sleep(TRICKLE_S)
            self.wfile.write(bytes([byte]))
            self.wfile.flush()

    def log_message(self, *args: object) -> None:
        del args


@pytest.fixture(scope="module")
def trickling_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``(base URL, CA file)`` of an HTTPS server on 127.0.0.1 that answers a byte at a time."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("RECALIB_URI_FETCH_DEADLINE_S", str(DEADLINE_S))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize("path", ["/body.npz", "/headers.npz", "/redirect.npz"])
@pytest.mark.usefixtures("short_deadline")
def test_a_trickling_source_fails_at_the_fetch_deadline(
    trickling_server: tuple[str, Path], tmp_path: Path, path: str
) -> None:
    base, ca = trickling_server
    uri = f"{base}{path}"
    ctx = FetchContext(
        OutboundPolicy(["127.0.0.1"]), 1 << 20, verify=ssl.create_default_context(cafile=ca)
    )
    sink = Sink(tmp_path / "calibration.npz", ctx.max_bytes, "calibration_uri", uri)
    started = time.monotonic()
    try:
        with pytest.raises(UserError) as info:
            fetch(uri, "calibration_uri", sink, None, ctx)
    finally:
        sink.close()
    elapsed = time.monotonic() - started
    assert elapsed < DEADLINE_S + 1.5, f"failed after {elapsed:.1f} s"
    message = str(info.value)
    assert message.startswith(f"calibration_uri: cannot fetch {uri}: "), message
    assert f"{DEADLINE_S} s" in message and "RECALIB_URI_FETCH_DEADLINE_S" in message, message
    assert info.value.field == "calibration_uri"
