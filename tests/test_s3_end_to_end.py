"""Object storage end to end: the API and a worker with different data directories (no shared
filesystem), a real S3 server (SeaweedFS) between them.

- a job over uploads succeeds; its artifacts are in the store (ETag = sha256, Range); nothing of
  the job stays on either machine's disk;
- a job over ``s3://`` URIs succeeds, records URI + sha256 in ``report.data.sources``, and a
  second job on the same URIs is served from the worker's cache;
- bad URIs are refused at create time (missing, forbidden host) naming the field;
- an upload's content deleted behind our back fails the job naming the file;
- a worker without the API's object store refuses to start, naming the setting;
- ``recalib serve`` on the object store: its workers get the store's credentials (not the API's
  secrets), and a job succeeds.

The store down and wrong credentials: ``tests/test_s3_store_faults.py``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import s3_fixtures
from tests.live import (
    Stack,
    create_job,
    fresh_db_url,
    job_body,
    upload,
    wait_for_job,
    wait_until,
)
from tests.s3_fixtures import S3Store, WeedServer
from tests.serve_harness import Serve, proc_environ

pytestmark = pytest.mark.slow
weed_server = s3_fixtures.weed_server  # fixtures (one SeaweedFS per test session)
s3_store = s3_fixtures.s3_store
FINAL = {"succeeded", "failed", "cancelled"}


def _files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


@pytest.fixture(scope="module")
def s3_stack(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, weed_server: WeedServer
) -> Iterator[tuple[Stack, S3Store, Path]]:
    """API (data dir ``api/data``) and worker ``w1`` (data dir ``worker-data``) over one store."""
    store = S3Store(weed_server, f"s3://{weed_server.bucket}/e2e-{time.time_ns()}")
    tmp = tmp_path_factory.mktemp("s3stack")
    worker_dir = tmp / "worker-data"
    with Stack(fresh_db_url(redis_url), tmp / "api", **store.env) as stack:
        stack.conn.flushdb()
        stack.start_api()
        stack.start_worker("w1", RECALIB_DATA_DIR=str(worker_dir))
        yield stack, store, worker_dir
        stack.conn.flushdb()


def test_a_job_runs_with_api_and_worker_sharing_no_directory(
    s3_stack: tuple[Stack, S3Store, Path], digits_files: dict[str, Path]
) -> None:
    stack, store, worker_dir = s3_stack
    with stack.client() as client:
        ids = {name: upload(client, path) for name, path in digits_files.items()}
        job = wait_for_job(client, create_job(client, job_body(ids))["id"], FINAL, timeout_s=180)
        assert job["status"] == "succeeded", job
        checkpoint = client.get(f"/v1/jobs/{job['id']}/checkpoint")
        assert checkpoint.status_code == 200
        digest = hashlib.sha256(checkpoint.content).hexdigest()
        assert (
            checkpoint.headers["etag"]
            == f'"{digest}"'
            == f'"{job["result"]["checkpoint"]["sha256"]}"'
        )
        part = client.get(f"/v1/jobs/{job['id']}/checkpoint", headers={"Range": "bytes=10-99"})
        assert part.status_code == 206 and part.content == checkpoint.content[10:100]
        assert part.headers["content-range"] == f"bytes 10-99/{len(checkpoint.content)}"
        head = client.head(f"/v1/jobs/{job['id']}/checkpoint")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(checkpoint.content))
        report = client.get(f"/v1/jobs/{job['id']}/report").json()
        assert client.get(f"/v1/jobs/{job['id']}/report.html").status_code == 200
    sources = {s["role"]: s for s in report["data"]["sources"]}
    for role, name in (("model", "model"), ("calibration", "calibration"), ("eval", "evaluation")):
        content = digits_files[name].read_bytes()
        assert sources[role]["file_id"] == ids[name]
        assert sources[role]["sha256"] == hashlib.sha256(content).hexdigest()
    keys = store.keys()
    assert f"jobs/{job['id']}/attempt-1/report.json" in keys
    assert not any("/inputs/" in key for key in keys)  # the run's inputs are never published
    assert all(f"files/{i}" in keys and f"files/{i}.json" in keys for i in ids.values())
    assert _files_under(stack.data_dir / "files") == []  # the API kept nothing on its disk
    assert _files_under(stack.data_dir / "jobs") == []
    assert _files_under(worker_dir / "scratch") == []  # the run's scratch is gone
    assert not (worker_dir / "files").exists()


def _put(store: S3Store, key: str, path: Path) -> str:
    full = f"{store.prefix}/{key}"
    store.client().put_object(Bucket=store.server.bucket, Key=full, Body=path.read_bytes())
    return f"s3://{store.server.bucket}/{full}"


def test_a_job_by_s3_uris_records_them_and_the_second_is_served_from_the_cache(
    s3_stack: tuple[Stack, S3Store, Path], digits_files: dict[str, Path]
) -> None:
    stack, store, worker_dir = s3_stack
    uris = {
        "model_uri": _put(store, "inputs/digits.pt2", digits_files["model"]),
        "calibration_uri": _put(store, "inputs/calib.npz", digits_files["calibration"]),
        "eval_uri": _put(store, "inputs/eval.npz", digits_files["evaluation"]),
    }
    with stack.client() as client:
        first = wait_for_job(client, create_job(client, uris)["id"], FINAL, timeout_s=180)
        assert first["status"] == "succeeded", first
        second = wait_for_job(client, create_job(client, uris)["id"], FINAL, timeout_s=180)
        assert second["status"] == "succeeded", second
        download = client.get(f"/v1/jobs/{first['id']}/checkpoint")
        assert "digits.recalibrated" in download.headers["content-disposition"]
    for job, cached in ((first, False), (second, True)):
        sources = {s["role"]: s for s in job["result"]["data"]["sources"]}
        for role, name in (
            ("model", "model"),
            ("calibration", "calibration"),
            ("eval", "evaluation"),
        ):
            assert sources[role]["uri"] == uris[f"{role}_uri"]
            assert (
                sources[role]["sha256"]
                == hashlib.sha256(digits_files[name].read_bytes()).hexdigest()
            )
            assert sources[role]["cached"] is cached
    # the same bytes as uploads give the same recalibration
    assert first["result"]["after"] == second["result"]["after"]
    cache = worker_dir / "cache" / "sha256"
    assert {p.name for p in cache.iterdir()} == {
        hashlib.sha256(digits_files[n].read_bytes()).hexdigest() for n in digits_files
    }


def test_uris_known_bad_are_refused_at_create_naming_the_field(
    s3_stack: tuple[Stack, S3Store, Path], digits_files: dict[str, Path]
) -> None:
    stack, store, _ = s3_stack
    calibration = _put(store, "inputs/c.npz", digits_files["calibration"])
    bodies = {
        "model_uri": f"s3://{store.server.bucket}/{store.prefix}/inputs/missing.pt2",
    }
    with stack.client() as client:
        missing = client.post("/v1/jobs", json={**bodies, "calibration_uri": calibration})
        assert missing.status_code == 422, missing.text
        assert (
            missing.json()["field"] == "model_uri" and "does not exist" in missing.json()["detail"]
        )
        private = client.post(
            "/v1/jobs",
            json={"model_uri": "https://127.0.0.1/m.pt2", "calibration_uri": calibration},
        )
        assert private.status_code == 422, private.text
        assert private.json()["type"].endswith("/outbound-not-allowed")
        assert "RECALIB_OUTBOUND_ALLOW_HOSTS" in private.json()["detail"]
        endpoint = client.post(
            "/v1/jobs",
            json={
                "model_uri": "s3://b/m.pt2?endpoint=http://169.254.169.254",
                "calibration_uri": calibration,
            },
        )
        assert endpoint.status_code == 422, endpoint.text
        assert endpoint.json()["type"].endswith("/outbound-not-allowed")
        both = client.post(
            "/v1/jobs",
            json={
                "model_uri": calibration,
                "model_file": "f_3kq0cV2m9xLr8tQw",
                "calibration_uri": calibration,
            },
        )
        assert both.status_code == 422 and "not both" in both.text


def test_an_upload_deleted_behind_our_back_fails_the_job_naming_it(
    s3_stack: tuple[Stack, S3Store, Path], digits_files: dict[str, Path]
) -> None:
    stack, store, _ = s3_stack
    with stack.client() as client:
        ids = {name: upload(client, path) for name, path in digits_files.items()}
        store.client().delete_object(
            Bucket=store.server.bucket, Key=f"{store.prefix}/files/{ids['calibration']}"
        )
        job = wait_for_job(client, create_job(client, job_body(ids))["id"], FINAL, timeout_s=120)
    assert job["status"] == "failed", job
    message = job["error"]["message"]
    assert ids["calibration"] in message and "calibration" in message, message
    assert "missing" in message, message


def test_a_worker_without_the_apis_object_store_refuses_to_start_naming_the_setting(
    s3_stack: tuple[Stack, S3Store, Path], tmp_path: Path
) -> None:
    stack, store, _ = s3_stack
    proc = stack.start_worker(
        "no-store", wait=False, RECALIB_STORAGE_URL="", RECALIB_DATA_DIR=str(tmp_path / "d")
    )
    wait_until(lambda: not proc.alive(), 90, "the worker to exit")
    assert proc.popen.returncode != 0
    log = proc.log()
    assert "RECALIB_STORAGE_URL" in log and store.url in log, log[-2000:]


def test_recalib_serve_gives_its_workers_the_store_credentials_and_runs_a_job(
    s3_store: S3Store, tmp_path: Path, digits_files: dict[str, Path]
) -> None:
    server = Serve(tmp_path, s3_store.env)
    try:
        server.wait_ready()
        [worker] = server.workers()
        environ = proc_environ(worker)
        assert environ["AWS_SECRET_ACCESS_KEY"] == s3_store.env["AWS_SECRET_ACCESS_KEY"]
        assert "RECALIB_API_KEYS" not in environ
        with server.client() as client:
            ids = {name: upload(client, path) for name, path in digits_files.items()}
            job = wait_for_job(client, create_job(client, job_body(ids))["id"], FINAL, 120)
        assert job["status"] == "succeeded", job
    finally:
        server.close()
