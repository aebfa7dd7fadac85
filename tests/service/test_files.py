"""``/v1/files`` over real HTTP: streamed uploads (raw and multipart), listing, limits, aborts."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from recalib import layout
from tests.live import ApiThread, Stack, make_settings

MAX_UPLOAD_BYTES = 4 * 1024 * 1024


@pytest.fixture
def api(tmp_path: Path, redis_conn, redis_url: str) -> Iterator[ApiThread]:
    settings = make_settings(tmp_path / "data", redis_url, max_upload_bytes=MAX_UPLOAD_BYTES)
    with ApiThread(settings) as server:
        yield server


def _leftovers(data_dir: Path) -> list[Path]:
    """Files in the upload area and the file store (the per-process lock excepted)."""
    paths = [*layout.tmp_dir(data_dir).rglob("*"), *layout.files_dir(data_dir).rglob("*")]
    return [p for p in paths if p.is_file() and p.name != ".lock"]


def test_raw_upload_streams_to_disk_with_size_and_sha256(api: ApiThread, tmp_path: Path) -> None:
    content = os.urandom(3 * 1024 * 1024 + 17)  # several 1 MiB slices and a remainder
    with api.client() as client:
        response = client.post(
            "/v1/files",
            content=content,
            headers={"Content-Type": "application/octet-stream", "X-Filename": "model.pt2"},
        )
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/files/{body['id']}"
    assert body["bytes"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["filename"] == "model.pt2"
    data_dir = tmp_path / "data"
    assert layout.file_path(data_dir, body["id"]).read_bytes() == content
    meta = json.loads(layout.file_meta_path(data_dir, body["id"]).read_text())
    assert meta["filename"] == "model.pt2"
    assert meta["tenant"] == "default"


def test_multipart_upload_keeps_the_part_filename(api: ApiThread) -> None:
    content = os.urandom(200_000)
    with api.client() as client:
        response = client.post("/v1/files", files={"file": ("target.npz", content)})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["filename"] == "target.npz"
    assert body["bytes"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("../../etc/passwd.npz", "passwd.npz"),
        ("..\\..\\evil name!.pt2", "evil_name_.pt2"),
        ("...", "upload"),
        ("x" * 300 + ".pt2", "x" * 124 + ".pt2"),
    ],
)
def test_filenames_are_sanitised(api: ApiThread, tmp_path: Path, given: str, stored: str) -> None:
    with api.client() as client:
        response = client.post("/v1/files", params={"filename": given}, content=b"abc")
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == stored
    data_dir = tmp_path / "data"
    assert sorted(p.name for p in layout.files_dir(data_dir).iterdir()) == sorted(
        [response.json()["id"], response.json()["id"] + ".json"]
    )
    assert not (tmp_path / "etc").exists()


def test_list_get_delete_and_pagination(api: ApiThread) -> None:
    with api.client() as client:
        ids = [
            client.post(
                "/v1/files", params={"filename": f"f{i}.npz"}, content=f"{i}".encode()
            ).json()["id"]
            for i in range(3)
        ]
        first = client.get("/v1/files", params={"limit": 2}).json()
        assert [item["id"] for item in first["items"]] == ids[::-1][:2]  # newest first
        second = client.get("/v1/files", params={"limit": 2, "cursor": first["next_cursor"]}).json()
        assert [item["id"] for item in second["items"]] == [ids[0]]
        assert second["next_cursor"] is None
        assert client.get(f"/v1/files/{ids[1]}").json()["filename"] == "f1.npz"

        assert client.delete(f"/v1/files/{ids[1]}").status_code == 204
        missing = client.get(f"/v1/files/{ids[1]}")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        assert [item["id"] for item in client.get("/v1/files").json()["items"]] == [ids[2], ids[0]]
        assert client.delete(f"/v1/files/{ids[1]}").status_code == 404

        bad_cursor = client.get("/v1/files", params={"cursor": "nonsense"})
        assert bad_cursor.status_code == 422
        assert bad_cursor.json()["field"] == "cursor"


def test_lookup_by_sha256_finds_existing_content(api: ApiThread) -> None:
    content = b"the same bytes"
    digest = hashlib.sha256(content).hexdigest()
    with api.client() as client:
        assert client.get("/v1/files", params={"sha256": digest}).json()["items"] == []
        file_id = client.post("/v1/files", params={"filename": "a.npz"}, content=content).json()[
            "id"
        ]
        found = client.get("/v1/files", params={"sha256": digest.upper()}).json()["items"]
        assert [item["id"] for item in found] == [file_id]


def test_oversized_upload_is_413_and_leaves_nothing(api: ApiThread, tmp_path: Path) -> None:
    too_big = b"x" * (MAX_UPLOAD_BYTES + 1)
    with api.client() as client:
        declared = client.post("/v1/files", params={"filename": "big.pt2"}, content=too_big)
        assert declared.status_code == 413
        assert declared.headers["content-type"] == "application/problem+json"
        assert declared.json()["type"].endswith("/payload-too-large")

        def chunks() -> Iterator[bytes]:  # no Content-Length: the cap applies while streaming
            for start in range(0, len(too_big), 256 * 1024):
                yield too_big[start : start + 256 * 1024]

        try:
            streamed = client.post("/v1/files", params={"filename": "big.pt2"}, content=chunks())
            assert streamed.status_code == 413
        except httpx.TransportError:
            pass  # the server may close before the client finished sending; what stays matters
        assert client.get("/v1/files").json()["items"] == []
    assert _leftovers(tmp_path / "data") == []


def test_bad_uploads_are_422_naming_the_field(api: ApiThread) -> None:
    with api.client() as client:
        nameless = client.post("/v1/files", content=b"abc")
        assert (nameless.status_code, nameless.json()["field"]) == (422, "filename")
        empty = client.post("/v1/files", params={"filename": "a.npz"}, content=b"")
        assert (empty.status_code, empty.json()["field"]) == (422, "body")
        no_file_part = client.post("/v1/files", files={"other": ("a.npz", b"abc")})
        assert (no_file_part.status_code, no_file_part.json()["field"]) == (422, "file")
        bad_id = client.get("/v1/files/not-an-id")
        assert bad_id.status_code == 422
        assert bad_id.json()["field"] == "file_id"
        assert client.get("/v1/files").json()["items"] == []


def _send_partial_upload(url: str, declared: int, sent: int) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST /v1/files?filename=part.pt2 HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + b"y" * sent)
    return sock


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_mid_upload_leaves_nothing(api: ApiThread, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    sock = _send_partial_upload(api.url, declared=3_000_000, sent=1_500_000)
    assert _wait_for(lambda: any(p.suffix == ".part" for p in _leftovers(data_dir)))
    sock.close()
    assert _wait_for(lambda: _leftovers(data_dir) == [])
    with api.client() as client:
        assert client.get("/v1/files").json()["items"] == []


@pytest.mark.slow
def test_api_killed_mid_upload_leaves_nothing_after_restart(
    tmp_path: Path, redis_conn, redis_url: str
) -> None:
    with Stack(redis_url, tmp_path, RECALIB_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES)) as stack:
        data_dir = stack.data_dir
        stack.start_api()
        sock = _send_partial_upload(stack.url, declared=3_000_000, sent=1_500_000)
        assert _wait_for(lambda: any(p.suffix == ".part" for p in _leftovers(data_dir)))
        stack.kill_api()
        sock.close()
        assert any(p.suffix == ".part" for p in _leftovers(data_dir))  # the crash left it
        stack.start_api(port=stack.port)
        assert _leftovers(data_dir) == []  # removed at start-up
        listed = httpx.get(f"{stack.url}/v1/files", timeout=10).json()["items"]
        assert listed == []
        upload = httpx.post(
            f"{stack.url}/v1/files", params={"filename": "again.pt2"}, content=b"z" * 1000
        )
        assert upload.status_code == 201
