"""``recalib serve`` as the tests run it (:class:`Serve`): a real serve process in a session of its
own, with secrets in its environment, and the /proc readings that find its children."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest

from tests.live import FAST_ENV, REPO_ROOT, Proc, free_port, scratch_dir, wait_until

API_KEY = "serve-test-key"
SECRETS = {
    "RECALIB_API_KEYS": f"t1:{API_KEY}",
    # a valid entry (the API refuses malformed ones), which workers must still not receive
    "RECALIB_WEBHOOK_SECRETS": "hook:whsec_bm90LWZvci13b3JrZXJzLW5vdC1mb3Itd29ya2Vycw==",
    "EXAMPLE_SERVICE_TOKEN": "not-for-workers-either",
}
START_S = 180.0  # a worker imports torch before it registers; this machine's 2 cores are shared


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, session, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def proc_environ(pid: int) -> dict[str, str]:
    """The environment process ``pid`` started with, from /proc."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _alive(pid: int) -> bool:
    """Running or sleeping: not gone, and not a zombie nobody reaped."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _children(pid: int) -> list[int]:
    """Live (non-zombie) child processes of ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        child = int(stat.parent.name)
        fields = _stat(child)
        if fields is not None and int(fields[1]) == pid and fields[0] != "Z":
            found.append(child)
    return found


class Serve:
    """``recalib serve --port <free>`` in a session of its own, with a tmp data directory and
    ``TMPDIR`` (:func:`tests.live.scratch_dir`, removed by :meth:`close`)."""

    def __init__(self, tmp_dir: Path, extra_env: Mapping[str, str] | None = None) -> None:
        self.data_dir = (tmp_dir / "data").resolve()
        self.tmp_dir = scratch_dir(tmp_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | FAST_ENV | SECRETS | {"OMP_NUM_THREADS": "1"} | dict(extra_env or {})
        env |= {"RECALIB_DATA_DIR": str(self.data_dir), "PYTHONPATH": str(REPO_ROOT)}
        env["TMPDIR"] = str(self.tmp_dir)
        env.pop("RECALIB_REDIS_URL", None)
        env.pop("RECALIB_READY_REQUIRES_WORKER", None)
        cmd = [sys.executable, "-m", "recalib.cli", "serve", "--port", str(self.port)]
        self.proc = Proc(cmd, env, tmp_dir / "serve.log")

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def workers(self) -> list[int]:
        return [p for p in _children(self.proc.pid) if " recalib.cli worker " in _cmdline(p)]

    def valkey(self) -> list[int]:
        return [p for p in _children(self.proc.pid) if "valkey" in _cmdline(p)]

    def readyz(self) -> httpx.Response | None:
        if not self.proc.alive():
            pytest.fail(f"recalib serve exited:\n{self.proc.log()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5)
        except httpx.TransportError:
            return None

    def listed_workers(self) -> list[dict[str, object]]:
        response = self.readyz()
        return list(response.json()["workers"]) if response is not None else []

    def wait_ready(self, timeout_s: float = START_S) -> list[dict[str, object]]:
        """Until /readyz is 200 and lists a worker; the listed workers."""

        def ready() -> list[dict[str, object]] | None:
            response = self.readyz()
            if response is None or response.status_code != 200:
                return None
            return response.json()["workers"] or None

        return list(wait_until(ready, timeout_s, "recalib serve to be ready with a worker", 0.2))

    def leftovers(self) -> list[int]:
        """Live processes started for this data directory (its env; Valkey: its cwd)."""
        entry = f"RECALIB_DATA_DIR={self.data_dir}".encode()
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
                cwd = Path(os.readlink(proc / "cwd"))
            except OSError:
                continue
            if (entry in environ or cwd.is_relative_to(self.data_dir)) and _alive(int(proc.name)):
                found.append(int(proc.name))
        return found

    def close(self) -> None:
        """SIGTERM serve (it stops its workers and Valkey); SIGKILL whatever it left."""
        self.proc.signal(signal.SIGTERM)
        with contextlib.suppress(Exception):
            self.proc.popen.wait(timeout=60)
        left = self.leftovers()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.stop(timeout_s=1)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        assert not left, f"processes left behind: {[_cmdline(p) for p in left]}"
