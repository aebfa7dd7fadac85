"""No interactive API docs on the cookie's origin, and a Content-Security-Policy on every page.

FastAPI's ``/docs`` and ``/redoc`` load their scripts from a CDN without Subresource Integrity
and carry no CSP; served from the origin that holds the login cookie, a compromised CDN could
read the API with the operator's key. They are off; the schema stays at ``/openapi.json``.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import redis

from recalib import layout
from recalib.contract import JobStatus
from tests.service.test_web import _finish, _minimal_report

FASTAPI_DOCS_PATHS = ("/docs", "/redoc", "/docs/oauth2-redirect")


def test_docs_and_redoc_are_off_and_the_schema_stays(client: httpx.Client) -> None:
    for path in FASTAPI_DOCS_PATHS:
        response = client.get(path)
        assert response.status_code == 404, (path, response.headers.get("content-type"))
    schema = client.get("/openapi.json")
    assert schema.status_code == 200
    assert "/v1/jobs" in schema.json()["paths"]


def test_the_web_page_links_the_schema_not_the_docs(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200
    links = re.findall(r'href="([^"]*)"', page.text)
    assert not [link for link in links if link.startswith(("/docs", "/redoc"))], links
    assert "/openapi.json" in links


def _succeeded_job(client: httpx.Client, data_dir: Path, conn: redis.Redis) -> str:
    """A job moved to succeeded by the job layer, with report.json and report.html on disk."""
    file_id = client.post("/v1/files", params={"filename": "m.pt2"}, content=b"m").json()["id"]
    job = client.post("/v1/jobs", json={"model_file": file_id, "calibration_file": file_id})
    job_id = str(job.json()["id"])
    out_dir = layout.attempt_dir(data_dir, job_id, 1)
    out_dir.mkdir(parents=True)
    (out_dir / "m.pt2").write_bytes(b"x")
    (out_dir / "report.json").write_text("{}")
    (out_dir / "report.html").write_text("<!DOCTYPE html><title>r</title>")
    _finish(conn, job_id, JobStatus.succeeded, result=_minimal_report({"checkpoint": "m.pt2"}))
    return job_id


def test_every_html_response_carries_a_content_security_policy(
    client: httpx.Client, tmp_path: Path, redis_url: str
) -> None:
    conn = redis.Redis.from_url(redis_url)
    job_id = _succeeded_job(client, tmp_path / "data", conn)
    conn.close()
    file_id = client.get("/v1/files").json()["items"][0]["id"]
    params = {"job_id": job_id, "file_id": file_id}
    schema = client.get("/openapi.json").json()
    api_paths = [path for path, operations in schema["paths"].items() if "get" in operations]
    web_paths = ["/", "/login", "/submit", f"/jobs/{job_id}", "/jobs/j_0123456789abcdefgh"]
    paths = [*web_paths, *FASTAPI_DOCS_PATHS, "/nowhere"]
    for path in api_paths:
        paths.append(re.sub(r"{(\w+)}", lambda m: params.get(m.group(1), "x"), path))
    html = {}
    for path in paths:
        response = client.get(path)
        if response.headers.get("content-type", "").startswith("text/html"):
            html[path] = response.headers.get("content-security-policy")
    assert {*web_paths, f"/v1/jobs/{job_id}/report.html"} <= set(html)  # the pages are seen
    assert [path for path, csp in html.items() if not csp] == []
