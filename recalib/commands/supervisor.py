"""What ``recalib serve`` starts, kept running: the embedded Valkey and the worker processes.

A thread looks every ``POLL_S`` seconds: a child that exited is reaped (no zombie), logged with its
exit status, and started again after a delay (``RESTART_FIRST_S``, doubling up to
``RESTART_MAX_S``; back to the first once a child ran ``STABLE_AFTER_S`` before it died). The
embedded Valkey comes back on the same port with the same data directory and append-only file,
so the URL the API and the workers hold stays valid and queued jobs survive. A restarted worker
gets a new name (``...-<index>.<restart>``): RQ refuses a name whose previous key is still alive.

Workers get this process's environment without secrets (:func:`worker_env`). :meth:`stop` ends the
watching first, then the workers (SIGTERM: the job finishes; SIGTERM again: it is handed back;
then SIGKILL of the worker's session), then Valkey: nothing started here is left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from recalib.jobs.embedded_redis import EmbeddedRedis

logger = logging.getLogger(__name__)

POLL_S = 0.5
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
STABLE_AFTER_S = 60.0
WORKER_GRACE_S = 10.0
WORKER_KILL_S = 5.0
SECRET_WORDS = frozenset(
    {"KEY", "KEYS", "APIKEY", "SECRET", "SECRETS", "TOKEN", "TOKENS", "PASSWORD", "PASSWD"}
    | {"CREDENTIAL", "CREDENTIALS"}
)
"""A variable whose name has one of these words (``_``-separated) is withheld from workers..."""
WORKER_CREDENTIALS = frozenset(
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"}
    | {"MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD"}
)
"""... except these, which a worker uses for its job: the object store's and ``s3://`` inputs'
(the standard AWS chain) and the MLflow registry's."""


def is_secret(name: str) -> bool:
    """True for ``RECALIB_API_KEYS``, ``RECALIB_WEBHOOK_SECRETS``, ``HF_TOKEN``, ..."""
    return any(word in SECRET_WORDS for word in name.upper().split("_"))


def worker_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the secrets a worker does not use: workers run untrusted model code."""
    return {
        name: value
        for name, value in env.items()
        if not is_secret(name) or name.upper() in WORKER_CREDENTIALS
    }


def exit_text(returncode: int) -> str:
    """``SIGKILL`` for a process killed by a signal, ``status 1`` for one that exited."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-returncode).name
        return f"signal {-returncode}"
    return f"status {returncode}"


class Backoff:
    """Delays before restarts: ``first_s``, doubling up to ``max_s``; ``first_s`` again after a
    child ran ``stable_after_s`` seconds."""

    def __init__(
        self,
        first_s: float = RESTART_FIRST_S,
        max_s: float = RESTART_MAX_S,
        stable_after_s: float = STABLE_AFTER_S,
    ) -> None:
        self.first_s, self.max_s, self.stable_after_s = first_s, max_s, stable_after_s
        self._next_s = first_s

    def delay_s(self, ran_s: float) -> float:
        """The delay before the next start of a child that died after running ``ran_s``."""
        if ran_s >= self.stable_after_s:
            self._next_s = self.first_s
        delay = self._next_s
        self._next_s = min(self.max_s, delay * 2)
        return delay


class _Child:
    """A supervised process: :meth:`spawn` starts it, :meth:`poll` reaps it once it exits."""

    label = "child"

    def __init__(self) -> None:
        self.backoff = Backoff()
        self.restarts = 0
        self.started_at = time.monotonic()
        self.restart_at: float | None = None  # set while it is dead, waiting for its restart

    def spawn(self) -> None:
        raise NotImplementedError

    def poll(self) -> int | None:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    def start(self) -> None:
        self.spawn()
        self.started_at = time.monotonic()
        self.restart_at = None


class _Worker(_Child):
    def __init__(self, index: int, env: dict[str, str]) -> None:
        super().__init__()
        self.index, self.env = index, env
        self.label = f"worker {index}"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        name = f"{os.uname().nodename}-serve-{os.getpid()}-{self.index}"
        name += f".{self.restarts}" if self.restarts else ""
        cmd = [sys.executable, "-m", "recalib.cli", "worker", "--name", name]
        # a session of its own: a terminal's Ctrl-C reaches serve only, which stops it in order
        self.proc = subprocess.Popen(cmd, env=self.env, start_new_session=True)

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


class _Valkey(_Child):
    label = "embedded Valkey"

    def __init__(self, server: EmbeddedRedis) -> None:
        super().__init__()
        self.server = server

    def spawn(self) -> None:
        with _sigint_blocked():
            self.server.restart() if self.restarts else self.server.start()

    def poll(self) -> int | None:
        return self.server.poll()

    @property
    def pid(self) -> int | None:
        return self.server.pid


class Supervisor:
    """Starts, watches and stops the children of ``recalib serve``; a context manager."""

    def __init__(self) -> None:
        self._valkey: _Valkey | None = None
        self._workers: list[_Worker] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start_valkey(self, data_dir: Path) -> str:
        """Start the embedded Valkey under ``data_dir``; its URL."""
        self._valkey = _Valkey(EmbeddedRedis(data_dir))
        self._valkey.start()
        return self._valkey.server.url

    def start_workers(self, count: int, env: dict[str, str]) -> None:
        """Start ``count`` × ``recalib worker`` with ``env``, then watch every child."""
        for index in range(1, count + 1):
            worker = _Worker(index, env)
            worker.start()
            self._workers.append(worker)
        self._thread.start()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- watching ---------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.check()
            except Exception:  # the watcher must outlive any one failure
                logger.exception("supervisor pass failed")

    def check(self) -> None:
        """One pass: reap the dead, restart those whose delay is over (Valkey first)."""
        children: list[_Child] = [*([self._valkey] if self._valkey else []), *self._workers]
        for child in children:
            if self._stop.is_set():
                return
            now = time.monotonic()
            if child.restart_at is None:
                status = child.poll()
                if status is None:
                    continue
                ran_s = now - child.started_at
                delay_s = child.backoff.delay_s(ran_s)
                child.restart_at = now + delay_s
                logger.warning(
                    "%s (pid %s) exited with %s after %.1f s; restarting in %.1f s",
                    child.label, child.pid, exit_text(status), ran_s, delay_s,
                )  # fmt: skip
            elif now >= child.restart_at:
                self._restart(child)

    def _restart(self, child: _Child) -> None:
        child.restarts += 1
        try:
            child.start()
        except Exception as exc:
            delay_s = child.backoff.delay_s(0.0)
            child.restart_at = time.monotonic() + delay_s
            logger.error(
                "%s did not start again (%s); next try in %.1f s", child.label, exc, delay_s
            )
            return
        logger.warning("%s restarted (pid %s, restart %d)", child.label, child.pid, child.restarts)

    # -- stopping ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop watching, then the workers, then Valkey; shielded from a second Ctrl-C."""
        with signals_ignored():
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join()
            _stop_workers([w.proc for w in self._workers if w.proc is not None])
            if self._valkey is not None:
                self._valkey.server.stop()


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
def _sigint_blocked() -> Iterator[None]:
    """Valkey inherits the blocked SIGINT: a Ctrl-C in the terminal (sent to the whole process
    group) does not stop it before the workers are done with it."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Shield the shutdown from a second Ctrl-C (it would leave processes behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
