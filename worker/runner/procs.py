"""Process helpers shared by the worker, its work horses and its warm runner (no torch here)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

DETECT_DEVICE = (
    "import torch\n"
    "print('cuda:0' if torch.cuda.is_available() else "
    "'mps' if torch.backends.mps.is_available() else 'cpu')"
)
_PR_SET_PDEATHSIG = 1


def detect_device(timeout_s: float = 120.0) -> str:
    """``cuda:0`` if this process could use CUDA, else ``mps`` or ``cpu``, asked of a subprocess.

    A subprocess, because the worker process itself never initialises CUDA (nor, in warm mode,
    imports torch).
    """
    result = subprocess.run(
        [sys.executable, "-c", DETECT_DEVICE],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    device = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode != 0 or not device:
        logger.warning("device detection failed (%s); using cpu", result.stderr.strip()[-300:])
        return "cpu"
    return device


def die_with_parent(expected_parent: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; exit at once if it already has
    (its pid is no longer ``expected_parent``, default the parent seen on entry)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if expected_parent is None else expected_parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        logger.debug("prctl(PR_SET_PDEATHSIG) unavailable")
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def describe_exit(returncode: int) -> str:
    """``killed by SIGKILL`` for a negative :class:`subprocess.Popen` return code, else
    ``exit status N``."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def describe_wait_status(status: int | None) -> str:
    """The same for an ``os.wait`` status; None: RQ killed the horse itself after the timeout."""
    if status is None:
        return "killed by its worker after the job timeout"
    if os.WIFSIGNALED(status):
        return describe_exit(-os.WTERMSIG(status))
    return describe_exit(os.WEXITSTATUS(status))


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` from ``/proc`` (None where there is no /proc or it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_worker_name() -> str:
    """``<hostname>-<pid>-<random>``: a restarted container (same hostname, pid 1) must not
    collide with its previous life, whose RQ worker key outlives it for a while."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
