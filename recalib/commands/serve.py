"""``recalib serve``: the API, and with no ``RECALIB_REDIS_URL`` an embedded Valkey and workers.

Without ``RECALIB_REDIS_URL``, everything runs from one command: a Valkey server with its data
(append-only) under ``<data dir>/valkey``, ``--workers`` worker processes (default 1) and the API.
With it, only the API (plus ``--workers`` workers if given). Ctrl-C or SIGTERM stops the API,
then the workers (a running job gets ``WORKER_GRACE_S`` to finish, then is handed back to the
queue), then Valkey: nothing it started is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from recalib.commands import require
from recalib.settings import get_settings

logger = logging.getLogger(__name__)

WORKER_GRACE_S = 10.0
WORKER_KILL_S = 5.0


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="Bind address (default: RECALIB_HOST, 127.0.0.1).")
    parser.add_argument("--port", type=int, help="Port (default: RECALIB_PORT, 8000).")
    parser.add_argument(
        "--workers",
        type=int,
        help="Worker processes to start (default: 1 with the embedded Valkey, 0 with "
        "RECALIB_REDIS_URL).",
    )
    parser.add_argument("--data-dir", type=Path, help="Data directory (default: RECALIB_DATA_DIR).")


def main(args: argparse.Namespace) -> int:
    require("service", "serve")
    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    data_dir = Path(args.data_dir or settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _exit_on_signal)  # cleanup below runs on SIGTERM too
    with contextlib.ExitStack() as stack:
        redis_url = settings.redis_url
        if redis_url is None:
            redis_url = stack.enter_context(_embedded_redis(data_dir))
        n_workers = args.workers if args.workers is not None else (0 if settings.redis_url else 1)
        env = os.environ | {"RECALIB_REDIS_URL": redis_url, "RECALIB_DATA_DIR": str(data_dir)}
        os.environ.update(env)  # the API reads its settings from the environment
        get_settings.cache_clear()
        stack.enter_context(_workers(n_workers, env))
        sys.stdout.write(
            f"recalib API on http://{host}:{port} (docs: /docs); data in {data_dir}; "
            f"{n_workers} worker(s); Ctrl-C stops everything\n"
        )
        sys.stdout.flush()
        import uvicorn

        uvicorn.run(
            "service.main:create_app",
            factory=True,
            host=host,
            port=port,
            log_level=settings.log_level.lower(),
        )
    return 0


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    del frame
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _embedded_redis(data_dir: Path) -> Iterator[str]:
    from recalib.jobs.embedded_redis import EmbeddedRedis

    # Start Valkey with SIGINT blocked: it inherits the mask, so a Ctrl-C in the terminal (sent
    # to the whole process group) does not stop it before the workers are done with it.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        server = EmbeddedRedis(data_dir).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    try:
        yield server.url
    finally:
        with _signals_ignored():
            server.stop()


@contextlib.contextmanager
def _workers(count: int, env: dict[str, str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` × ``recalib worker``, each in its own session (a terminal's Ctrl-C reaches only
    this process, which stops them in order)."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(count):
            cmd = [sys.executable, "-m", "recalib.cli", "worker"]
            cmd += ["--name", f"{os.uname().nodename}-serve-{os.getpid()}-{index + 1}"]
            procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        yield procs
    finally:
        with _signals_ignored():
            _stop_workers(procs)


def _stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (finish the job), SIGTERM again (hand it back), SIGKILL of the whole session."""
    for proc in procs:
        _signal(proc, signal.SIGTERM)
    _wait_all(procs, WORKER_GRACE_S)
    for proc in procs:
        _signal(proc, signal.SIGTERM)
    _wait_all(procs, WORKER_KILL_S)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's group; its horse dies with it
        proc.wait()


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Shield the shutdown from a second Ctrl-C (it would leave processes behind)."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
