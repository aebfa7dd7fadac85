"""uvicorn's own limits from the settings (``service.server.uvicorn_options``), on a real server:
an idle keep-alive connection is closed, and connections past the limit get 503 at once."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live import REPO_ROOT, free_port

KEEPALIVE_S = 1
MAX_CONNECTIONS = 3


@pytest.fixture
def server(tmp_path: Path, redis_conn, redis_url: str) -> Iterator[str]:
    """``python -m service.server`` (what the image runs) with small limits."""
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "RECALIB_REDIS_URL": redis_url,
        "RECALIB_DATA_DIR": str(tmp_path / "data"),
        "RECALIB_HTTP_KEEPALIVE_S": str(KEEPALIVE_S),
        "RECALIB_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "UVICORN_HOST": "127.0.0.1",
        "UVICORN_PORT": str(port),
    }
    proc = subprocess.Popen([sys.executable, "-m", "service.server"], env=env, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the API did not start"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _request(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body) read from a keep-alive connection."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return answer


def test_an_idle_keep_alive_connection_is_closed(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert _request(sock).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server
        assert time.monotonic() - started < KEEPALIVE_S + 3


def test_connections_past_the_limit_get_503(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    held = [
        socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CONNECTIONS)
    ]
    try:
        time.sleep(0.2)
        answer = httpx.get(f"{server}/healthz", timeout=10)
        assert answer.status_code == 503
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(f"{server}/healthz", timeout=10).status_code == 200
