"""`recalib serve` supervises what it starts: real serve process, embedded Valkey, workers, HTTP.

One ``recalib serve`` (embedded Valkey, one worker, 1 s heartbeats) is shared by the module; the
tests SIGSTOP and SIGKILL its children (found through /proc) and check that it restarts them, that
``/readyz`` tells the truth meanwhile, that workers get no secrets, and that it leaves no process
behind. The API-only readiness rule (``RECALIB_READY_REQUIRES_WORKER``) is checked on an
in-thread API.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from recalib.commands.supervisor import Backoff, worker_env
from tests.live import (
    FAST_ENV,
    REPO_ROOT,
    ApiThread,
    Proc,
    create_job,
    free_port,
    make_settings,
    upload,
    wait_for_job,
    wait_until,
)

API_KEY = "serve-test-key"
SECRETS = {
    "RECALIB_API_KEYS": f"t1:{API_KEY}",
    # a valid entry (the API refuses malformed ones), which workers must still not receive
    "RECALIB_WEBHOOK_SECRETS": "hook:whsec_bm90LWZvci13b3JrZXJzLW5vdC1mb3Itd29ya2Vycw==",
    "EXAMPLE_SERVICE_TOKEN": "not-for-workers-either",
}
START_S = 180.0  # a worker imports torch before it registers; this machine's 2 cores are shared
FINAL = {"succeeded", "failed", "cancelled"}


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


def _environ(pid: int) -> dict[str, str]:
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
    """``recalib serve --port <free>`` in a session of its own, with a tmp data directory."""

    def __init__(self, tmp_dir: Path) -> None:
        self.data_dir = (tmp_dir / "data").resolve()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | FAST_ENV | SECRETS | {"OMP_NUM_THREADS": "1"}
        env |= {"RECALIB_DATA_DIR": str(self.data_dir), "PYTHONPATH": str(REPO_ROOT)}
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
        assert not left, f"processes left behind: {[_cmdline(p) for p in left]}"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    server = Serve(tmp_path_factory.mktemp("serve"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def client(serve: Serve) -> Iterator[httpx.Client]:
    with serve.client() as client:
        yield client


@pytest.fixture(scope="module")
def ids(client: httpx.Client, digits_files: dict[str, Path]) -> dict[str, str]:
    return {name: upload(client, path) for name, path in digits_files.items()}


def _body(ids: dict[str, str]) -> dict[str, object]:
    return {
        "model_file": ids["model"],
        "calibration_file": ids["calibration"],
        "eval_file": ids["evaluation"],
    }


def _assert_no_secrets(pid: int) -> None:
    environ = _environ(pid)
    assert not set(SECRETS) & set(environ), sorted(set(SECRETS) & set(environ))
    assert environ["RECALIB_DATA_DIR"].endswith("/data")
    assert environ["RECALIB_REDIS_URL"].startswith("redis://127.0.0.1:")


@pytest.mark.slow
def test_workers_get_no_secrets(serve: Serve, client: httpx.Client) -> None:
    [worker] = serve.workers()
    _assert_no_secrets(worker)
    assert httpx.get(f"{serve.url}/v1/jobs", timeout=10).status_code == 401  # the API has them
    assert client.get("/v1/jobs").status_code == 200


@pytest.mark.slow
def test_readyz_is_not_ready_while_no_worker_is_alive(serve: Serve) -> None:
    """A stopped worker misses its beats: /readyz says 503 until it beats again."""
    serve.wait_ready()
    [worker] = serve.workers()
    os.kill(worker, signal.SIGSTOP)
    try:

        def not_ready() -> dict[str, object] | None:
            response = serve.readyz()
            return response.json() if response is not None and response.status_code == 503 else None

        body = wait_until(not_ready, 15, "/readyz to say not ready without a live worker", 0.2)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert body["ready"] is False and body["workers"] == [] and body["redis"] is True
    assert "no live worker" in str(body["detail"])
    assert serve.workers() == [worker]  # a stopped worker is not restarted: it is alive
    serve.wait_ready(timeout_s=30)


@pytest.mark.slow
def test_a_killed_worker_is_reaped_and_replaced(
    serve: Serve, client: httpx.Client, ids: dict[str, str], record_property
) -> None:
    old_names = {w["name"] for w in serve.wait_ready()}
    [old] = serve.workers()
    os.kill(old, signal.SIGKILL)
    killed_at = time.monotonic()

    def replaced() -> list[dict[str, object]] | None:
        live = [w for w in serve.listed_workers() if w["name"] not in old_names]
        return live if live and not Path(f"/proc/{old}").exists() else None

    [new] = wait_until(replaced, START_S, "a new worker to register, the old one reaped", 0.2)
    record_property("worker_replaced_s", round(time.monotonic() - killed_at, 2))
    assert new["device"] == "cpu"
    [new_pid] = serve.workers()
    assert new_pid != old
    _assert_no_secrets(new_pid)
    assert "exited with SIGKILL" in serve.proc.log()
    job = wait_for_job(client, create_job(client, _body(ids))["id"], FINAL, timeout_s=120)
    assert job["status"] == "succeeded", job


@pytest.mark.slow
def test_a_killed_valkey_is_restarted_and_keeps_the_queued_job(
    serve: Serve, client: httpx.Client, ids: dict[str, str], record_property
) -> None:
    serve.wait_ready()
    [worker] = serve.workers()
    [valkey] = serve.valkey()
    os.kill(worker, signal.SIGSTOP)  # so the job stays queued across the restart
    try:
        time.sleep(2.5)  # the worker's blocking dequeue (1 s) has ended: nothing pops the job
        job_id = create_job(client, _body(ids))["id"]
        time.sleep(1.5)  # append-only file: written every second
        os.kill(valkey, signal.SIGKILL)
        killed_at = time.monotonic()

        def answers() -> dict[str, object] | None:
            with contextlib.suppress(httpx.TransportError):
                response = client.get(f"/v1/jobs/{job_id}")
                return response.json() if response.status_code == 200 else None
            return None

        job = wait_until(answers, 30, "the API to answer again after Valkey was killed", 0.2)
        record_property("valkey_back_s", round(time.monotonic() - killed_at, 2))
        assert job["status"] == "queued", job
        [restarted] = serve.valkey()
        assert restarted != valkey
        assert "Valkey" in serve.proc.log() and "exited with SIGKILL" in serve.proc.log()
    finally:
        os.kill(worker, signal.SIGCONT)
    done = wait_for_job(client, job_id, FINAL, timeout_s=START_S)
    assert done["status"] == "succeeded", done


# -- readiness of an API without `recalib serve` ---------------------------------------------


def test_an_api_alone_is_ready_without_workers(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """The default for an API deployed on its own: workers are reported, not required."""
    with ApiThread(make_settings(tmp_path, redis_url)) as api:
        response = httpx.get(f"{api.url}/readyz", timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["workers"] == []


def test_an_api_that_requires_a_worker_is_not_ready_without_one(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, redis_url, ready_requires_worker=True)
    with ApiThread(settings) as api:
        response = httpx.get(f"{api.url}/readyz", timeout=10)
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["ready"] is False and body["redis"] is True and body["storage_writable"] is True
    assert "no live worker" in body["detail"]
    assert "RECALIB_READY_REQUIRES_WORKER" in body["detail"]


# -- the supervisor's rules ------------------------------------------------------------------


def test_restart_delays_double_up_to_the_cap_and_start_over_after_a_stable_run() -> None:
    backoff = Backoff(first_s=1.0, max_s=30.0, stable_after_s=60.0)
    delays = [backoff.delay_s(ran_s=0.5) for _ in range(7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.delay_s(ran_s=61.0) == 1.0  # it ran long enough: a new crash, not a loop
    assert backoff.delay_s(ran_s=0.5) == 2.0


def test_workers_get_the_environment_without_secret_names() -> None:
    env = {
        "RECALIB_API_KEYS": "t:k",
        "RECALIB_WEBHOOK_SECRETS": "s",
        "HF_TOKEN": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "DB_PASSWORD": "x",
        "RECALIB_REDIS_URL": "redis://:pw@host:6379/0",  # a worker needs it, password and all
        "RECALIB_DATA_DIR": "/data",
        "RECALIB_MAX_ARCHIVE_BYTES": "1",
        "CUDA_VISIBLE_DEVICES": "0",
        "PATH": "/usr/bin",
    }
    assert sorted(worker_env(env)) == [
        "CUDA_VISIBLE_DEVICES",
        "PATH",
        "RECALIB_DATA_DIR",
        "RECALIB_MAX_ARCHIVE_BYTES",
        "RECALIB_REDIS_URL",
    ]
