"""``recalib worker``: one queue worker (one job at a time; run one per GPU).

Settings come from the environment (``RECALIB_REDIS_URL``, ``RECALIB_DATA_DIR`` shared with the
API, ``RECALIB_WORKER_DEVICE``, ``RECALIB_WORKER_HEARTBEAT_S``, ...). SIGTERM lets the running job
finish (warm shutdown); a second SIGTERM or Ctrl-C kills it and hands the job back to the queue.
"""

from __future__ import annotations

import argparse
import logging
import re

from recalib import defaults
from recalib.commands import require
from recalib.errors import InvalidOptionError
from recalib.settings import get_settings


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        help="auto, cpu, cuda or cuda:N (default: RECALIB_WORKER_DEVICE, else auto). Jobs whose "
        "options.device is auto run here.",
    )
    parser.add_argument("--burst", action="store_true", help="Exit once the queue is empty.")
    parser.add_argument(
        "--name", help="Worker name, unique per Redis (default: <hostname>-<pid>-<random>)."
    )


def main(args: argparse.Namespace) -> int:
    settings = get_settings()
    device = args.device or settings.worker_device
    if not re.match(defaults.DEVICE_PATTERN, device):
        raise InvalidOptionError(
            f"device {device!r} is not one of auto, cpu, mps, cuda, cuda:N", field="--device"
        )
    if not args.verbose:
        logging.getLogger().setLevel(settings.log_level.upper())
    require("worker", "worker")
    from worker.runner.process import run_worker  # imports torch (never CUDA) for the horses

    run_worker(settings, device=device, name=args.name, burst=args.burst)
    return 0
