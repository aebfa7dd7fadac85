"""Object storage faults, with a real S3 server (SeaweedFS), the API and a worker: the store down
is 503 problems and ``/readyz`` not ready, and a queued job waits and runs once the store is back;
wrong credentials are 503 problems naming the store, never the secret.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import s3_fixtures
from tests.live import Stack, create_job, fresh_db_url, job_body, upload, wait_for_job, wait_until
from tests.s3_fixtures import S3Store, WeedServer, start_weed

pytestmark = pytest.mark.slow
weed_server = s3_fixtures.weed_server  # fixtures (one SeaweedFS per test session)
s3_store = s3_fixtures.s3_store
FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture
def own_weed(tmp_path: Path) -> Iterator[WeedServer]:
    """A SeaweedFS of this test's own: it is stopped and started again."""
    server = start_weed(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def _stop(server: WeedServer) -> None:
    os.killpg(server.proc.pid, signal.SIGTERM)
    server.proc.wait(timeout=15)


def _start_again(server: WeedServer) -> None:
    """Start ``server`` again on its ports and directory (its data persists)."""
    log = (server.workdir / "weed.log").open("ab")
    server.proc = subprocess.Popen(
        server.proc.args,
        env=server.process_env,
        cwd=server.workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_until(lambda: s3_fixtures._bucket_ready(server), 90, "weed to serve again")


def test_store_down_is_503_and_not_ready_and_a_queued_job_waits_for_it(
    redis_url: str, tmp_path: Path, own_weed: WeedServer, digits_files: dict[str, Path]
) -> None:
    store = S3Store(own_weed, f"s3://{own_weed.bucket}/down")
    with Stack(fresh_db_url(redis_url), tmp_path / "api", **store.env) as stack:
        stack.conn.flushdb()
        stack.start_api()
        with stack.client() as client:
            ids = {name: upload(client, path) for name, path in digits_files.items()}
            job_id = create_job(client, job_body(ids))["id"]  # queued: no worker yet
            _stop(own_weed)
            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["storage_writable"] is False
            assert store.url in ready.json()["detail"], ready.text
            refused = client.post("/v1/files", params={"filename": "x.npz"}, content=b"x" * 10)
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert "RECALIB_S3_ENDPOINT_URL" in refused.json()["detail"]
            stack.start_worker("w1", wait=False, RECALIB_DATA_DIR=str(tmp_path / "w"))
            wait_until(lambda: _waits_for_store(stack), 120, "the run to wait for the store")
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
            _start_again(own_weed)
            job = wait_for_job(client, job_id, FINAL, timeout_s=180)
            assert job["status"] == "succeeded", job
            assert client.get("/readyz").status_code == 200
        stack.conn.flushdb()


def _waits_for_store(stack: Stack) -> bool:
    return "waits for the store" in stack.workers["w1"].log()


def test_wrong_credentials_are_503_problems_and_not_ready(
    redis_url: str, tmp_path: Path, s3_store: S3Store
) -> None:
    env = s3_store.env | {"AWS_SECRET_ACCESS_KEY": "wrong-secret-0123456789"}
    with Stack(fresh_db_url(redis_url), tmp_path, **env) as stack:
        import sys

        from tests.live import Proc

        stack.port = s3_fixtures._free_port_pair()
        stack.url = f"http://127.0.0.1:{stack.port}"
        proc_env = stack.env | {"UVICORN_HOST": "127.0.0.1", "UVICORN_PORT": str(stack.port)}
        stack.api = Proc([sys.executable, "-m", "service.server"], proc_env, tmp_path / "api.log")
        wait_until(lambda: _answers(stack.url), 60, "the API to answer")
        with stack.client() as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "credentials" in ready.json()["detail"], ready.text
            refused = client.post("/v1/files", params={"filename": "m.pt2"}, content=b"abc")
            assert refused.status_code == 503, refused.text
            detail = refused.json()["detail"]
            assert "refuses the API's credentials" in detail and s3_store.url in detail
            assert "wrong-secret" not in detail
            listed = client.get("/v1/files")
            assert listed.status_code in (
                200,
                503,
            )  # the index is in Redis; a read may need the store


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
