"""The worker's side of its warm runner: start it, tell horses where it is, replace it.

The worker (which never imports torch in warm mode) creates a listening Unix socket in a private
temporary directory (mode 0700), starts ``python -m worker.runner.warm`` with that socket's fd
(a new interpreter: nothing torch or CUDA initialised is ever forked), and closes its own copy.
The runner writes one byte on a pipe once torch, the pipeline and the device are initialised;
the worker waits for it (:meth:`RunnerProcess.wait_ready`, beating meanwhile) before it takes a
job, so RQ's job timeout never counts a runner's start. A horse connecting before the runner is
ready waits in the socket's backlog; one connecting after the runner died is refused at once.

The runner is replaced (killed if need be, then started again) after a run that did not end
cleanly (its horse killed or failed, or the runner itself died), and recycled after
``RECALIB_RUNNER_MAX_JOBS`` runs or when its resident memory is over ``RECALIB_RUNNER_MAX_RSS_MB``
after a job. It runs in a process group of its own (Ctrl-C in a terminal does not reach it) and
dies with the worker (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from recalib.settings import Settings
from worker.runner.procs import describe_exit, rss_bytes
from worker.runner.protocol import PID_ENV, SOCKET_ENV

logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
EXIT_WAIT_S = 5.0
START_TIMEOUT_S = 600.0


RUNNER_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "PYTHONHASHSEED",
              "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
              "NVIDIA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS")  # fmt: skip
"""All a runner inherits of its starter's environment: nothing secret, no Redis or store URL."""


def runner_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in RUNNER_ENV}


SOCKET_DIR_PREFIX = "recalib-runner-"


UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, its NUL included


def socket_base() -> Path:
    """Where runner socket directories go: the temporary directory, or ``/tmp`` when a socket
    path under it would be too long for a Unix socket (a deep ``TMPDIR``)."""
    base = Path(tempfile.gettempdir())
    longest = f"{base}/{SOCKET_DIR_PREFIX}4194304-abcdefgh/runner.sock"
    return base if len(longest) <= UNIX_PATH_MAX else Path("/tmp")


def remove_stale_socket_dirs() -> None:
    """Remove the socket directories of starters that died without closing their runner (a
    worker killed by SIGKILL cannot): ``recalib-runner-<pid>-*`` whose pid is gone."""
    for path in socket_base().glob(f"{SOCKET_DIR_PREFIX}*-*"):
        owner = path.name.removeprefix(SOCKET_DIR_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(path, ignore_errors=True)


class RunnerProcess:
    """A worker's warm runner (one at a time)."""

    def __init__(
        self,
        settings: Settings,
        worker_name: str,
        *,
        one_shot: bool = False,
        log_level: str | None = None,
    ) -> None:
        self.settings, self.worker_name, self.one_shot = settings, worker_name, one_shot
        self.log_level = log_level or settings.log_level
        self._dir: Path | None = None
        self.popen: subprocess.Popen[bytes] | None = None
        self._ready_fd: int | None = None  # read end of the runner's ready pipe, until read
        self.jobs = 0  # runs handed to the current runner
        self.starts = 0

    @property
    def socket_path(self) -> Path:
        if self._dir is None:
            remove_stale_socket_dirs()
            prefix = f"{SOCKET_DIR_PREFIX}{os.getpid()}-"
            self._dir = Path(tempfile.mkdtemp(prefix=prefix, dir=socket_base()))
        return self._dir / "runner.sock"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        """Start a runner (the previous one must be gone); it gets ready in the background."""
        self.socket_path.unlink(missing_ok=True)
        self._close_ready_pipe()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ready_read, ready_write = os.pipe()
        try:
            listener.bind(str(self.socket_path))
            listener.listen(1)
            env = runner_environment()
            cmd = [sys.executable, "-m", "worker.runner.warm", "--fd", str(listener.fileno())]
            cmd += ["--ready-fd", str(ready_write), "--parent", str(os.getpid())]
            cmd += ["--sandbox", self.settings.sandbox, "--log-level", self.log_level]
            if self.one_shot:
                cmd.append("--one-shot")
            self.popen = subprocess.Popen(
                cmd, env=env, pass_fds=(listener.fileno(), ready_write), process_group=0
            )
            self._ready_fd = ready_read
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            listener.close()  # the runner holds the only copy: its death refuses connections
            os.close(ready_write)
        self.jobs = 0
        self.starts += 1
        self._started_at = time.monotonic()
        logger.info("worker %s: runner %d starting", self.worker_name, self.popen.pid)

    def wait_ready(self, tick: Callable[[], None], tick_s: float) -> bool:
        """Wait until the runner says it is ready, calling ``tick`` every ``tick_s`` seconds
        (heartbeats); False if it died or did not get ready in ``START_TIMEOUT_S`` (killed)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while self._ready_fd is not None:
            readable, _, _ = select.select([self._ready_fd], [], [], tick_s)
            if readable:
                ready = os.read(self._ready_fd, 1) == b"1"
                self._close_ready_pipe()
                if not ready:
                    logger.error("worker %s: the runner died while starting (%s)",
                                 self.worker_name, self.death())  # fmt: skip
                    return False
                took_s = time.monotonic() - self._started_at
                logger.info("worker %s: runner %d ready in %.1f s", self.worker_name, self.pid,
                            took_s)  # fmt: skip
                return True
            tick()
            if time.monotonic() > deadline:
                logger.error("worker %s: runner not ready in %.0f s; killed", self.worker_name,
                             START_TIMEOUT_S)  # fmt: skip
                self.kill()
                self._close_ready_pipe()
                return False
        return self.alive()

    def _close_ready_pipe(self) -> None:
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None

    def ensure(self) -> None:
        """A live runner, started again if the last one died while idle."""
        if self.alive():
            return
        if self.popen is not None:
            logger.warning(
                "worker %s: runner %d had died (%s); starting another",
                self.worker_name,
                self.popen.pid,
                self.death(),
            )
        self.start()

    def export(self) -> None:
        """Tell the horse about to be forked where the runner is."""
        if self.popen is not None:
            os.environ[SOCKET_ENV] = str(self.socket_path)
            os.environ[PID_ENV] = str(self.popen.pid)

    def death(self) -> str:
        """How the runner ended (``killed by SIGKILL``); waits a little for it to be reapable.
        A runner still alive is killed: it was unreachable."""
        if self.popen is None:
            return "no runner"
        try:
            return describe_exit(self.popen.wait(timeout=EXIT_WAIT_S))
        except subprocess.TimeoutExpired:
            self.kill()
            return "unreachable, killed"

    def kill(self) -> None:
        """SIGKILL the runner (its run is abandoned) and reap it."""
        popen = self._signal(signal.SIGKILL)
        if popen is not None:
            popen.wait()

    def after_job(self) -> None:
        """After a job: replace the runner if it died; recycle it past its job or memory limit.
        (It holds nothing of a job: each ran in a process of its own, gone now.)"""
        self.jobs += 1
        if not self.alive():
            logger.info("worker %s: replacing the runner, which died (%s)", self.worker_name,
                        self.death())  # fmt: skip
            self.start()
            return
        reason = self._recycle_reason()
        if reason:
            logger.info("worker %s: recycling runner %d: %s", self.worker_name, self.pid, reason)
            self.stop()
            self.start()

    def _recycle_reason(self) -> str:
        settings = self.settings
        if self.jobs >= settings.runner_max_jobs:
            return f"{self.jobs} jobs (RECALIB_RUNNER_MAX_JOBS)"
        rss = rss_bytes(self.pid) if self.pid else None
        limit_mb = settings.runner_max_rss_mb
        if limit_mb and rss is not None and rss > limit_mb * 1024**2:
            return f"{rss // 1024**2} MiB resident (RECALIB_RUNNER_MAX_RSS_MB={limit_mb})"
        return ""

    def stop(self) -> None:
        """End an idle runner: SIGTERM, then SIGKILL after ``STOP_GRACE_S``."""
        popen = self._signal(signal.SIGTERM)
        if popen is None:
            return
        try:
            popen.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def _signal(self, signum: signal.Signals) -> subprocess.Popen[bytes] | None:
        """Send ``signum`` to the runner if it is still running: its process, else None."""
        popen = self.popen
        if popen is None or popen.poll() is not None:
            return None
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signum)
        return popen

    def close(self) -> None:
        """Stop the runner and remove the socket's directory."""
        self.stop()
        self._close_ready_pipe()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
