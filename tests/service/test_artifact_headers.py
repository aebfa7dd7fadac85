"""Every artifact download says ``X-Content-Type-Options: nosniff``, on disk and on S3.

The artifacts hold bytes of the user's choosing; without nosniff a browser may sniff a download
it opens as HTML or script on the API's origin (the login cookie's). report.html has it already.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import redis

from recalib import layout
from recalib.contract import JobStatus, Report
from tests import s3_fixtures
from tests.live import ApiThread, make_settings
from tests.s3_fixtures import S3Store
from tests.service.test_s3_api import _succeeded_job as _succeeded_s3_job
from tests.service.test_web import _finish, _minimal_report

weed_server = s3_fixtures.weed_server  # fixtures (one SeaweedFS per test session)
s3_store = s3_fixtures.s3_store
ARTIFACTS = ("checkpoint", "report", "folded", "report.html")


def _succeeded_job(client: httpx.Client, data_dir: Path, conn: redis.Redis) -> str:
    """A job moved to succeeded by the job layer, its outputs (with a folded model) on disk."""
    file_id = client.post("/v1/files", params={"filename": "m.pt2"}, content=b"m").json()["id"]
    job = client.post("/v1/jobs", json={"model_file": file_id, "calibration_file": file_id})
    job_id = str(job.json()["id"])
    out_dir = layout.attempt_dir(data_dir, job_id, 1)
    out_dir.mkdir(parents=True)
    folded_bytes = b"<html>"
    outputs = {"m.pt2": b"<html><script>alert(1)</script>", "f.pt2": folded_bytes}
    for name, content in outputs.items():
        (out_dir / name).write_bytes(content)
    (out_dir / "report.json").write_text("{}")
    (out_dir / "report.html").write_text("<!DOCTYPE html><title>r</title>")
    folded = {
        "artifact": {"file": "f.pt2", "format": "pt2", "bytes": len(folded_bytes),
                     "sha256": hashlib.sha256(folded_bytes).hexdigest()},
        "folded": 1, "not_folded": [], "max_abs_diff": 0.0,
    }  # fmt: skip
    unfolded = _minimal_report({"checkpoint": "m.pt2"})
    report = Report.model_validate(unfolded.model_dump() | {"folded": folded})
    _finish(conn, job_id, JobStatus.succeeded, result=report)
    return job_id


def _assert_nosniff(client: httpx.Client, job_id: str, which: str) -> None:
    url = f"/v1/jobs/{job_id}/{which}"
    full = client.get(url)
    assert full.status_code == 200, full.text
    responses = {
        "GET": full,
        "Range": client.get(url, headers={"Range": "bytes=0-0"}),
        "If-None-Match": client.get(url, headers={"If-None-Match": full.headers["etag"]}),
    }
    if which != "report.html":  # a GET-only route
        responses["HEAD"] = client.head(url)
    sniffable = {
        how: (response.status_code, response.headers.get("x-content-type-options"))
        for how, response in responses.items()
        if response.headers.get("x-content-type-options") != "nosniff"
    }
    assert sniffable == {}, which


def test_artifact_downloads_from_disk_say_nosniff(
    api: ApiThread, client: httpx.Client, tmp_path: Path, redis_url: str
) -> None:
    conn = redis.Redis.from_url(redis_url)
    job_id = _succeeded_job(client, tmp_path / "data", conn)
    conn.close()
    for which in ARTIFACTS:
        _assert_nosniff(client, job_id, which)


def test_artifact_downloads_from_s3_say_nosniff(
    tmp_path: Path, redis_conn: redis.Redis, redis_url: str, s3_store: S3Store
) -> None:
    settings = make_settings(tmp_path / "data", redis_url, **s3_store.settings)
    with ApiThread(settings) as server, server.client() as client:
        job_id = _succeeded_s3_job(client, s3_store, redis_conn, b"<html><script>")
        for which in ("checkpoint", "report", "report.html"):
            _assert_nosniff(client, job_id, which)
