"""Inputs by URI (recalib.inputs: uri_fetch, cache, job_inputs): a real HTTPS server (self-signed,
trusted by the test) and a real S3 server; the size cap, the SSRF policy (redirects re-checked),
not found, and the cache by sha256 (a second fetch of an unchanged source reads nothing; an
upload on a remote store is downloaded once, checked against its sha256)."""

from __future__ import annotations

import hashlib
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from recalib.contract import JobCreate, JobRecord, JobStatus
from recalib.errors import (
    InvalidOptionError,
    NotFoundError,
    OutboundNotAllowedError,
    PayloadTooLargeError,
)
from recalib.files.storage import LocalStorage
from recalib.files.storage.s3 import S3Storage
from recalib.files.store import FileStore, content_key
from recalib.inputs.cache import InputCache
from recalib.inputs.job_inputs import JobInputs
from recalib.inputs.outbound import OutboundPolicy
from recalib.inputs.uri_fetch import FetchContext, check_job_uris
from tests import s3_fixtures
from tests.s3_fixtures import S3Store

weed_server = s3_fixtures.weed_server  # fixtures (one SeaweedFS per test session)
s3_store = s3_fixtures.s3_store
CONTENT = bytes(range(256)) * 4096  # 1 MiB
ETAG = '"v1"'


class _Handler(BaseHTTPRequestHandler):
    gets = 0

    def do_GET(self) -> None:
        if self.path == "/model.pt2":
            type(self).gets += 1
            if self.headers.get("If-None-Match") == ETAG:
                self.send_response(304)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("ETag", ETAG)
            self.send_header("Content-Length", str(len(CONTENT)))
            self.end_headers()
            self.wfile.write(CONTENT)
        elif self.path == "/chunked.npz":  # no Content-Length: the cap applies while reading
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(4):
                self.wfile.write(f"{len(CONTENT):x}\r\n".encode() + CONTENT + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *args: object) -> None:
        del args


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``(base URL, CA file)`` of an HTTPS server on 127.0.0.1 with a self-signed certificate."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()


def _inputs(tmp_path: Path, request: dict[str, str], ctx: FetchContext) -> JobInputs:
    body = JobCreate.model_validate({"calibration_uri": "https://example.com/c.npz", **request})
    record = JobRecord(
        id="j_test0000000000000", status=JobStatus.running, created_at="2026-01-01T00:00:00Z",
        request=body, tenant="t", attempts=1,
    )  # fmt: skip
    files = FileStore(LocalStorage(tmp_path / "data"), None, ctx.max_bytes)  # type: ignore[arg-type]
    return JobInputs(files, record, ctx, InputCache(tmp_path / "cache", 1 << 30))


def _ctx(ca: Path | None = None, max_bytes: int = 1 << 30, allow: tuple[str, ...] = ()):
    verify = ssl.create_default_context(cafile=str(ca)) if ca else True
    return FetchContext(OutboundPolicy(allow), max_bytes, verify=verify)


def test_an_https_input_is_fetched_hashed_and_then_served_from_the_cache(
    https_server: tuple[str, Path], tmp_path: Path
) -> None:
    base, ca = https_server
    ctx = _ctx(ca, allow=("127.0.0.1",))
    uri = f"{base}/model.pt2"
    first = _inputs(tmp_path, {"model_uri": uri}, ctx)
    path = first.materialize("model", tmp_path / "run1")
    assert path == tmp_path / "run1" / "model.pt2" and path.read_bytes() == CONTENT
    source = first.sources["model"]
    assert source.uri == uri and source.sha256 == hashlib.sha256(CONTENT).hexdigest()
    assert source.bytes == len(CONTENT) and source.cached is False
    second = _inputs(tmp_path, {"model_uri": uri}, ctx)
    again = second.materialize("model", tmp_path / "run2")
    assert again.read_bytes() == CONTENT and second.sources["model"].cached is True
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # nothing half-written left


def test_https_to_a_private_address_is_refused_unless_allowed(
    https_server: tuple[str, Path], tmp_path: Path
) -> None:
    base, ca = https_server
    with pytest.raises(OutboundNotAllowedError, match="RECALIB_OUTBOUND_ALLOW_HOSTS") as info:
        _inputs(tmp_path, {"model_uri": f"{base}/model.pt2"}, _ctx(ca)).materialize(
            "model", tmp_path / "run"
        )
    assert info.value.field == "model_uri"
    request = JobCreate(model_uri=f"{base}/model.pt2", calibration_uri=f"{base}/c.npz")
    with pytest.raises(OutboundNotAllowedError):  # at create time too
        check_job_uris(request, _ctx(ca))


def test_a_redirect_to_a_forbidden_address_is_refused(
    https_server: tuple[str, Path], tmp_path: Path
) -> None:
    base, ca = https_server
    inputs = _inputs(tmp_path, {"model_uri": f"{base}/to-metadata"}, _ctx(ca, allow=("127.0.0.1",)))
    with pytest.raises(OutboundNotAllowedError, match=r"169\.254\.169\.254"):
        inputs.materialize("model", tmp_path / "run")


def test_https_inputs_over_the_cap_are_refused_and_leave_nothing(
    https_server: tuple[str, Path], tmp_path: Path
) -> None:
    base, ca = https_server
    ctx = _ctx(ca, max_bytes=len(CONTENT) - 1, allow=("127.0.0.1",))
    declared = _inputs(tmp_path, {"model_uri": f"{base}/model.pt2"}, ctx)
    with pytest.raises(PayloadTooLargeError, match=r"has 1048576 bytes.*RECALIB_MAX_UPLOAD_BYTES"):
        declared.materialize("model", tmp_path / "run")
    streamed = _inputs(tmp_path, {"model_uri": f"{base}/chunked.npz"}, _ctx(
        ca, max_bytes=2 * len(CONTENT), allow=("127.0.0.1",)
    ))  # fmt: skip
    with pytest.raises(PayloadTooLargeError, match="sends more"):
        streamed.materialize("model", tmp_path / "run")
    assert not list((tmp_path / "cache" / "tmp").iterdir())
    assert not (tmp_path / "cache" / "sha256").exists()


def test_an_https_input_not_found_names_the_field(
    https_server: tuple[str, Path], tmp_path: Path
) -> None:
    base, ca = https_server
    inputs = _inputs(tmp_path, {"model_uri": f"{base}/nothing.pt2"}, _ctx(ca, allow=("127.0.0.1",)))
    with pytest.raises(NotFoundError, match=r"model_uri: .*nothing\.pt2 was not found"):
        inputs.materialize("model", tmp_path / "run")


def _put(store: S3Store, key: str, content: bytes) -> str:
    full = f"{store.prefix}/{key}"
    store.client().put_object(Bucket=store.server.bucket, Key=full, Body=content)
    return f"s3://{store.server.bucket}/{full}"


def test_s3_inputs_are_fetched_cached_by_etag_and_checked_at_create(
    s3_store: S3Store, tmp_path: Path
) -> None:
    uri = _put(s3_store, "in/model.pt2", CONTENT)
    ctx = FetchContext(OutboundPolicy(), 1 << 30, s3_endpoint_url=s3_store.server.endpoint)
    first = _inputs(tmp_path, {"model_uri": uri}, ctx)
    assert first.materialize("model", tmp_path / "r1").read_bytes() == CONTENT
    second = _inputs(tmp_path, {"model_uri": uri}, ctx)
    second.materialize("model", tmp_path / "r2")
    assert second.sources["model"].cached is True
    _put(s3_store, "in/model.pt2", CONTENT[::-1])  # changed at the source: fetched again
    third = _inputs(tmp_path, {"model_uri": uri}, ctx)
    assert third.materialize("model", tmp_path / "r3").read_bytes() == CONTENT[::-1]
    assert third.sources["model"].cached is False
    missing = uri.replace("model.pt2", "gone.pt2")
    with pytest.raises(InvalidOptionError, match="does not exist") as info:
        check_job_uris(JobCreate(model_uri=missing, calibration_uri=uri), ctx)
    assert info.value.field == "model_uri"
    small = FetchContext(OutboundPolicy(), 1000, s3_endpoint_url=s3_store.server.endpoint)
    with pytest.raises(PayloadTooLargeError, match="model_uri"):
        check_job_uris(JobCreate(model_uri=uri, calibration_uri=uri), small)
    with pytest.raises(PayloadTooLargeError):
        _inputs(tmp_path, {"model_uri": uri}, small).materialize("model", tmp_path / "r4")


def test_an_s3_endpoint_named_in_the_uri_obeys_the_policy(
    s3_store: S3Store, tmp_path: Path
) -> None:
    uri = _put(s3_store, "in/m.pt2", CONTENT) + f"?endpoint={s3_store.server.endpoint}"
    refused = _inputs(tmp_path, {"model_uri": uri}, FetchContext(OutboundPolicy(), 1 << 30))
    with pytest.raises(OutboundNotAllowedError, match="model_uri"):
        refused.materialize("model", tmp_path / "r1")
    allowed = _inputs(
        tmp_path, {"model_uri": uri}, FetchContext(OutboundPolicy(["127.0.0.1"]), 1 << 30)
    )
    assert allowed.materialize("model", tmp_path / "r2").read_bytes() == CONTENT


def test_an_upload_on_a_remote_store_is_downloaded_once_then_linked_from_the_cache(
    s3_store: S3Store, tmp_path: Path, redis_conn
) -> None:
    storage = S3Storage(s3_store.url, endpoint_url=s3_store.server.endpoint, who="worker")
    files = FileStore(storage, redis_conn, 1 << 30)
    good, changed = (_commit(files, name, CONTENT) for name in ("model.pt2", "calib.npz"))
    cache = InputCache(tmp_path / "cache", 1 << 30)

    def run_inputs(model_file: str) -> JobInputs:
        body = JobCreate(model_file=model_file, calibration_file=good)
        record = JobRecord(
            id="j_test0000000000000", status=JobStatus.running, tenant="t", attempts=1,
            created_at="2026-01-01T00:00:00Z", request=body,
        )  # fmt: skip
        return JobInputs(files, record, FetchContext(OutboundPolicy(), 1 << 30), cache)

    first = run_inputs(good)
    assert first.materialize("model", tmp_path / "r1").read_bytes() == CONTENT
    source = first.sources["model"]
    assert (source.file_id, source.sha256) == (good, hashlib.sha256(CONTENT).hexdigest())
    assert source.cached is False
    second = run_inputs(good)
    path = second.materialize("model", tmp_path / "r2")
    assert path.read_bytes() == CONTENT and second.sources["model"].cached is True
    kept = cache.content(source.sha256, len(CONTENT))
    assert kept is not None and path.stat().st_ino == kept.stat().st_ino  # linked, not fetched
    # Deleted behind our back: the cached copy does not make it usable again.
    storage.client.delete_object(Bucket=storage.bucket, Key=storage.key(content_key(good)))
    with pytest.raises(NotFoundError, match=f"model file {good}.*missing"):
        run_inputs(good).materialize("model", tmp_path / "r3")

    # Content replaced behind our back (not in the cache): refused, and nothing of it kept.
    key = storage.key(content_key(changed))
    storage.client.put_object(Bucket=storage.bucket, Key=key, Body=CONTENT[::-1])
    cache.clear()
    with pytest.raises(NotFoundError, match=f"model file {changed}.*changed outside recalib"):
        run_inputs(changed).materialize("model", tmp_path / "r4")
    assert not list((tmp_path / "cache" / "sha256").glob("*"))
    assert not list((tmp_path / "cache" / "tmp").iterdir())


def _commit(files: FileStore, filename: str, content: bytes) -> str:
    file_id, part = files.new_part()
    part.write(content)
    part.close()
    return files.commit("t", file_id, part, filename).id
