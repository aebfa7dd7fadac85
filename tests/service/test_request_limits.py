"""Limits on what one request may cost the API: body size, stalled bodies, headers, bad JSON.

Real HTTP (uvicorn in a thread, raw sockets where a client must misbehave) over the real Valkey.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from recalib import defaults, layout
from tests.live import ApiThread, make_settings

MAX_REQUEST_BYTES = 64 * 1024
IDLE_TIMEOUT_S = 1.0


@pytest.fixture
def api(tmp_path: Path, redis_conn, redis_url: str) -> Iterator[ApiThread]:
    settings = make_settings(
        tmp_path / "data",
        redis_url,
        max_request_bytes=MAX_REQUEST_BYTES,
        upload_idle_timeout_s=IDLE_TIMEOUT_S,
        max_upload_bytes=4 * 1024 * 1024,
    )
    with ApiThread(settings) as server:
        yield server


def _job_text(file_ids: dict[str, str], size: int) -> bytes:
    """A job body of about ``size`` bytes (the bulk in arch_kwargs)."""
    body = file_ids | {"arch_kwargs": {"blob": "x" * size}}
    return json.dumps(body).encode()


def _assert_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()


# -- JSON bodies are capped (uploads are not) ---------------------------------------------------


def test_a_json_body_over_the_cap_is_413_by_content_length(
    client: httpx.Client, file_ids, redis_conn
) -> None:
    used_before = redis_conn.info("memory")["used_memory"]
    response = client.post(
        "/v1/jobs",
        content=_job_text(file_ids, 4 * MAX_REQUEST_BYTES),
        headers={"Content-Type": "application/json"},
    )
    problem = _assert_problem(response, 413)
    assert problem["field"] == "body"
    assert problem["type"].endswith("/payload-too-large")
    assert "RECALIB_MAX_REQUEST_BYTES" in problem["detail"]
    assert client.get("/v1/jobs").json()["items"] == []
    assert redis_conn.info("memory")["used_memory"] - used_before < MAX_REQUEST_BYTES


def test_a_chunked_json_body_over_the_cap_is_413(client: httpx.Client, file_ids) -> None:
    text = _job_text(file_ids, 4 * MAX_REQUEST_BYTES)

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for start in range(0, len(text), 8192):
            yield text[start : start + 8192]

    response = client.post(
        "/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.request.headers.get("transfer-encoding") == "chunked"
    _assert_problem(response, 413)
    assert client.get("/v1/jobs").json()["items"] == []


def test_a_json_body_under_the_cap_is_read(client: httpx.Client, file_ids) -> None:
    text = _job_text(file_ids, MAX_REQUEST_BYTES // 2)
    response = client.post("/v1/jobs", content=text, headers={"Content-Type": "application/json"})
    assert response.status_code == 202, response.text[:300]


def test_uploads_are_capped_by_their_own_setting_not_this_one(client: httpx.Client) -> None:
    content = b"u" * (4 * MAX_REQUEST_BYTES)
    response = client.post("/v1/files", params={"filename": "big.npz"}, content=content)
    assert response.status_code == 201, response.text
    assert response.json()["bytes"] == len(content)


def test_the_default_cap_refuses_a_50_mb_arch_kwargs(
    tmp_path: Path, redis_conn, redis_url: str
) -> None:
    with ApiThread(make_settings(tmp_path / "data", redis_url)) as api, api.client() as client:
        ids = {
            "model_file": client.post("/v1/files?filename=m.pt2", content=b"m").json()["id"],
            "calibration_file": client.post("/v1/files?filename=c.npz", content=b"c").json()["id"],
        }
        text = _job_text(ids, 50 * 1024 * 1024)
        response = client.post(
            "/v1/jobs", content=text, headers={"Content-Type": "application/json"}
        )
        _assert_problem(response, 413)
        assert str(defaults.MAX_REQUEST_JSON_BYTES) in response.json()["detail"]
        assert client.get("/v1/jobs").json()["items"] == []


# -- bad JSON -------------------------------------------------------------------------------------


def test_invalid_json_names_the_body_and_says_where(client: httpx.Client) -> None:
    response = client.post(
        "/v1/jobs", content=b'{"model_file": ', headers={"Content-Type": "application/json"}
    )
    problem = _assert_problem(response, 422)
    assert problem["field"] == "body"
    assert "position 15" in problem["detail"]
    assert "invalid JSON" in problem["detail"]


# -- stalled bodies -----------------------------------------------------------------------------


def _stalled_request(api: ApiThread, head: str, sent_body: bytes) -> tuple[bytes, float]:
    """Send ``head`` and part of a body, then nothing: what the server answers, and when."""
    port = int(api.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(head.encode() + sent_body)
        started = time.monotonic()
        answer = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            answer += chunk
        return answer, time.monotonic() - started


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/files?filename=stalled.npz", "application/octet-stream"),
        ("/v1/jobs", "application/json"),
    ],
)
def test_a_stalled_body_is_408_and_the_connection_closed(
    api: ApiThread, tmp_path: Path, path: str, content_type: str
) -> None:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        "Content-Length: 10000\r\n\r\n"
    )
    answer, waited_s = _stalled_request(api, head, b"{" + b" " * 999)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"application/problem+json" in answer
    assert IDLE_TIMEOUT_S <= waited_s < IDLE_TIMEOUT_S + 5
    uploads = [p for p in layout.tmp_dir(tmp_path / "data").rglob("*") if p.is_file()]
    assert [p.name for p in uploads if p.name != ".lock"] == []


def test_a_slow_but_steady_upload_is_not_cut(api: ApiThread) -> None:
    def slow() -> Iterator[bytes]:
        for _ in range(4):
            time.sleep(IDLE_TIMEOUT_S / 2)
            yield b"s" * 1000

    with api.client() as client:
        response = client.post("/v1/files", params={"filename": "slow.npz"}, content=slow())
    assert response.status_code == 201, response.text
    assert response.json()["bytes"] == 4000


# -- Last-Event-ID ------------------------------------------------------------------------------


@pytest.fixture
def cancelled_job(client: httpx.Client, file_ids) -> str:
    """A job with two events (queued, cancelled): its event stream ends by itself."""
    job_id = str(client.post("/v1/jobs", json=file_ids).json()["id"])
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    return job_id


def _sse(client: httpx.Client, job_id: str, last_event_id: str) -> httpx.Response:
    headers = {"Accept": "text/event-stream", "Last-Event-ID": last_event_id.encode()}
    return client.get(f"/v1/jobs/{job_id}/events", headers=headers)


@pytest.mark.parametrize(
    "value", ["9223372036854775808", str(2**53 + 1), "-1", "abc", "1.5", "\u00b2", "1" * 40]
)
def test_a_bad_last_event_id_is_422(client: httpx.Client, cancelled_job: str, value: str) -> None:
    problem = _assert_problem(_sse(client, cancelled_job, value), 422)
    assert problem["field"] == "Last-Event-ID"


def test_a_last_event_id_resumes_after_that_event(client: httpx.Client, cancelled_job: str) -> None:
    response = _sse(client, cancelled_job, "1")
    assert response.status_code == 200
    ids = [line for line in response.text.splitlines() if line.startswith("id: ")]
    assert ids == ["id: 2"]
    assert _sse(client, cancelled_job, str(2**53)).text == ""


# -- headers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [20_000, 1_000_000])
def test_huge_headers_are_431(client: httpx.Client, size: int) -> None:
    response = client.get("/v1/jobs", headers={"X-Padding": "p" * size})
    assert response.status_code == 431, response.text[:300]
    assert response.headers["content-type"] == "application/problem+json"
    assert "RECALIB_HTTP_MAX_HEADER_BYTES" in response.json()["detail"]
    assert client.get("/v1/jobs").status_code == 200


def test_the_web_submit_form_streams_files_over_the_json_cap(
    tmp_path: Path, redis_conn, redis_url: str
) -> None:
    """The page's form (POST /submit, multipart) is an upload: RECALIB_MAX_UPLOAD_BYTES applies."""
    settings = make_settings(tmp_path / "data", redis_url, max_request_bytes=MAX_REQUEST_BYTES)
    with (
        ApiThread(settings) as api,
        httpx.Client(base_url=api.url, headers={"Origin": api.url}, timeout=30) as browser,
    ):
        token = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/submit").text)
        assert token is not None
        big = b"m" * (4 * MAX_REQUEST_BYTES)
        response = browser.post(
            "/submit",
            data={"csrf_token": token.group(1)},
            files={"model": ("model.pt2", big), "calibration": ("calib.npz", b"c" * 10)},
        )
        assert response.status_code == 303, response.text[:500]
        sizes = {f["filename"]: f["bytes"] for f in browser.get("/v1/files").json()["items"]}
        assert sizes["model.pt2"] == len(big)
