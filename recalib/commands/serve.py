"""``recalib serve``: the API, and with no ``RECALIB_REDIS_URL`` an embedded Valkey and workers.

Without ``RECALIB_REDIS_URL``, everything runs from one command: a Valkey server with its data
(append-only) under ``<data dir>/valkey``, ``--workers`` worker processes (default 1) and the API.
With it, only the API (plus ``--workers`` workers if given). What it starts is supervised
(:mod:`recalib.commands.supervisor`): a worker or Valkey that dies is restarted with backoff, and
``/readyz`` is not ready while no worker is alive (``RECALIB_READY_REQUIRES_WORKER``, on unless
set). Workers get the environment without secrets (``RECALIB_API_KEYS`` and the like).
Ctrl-C or SIGTERM stops the API, then the workers (a running job gets
``supervisor.WORKER_GRACE_S`` to finish, then is handed back to the queue), then Valkey: nothing
it started is left running.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from recalib import defaults
from recalib.commands import require
from recalib.commands.supervisor import Supervisor, signals_ignored, worker_env
from recalib.settings import get_settings

logger = logging.getLogger(__name__)

_signals_ignored = signals_ignored  # recalib demo uses it


DESCRIPTION = (
    "Start the recalib REST API (docs at /docs). Redis: with RECALIB_REDIS_URL set, the API "
    "uses that server and starts no workers unless --workers is given; without it, serve starts "
    "an embedded Valkey (a Redis-compatible server, its files under <data dir>/valkey) and one "
    "worker, so one command runs everything. Workers or Valkey that die are restarted; Ctrl-C "
    "stops all it started."
)
"""The ``recalib serve --help`` description (what it starts, and how Redis is chosen)."""


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.add_argument(
        "--host", help=f"Bind address (default: RECALIB_HOST, else {defaults.HOST})."
    )
    parser.add_argument(
        "--port", type=int, help=f"Port (default: RECALIB_PORT, else {defaults.PORT})."
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="Worker processes to start (default: 1 with the embedded Valkey, 0 with "
        "RECALIB_REDIS_URL).",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="Where uploads, job results and the embedded Valkey's data are kept (default: "
        f"RECALIB_DATA_DIR, else ./{defaults.DATA_DIR}, relative to the working directory).",
    )


def main(args: argparse.Namespace) -> int:
    require("service", "serve")
    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    data_dir = Path(args.data_dir or settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _exit_on_signal)  # cleanup below runs on SIGTERM too
    with Supervisor() as supervisor:
        embedded = not settings.redis_url
        redis_url = settings.redis_url or supervisor.start_valkey(data_dir)
        n_workers = args.workers if args.workers is not None else (1 if embedded else 0)
        os.environ.update({"RECALIB_REDIS_URL": redis_url, "RECALIB_DATA_DIR": str(data_dir)})
        if embedded or n_workers:  # its own workers (no other can reach an embedded Valkey)
            os.environ.setdefault("RECALIB_READY_REQUIRES_WORKER", "true")
        get_settings.cache_clear()  # the API reads its settings from the environment
        env = worker_env(os.environ)
        withheld = sorted(set(os.environ) - set(env))
        if n_workers and withheld:
            logger.info("workers start without %s", ", ".join(withheld))
        if n_workers:
            _publish_data_dir(redis_url)  # before the API does: the workers check it
        supervisor.start_workers(n_workers, env)
        sys.stdout.write(
            f"recalib API on http://{host}:{port} (docs: /docs); data in {data_dir}; "
            f"{n_workers} worker(s), restarted if they die; Ctrl-C stops everything\n"
        )
        sys.stdout.flush()
        import uvicorn

        from service.server import uvicorn_options

        uvicorn.run(
            "service.main:create_app",
            factory=True,
            host=host,
            port=port,
            log_level=settings.log_level.lower(),
            **uvicorn_options(get_settings()),
        )
    return 0


def _publish_data_dir(redis_url: str) -> None:
    import redis

    from recalib.files import data_dir as data_dirs

    conn = redis.Redis.from_url(redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
    try:
        data_dirs.publish(conn, get_settings())
    finally:
        conn.close()


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    del frame
    raise SystemExit(128 + signum)
