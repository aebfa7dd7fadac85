"""Real HTTP for the API tests: the app under uvicorn, in a thread or in a child process.

Starlette's TestClient calls the app in-process without sockets; these run the real server on a
free loopback port, so uploads stream, connections drop and processes die as they do in production.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from recalib.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_settings(data_dir: Path, redis_url: str, **overrides: object) -> Settings:
    return Settings(redis_url=redis_url, data_dir=data_dir, **overrides)  # type: ignore[arg-type]


class ApiThread:
    """``create_app(settings)`` served by uvicorn in a daemon thread (lifespan included)."""

    def __init__(self, settings: Settings) -> None:
        from service.main import create_app

        self.app = create_app(settings)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> ApiThread:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the API did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=20)
        self._sock.close()

    def client(self, api_key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


class ApiProcess:
    """``uvicorn --factory service.main:create_app`` in a child process (can be killed)."""

    def __init__(self, settings: Settings, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = os.environ | {
            "RECALIB_REDIS_URL": str(settings.redis_url),
            "RECALIB_DATA_DIR": str(settings.data_dir),
            "RECALIB_MAX_UPLOAD_BYTES": str(settings.max_upload_bytes),
            "RECALIB_API_KEYS": ",".join(settings.api_keys),
            "PYTHONPATH": str(REPO_ROOT),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ApiProcess:
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "service.main:create_app"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=REPO_ROOT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("the API did not answer /healthz within 30 s")

    def kill(self) -> None:
        """SIGKILL: no lifespan shutdown, like a crash or the OOM killer."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ApiProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
