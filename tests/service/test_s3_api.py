"""The API over object storage (a real SeaweedFS): streamed uploads into S3 (cap, abort leaves
nothing, not even a multipart upload), direct presigned uploads (verified before usable; bad
parts and a wrong sha256 refused; never completed → aborted by retention), the client's choice
between them, and artifact downloads (Range, HEAD, presigned redirect)."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from recalib import defaults
from recalib.client import RecalibClient, raise_for_problem
from recalib.client_upload import direct_upload
from recalib.contract import JobStatus, Report
from recalib.files.direct_uploads import DirectUploads
from recalib.files.storage.s3 import S3Storage
from recalib.files.store import FileStore
from recalib.jobs import states
from recalib.jobs.recovery import Reaper
from tests import s3_fixtures
from tests.live import ApiThread, make_settings
from tests.s3_fixtures import S3Store

weed_server = s3_fixtures.weed_server  # fixtures (one SeaweedFS per test session)
s3_store = s3_fixtures.s3_store
PART = 5 * 1024**2  # S3's smallest part


@pytest.fixture
def api(
    tmp_path: Path, redis_conn: redis.Redis, redis_url: str, s3_store: S3Store, monkeypatch
) -> Iterator[ApiThread]:
    monkeypatch.setattr(defaults, "DIRECT_UPLOAD_PART_BYTES", PART)
    settings = make_settings(
        tmp_path / "data", redis_url, max_upload_bytes=40 * 1024**2, **s3_store.settings
    )
    with ApiThread(settings) as server:
        yield server


def _content(size: int) -> bytes:
    return hashlib.sha256(b"seed").digest() * (size // 32) + b"x" * (size % 32)


def test_a_streamed_upload_lands_in_the_store_and_nothing_stays_on_the_api_disk(
    api: ApiThread, s3_store: S3Store, tmp_path: Path
) -> None:
    content = _content(12 * 1024**2 + 7)  # more than one part of the API's multipart upload
    with api.client() as client:
        response = client.post("/v1/files", params={"filename": "m.pt2"}, content=content)
        assert response.status_code == 201, response.text
        file = response.json()
        assert file["sha256"] == hashlib.sha256(content).hexdigest()
        assert file["bytes"] == len(content)
        found = client.get("/v1/files", params={"sha256": file["sha256"]}).json()["items"]
        assert [f["id"] for f in found] == [file["id"]]
    assert s3_store.keys() == [f"files/{file['id']}", f"files/{file['id']}.json"]
    assert not list((tmp_path / "data").rglob("f_*"))


def test_an_upload_over_the_cap_or_cut_off_leaves_nothing_in_the_store(
    api: ApiThread, s3_store: S3Store
) -> None:
    with api.client() as client:
        too_big = client.post(
            "/v1/files",
            params={"filename": "m.pt2"},
            content=iter([_content(PART)] * 9),  # chunked: the cap applies while streaming
        )
        assert too_big.status_code == 413, too_big.text
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # a client that goes away
        head = (
            "POST /v1/files?filename=m.pt2 HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/octet-stream\r\nContent-Length: 30000000\r\n\r\n"
        )
        sock.sendall(head.encode() + _content(20 * 1024**2))
        time.sleep(1.0)
    deadline = time.monotonic() + 20
    while (s3_store.multipart_uploads() or s3_store.keys()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert s3_store.multipart_uploads() == []  # aborted in the store too
    assert s3_store.keys() == []


def test_the_client_uploads_directly_and_the_file_is_verified(
    api: ApiThread, s3_store: S3Store, tmp_path: Path
) -> None:
    path = tmp_path / "big.pt2"
    path.write_bytes(_content(2 * PART + 123))  # three parts
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    with httpx.Client(base_url=api.url, timeout=60) as http:
        file = direct_upload(http, path, sha256, raise_for_problem)
    assert file is not None and file.sha256 == sha256 and file.bytes == path.stat().st_size
    assert s3_store.get(f"files/{file.id}") == path.read_bytes()
    with RecalibClient(api.url) as client:
        again = client.upload_file(path)  # same name and content: reused
        assert again.id == file.id
        other = tmp_path / "copy.pt2"
        other.write_bytes(path.read_bytes())
        copy = client.upload_file(other)
        assert copy.id != file.id and copy.sha256 == sha256 and copy.filename == "copy.pt2"
    assert s3_store.multipart_uploads() == []


def _start(client: httpx.Client, content: bytes, sha256: str | None = None) -> dict:
    body = {
        "filename": "m.pt2",
        "bytes": len(content),
        "sha256": sha256 or hashlib.sha256(content).hexdigest(),
    }
    response = client.post("/v1/uploads", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def _put(upload: dict, content: bytes, numbers: list[int] | None = None) -> None:
    size = upload["part_bytes"]
    for part in upload["parts"]:
        n = part["part_number"]
        if numbers is None or n in numbers:
            data = content[(n - 1) * size : n * size]
            assert httpx.put(part["url"], content=data).status_code == 200


def test_a_direct_upload_is_usable_only_once_complete_and_verified(
    api: ApiThread, s3_store: S3Store
) -> None:
    content = _content(PART + 10)
    with api.client() as client:
        upload = _start(client, content)
        assert len(upload["parts"]) == 2
        _put(upload, content, numbers=[1])
        missing = client.post(f"/v1/uploads/{upload['id']}/complete")
        assert missing.status_code == 422 and "part 2 of 2" in missing.json()["detail"]
        assert client.get(f"/v1/files/{upload['file_id']}").status_code == 404  # not usable
        _put(upload, content, numbers=[2])
        done = client.post(f"/v1/uploads/{upload['id']}/complete")
        assert done.status_code == 201, done.text
        assert done.json()["id"] == upload["file_id"]
        assert client.get(f"/v1/files/{upload['file_id']}").status_code == 200
        assert client.post(f"/v1/uploads/{upload['id']}/complete").status_code == 404  # once


def test_a_direct_upload_with_other_bytes_than_declared_is_refused_and_deleted(
    api: ApiThread, s3_store: S3Store
) -> None:
    content = _content(1000)
    with api.client() as client:
        upload = _start(client, content, sha256="ab" * 32)
        _put(upload, content)
        refused = client.post(f"/v1/uploads/{upload['id']}/complete")
        assert refused.status_code == 422, refused.text
        assert refused.json()["field"] == "sha256" and "nothing was kept" in refused.text
        assert client.get(f"/v1/files/{upload['file_id']}").status_code == 404
        wrong_size = _start(client, content + b"!")
        _put(wrong_size, content)  # one byte short
        short = client.post(f"/v1/uploads/{wrong_size['id']}/complete")
        assert short.status_code == 422 and "expected 1001" in short.json()["detail"]
        too_big = client.post(
            "/v1/uploads", json={"filename": "m", "bytes": 10**12, "sha256": "0" * 64}
        )
        assert too_big.status_code == 413 and too_big.json()["field"] == "bytes"
    assert s3_store.keys() == []


def test_a_direct_upload_never_completed_is_aborted_by_retention(
    api: ApiThread, s3_store: S3Store, redis_conn: redis.Redis
) -> None:
    content = _content(PART + 10)
    with api.client() as client:
        upload = _start(client, content)
        _put(upload, content)
        assert len(s3_store.multipart_uploads()) == 1
        files = FileStore(
            S3Storage(s3_store.url, endpoint_url=s3_store.server.endpoint), redis_conn, 1 << 30
        )
        assert DirectUploads(files, redis_conn, 3600).clean_expired() == 0  # not expired yet
        assert DirectUploads(files, redis_conn, 3600).clean_expired(now=time.time() + 7200) == 1
        assert s3_store.multipart_uploads() == []
        assert client.post(f"/v1/uploads/{upload['id']}/complete").status_code == 404
        assert client.get(f"/v1/files/{upload['file_id']}").status_code == 404
    assert s3_store.keys() == []


def test_retention_removes_files_and_jobs_from_the_store_and_the_sha256_lookup(
    api: ApiThread, s3_store: S3Store, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    with api.client() as client:
        file = client.post("/v1/files", params={"filename": "m.pt2"}, content=b"abc").json()
    settings = make_settings(tmp_path / "d", "redis://unused", retention_s=1, **s3_store.settings)
    reaper = Reaper(redis_conn, settings)
    time.sleep(1.5)
    assert reaper.apply_retention() == (0, 1)
    assert s3_store.keys() == []
    with api.client() as client:
        assert client.get("/v1/files", params={"sha256": file["sha256"]}).json()["items"] == []


def test_with_local_storage_the_client_falls_back_to_streaming_through_the_api(
    tmp_path: Path, redis_conn: redis.Redis, redis_url: str
) -> None:
    path = tmp_path / "m.pt2"
    path.write_bytes(b"model")
    with ApiThread(make_settings(tmp_path / "data", redis_url)) as server:
        with server.client() as client:
            refused = client.post(
                "/v1/uploads", json={"filename": "m", "bytes": 5, "sha256": "0" * 64}
            )
            assert refused.status_code == 409 and "POST /v1/files" in refused.json()["detail"]
        with RecalibClient(server.url) as client:
            file = client.upload_file(path)
    assert (tmp_path / "data" / "files" / file.id).read_bytes() == b"model"


def _report(checkpoint: str, sha256: str, size: int) -> Report:
    return Report.model_validate(
        {
            "recalib_version": "0", "model_format": "pt2", "bn_layers": 1,
            "skipped_layers": [],
            "calibration": {
                "samples": 2, "batches": 1, "available_samples": 2, "estimator": "population"
            },
            "before": None, "after": None, "prediction_change": None, "verdict": "unknown",
            "layers": [],
            "checkpoint": {"file": checkpoint, "format": "pt2", "sha256": sha256, "bytes": size},
            "data": {"calibration_file": "c.npz", "eval_file": None},
            "options": {}, "device": "cpu", "timings_s": {"total": 1.0},
        }
    )  # fmt: skip


def _succeeded_job(client: httpx.Client, s3_store: S3Store, conn: redis.Redis, blob: bytes) -> str:
    file_id = client.post("/v1/files", params={"filename": "net.pt2"}, content=b"m").json()["id"]
    job_id = client.post("/v1/jobs", json={"model_file": file_id, "calibration_file": file_id})
    job_id = job_id.json()["id"]
    s3 = s3_store.client()
    prefix = f"{s3_store.prefix}/jobs/{job_id}/attempt-1"
    s3.put_object(Bucket=s3_store.server.bucket, Key=f"{prefix}/out.pt2", Body=blob)
    s3.put_object(Bucket=s3_store.server.bucket, Key=f"{prefix}/report.json", Body=b"{}")
    s3.put_object(Bucket=s3_store.server.bucket, Key=f"{prefix}/report.html", Body=b"<p>r</p>")
    report = _report("out.pt2", hashlib.sha256(blob).hexdigest(), len(blob))
    assert states.start_run(conn, job_id, None, "w-test", 2) is not None
    assert states.finish_run(conn, job_id, 1, "w-test", JobStatus.succeeded, result=report)
    return str(job_id)


def test_artifacts_are_served_from_the_store_with_etag_range_and_head(
    api: ApiThread, s3_store: S3Store, redis_conn: redis.Redis
) -> None:
    blob = _content(3 * 1024**2 + 5)
    etag = f'"{hashlib.sha256(blob).hexdigest()}"'
    with api.client() as client:
        job_id = _succeeded_job(client, s3_store, redis_conn, blob)
        full = client.get(f"/v1/jobs/{job_id}/checkpoint")
        assert full.status_code == 200 and full.content == blob
        assert full.headers["etag"] == etag
        assert full.headers["content-disposition"] == 'attachment; filename="net.recalibrated.pt2"'
        part = client.get(f"/v1/jobs/{job_id}/checkpoint", headers={"Range": "bytes=-10"})
        assert part.status_code == 206 and part.content == blob[-10:]
        head = client.head(f"/v1/jobs/{job_id}/checkpoint")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(blob))
        assert (
            client.get(f"/v1/jobs/{job_id}/checkpoint", headers={"If-None-Match": etag}).status_code
            == 304
        )
        bad = client.get(f"/v1/jobs/{job_id}/checkpoint", headers={"Range": f"bytes={len(blob)}-"})
        assert bad.status_code == 416
        assert client.get(f"/v1/jobs/{job_id}/report.html").text == "<p>r</p>"
        page = client.get(f"/jobs/{job_id}")
        assert page.status_code == 200 and "report.html" in page.text
        s3_store.client().delete_object(
            Bucket=s3_store.server.bucket, Key=f"{s3_store.prefix}/jobs/{job_id}/attempt-1/out.pt2"
        )
        gone = client.get(f"/v1/jobs/{job_id}/checkpoint")
        assert gone.status_code == 404 and "no longer stored" in gone.json()["detail"]


def test_presigned_downloads_redirect_to_the_store(
    tmp_path: Path, redis_conn: redis.Redis, redis_url: str, s3_store: S3Store
) -> None:
    settings = make_settings(
        tmp_path / "data", redis_url, presigned_downloads=True, **s3_store.settings
    )
    blob = _content(1000)
    with ApiThread(settings) as server, server.client() as client:
        job_id = _succeeded_job(client, s3_store, redis_conn, blob)
        redirect = client.get(f"/v1/jobs/{job_id}/checkpoint")
        assert redirect.status_code == 307, redirect.text
        assert redirect.headers["location"].startswith(s3_store.server.endpoint)
        assert redirect.headers["etag"] == f'"{hashlib.sha256(blob).hexdigest()}"'
        fetched = httpx.get(redirect.headers["location"])  # no API key reaches the store
        assert fetched.status_code == 200 and fetched.content == blob
        assert "net.recalibrated.pt2" in fetched.headers["content-disposition"]
