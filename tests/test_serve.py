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
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from recalib.commands.supervisor import Backoff, worker_env
from tests.live import (
    ApiThread,
    create_job,
    job_body,
    make_settings,
    upload,
    wait_for_job,
    wait_until,
)
from tests.serve_harness import SECRETS, START_S, Serve, proc_environ

FINAL = {"succeeded", "failed", "cancelled"}


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


def _assert_no_secrets(pid: int) -> None:
    environ = proc_environ(pid)
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
    job = wait_for_job(client, create_job(client, job_body(ids))["id"], FINAL, timeout_s=120)
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
        job_id = create_job(client, job_body(ids))["id"]
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


def test_workers_get_the_environment_without_secrets_but_the_ones_they_use() -> None:
    """The API's secrets and unknown ones are withheld; the object store's (the AWS chain) and
    MLflow's registry credentials are what a worker uses to do its job, so they pass."""
    used = {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_SESSION_TOKEN": "x",
        "MLFLOW_TRACKING_TOKEN": "x",
        "MLFLOW_TRACKING_PASSWORD": "x",
    }
    env = used | {
        "RECALIB_API_KEYS": "t:k",
        "RECALIB_WEBHOOK_SECRETS": "s",
        "HF_TOKEN": "x",
        "DB_PASSWORD": "x",
        "RECALIB_REDIS_URL": "redis://:pw@host:6379/0",  # a worker needs it, password and all
        "RECALIB_DATA_DIR": "/data",
        "RECALIB_MAX_ARCHIVE_BYTES": "1",
        "CUDA_VISIBLE_DEVICES": "0",
        "PATH": "/usr/bin",
    }
    kept = ["CUDA_VISIBLE_DEVICES", "PATH", "RECALIB_DATA_DIR", "RECALIB_MAX_ARCHIVE_BYTES"]
    assert sorted(worker_env(env)) == sorted([*used, *kept, "RECALIB_REDIS_URL"])
