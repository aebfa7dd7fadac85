"""The storage interface against both backends: the local directory and a real S3 server
(SeaweedFS, which checks signatures). The same guarantees hold for each."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from recalib.errors import PayloadTooLargeError, ServiceUnavailableError
from recalib.files.storage import LocalStorage, ObjectMissingError, Storage
from recalib.files.storage.s3 import S3Storage
from recalib.files.storage.s3_part import MIN_PART_BYTES
from tests import s3_fixtures
from tests.live import free_port
from tests.s3_fixtures import SECRET_KEY, S3Store

weed_server = s3_fixtures.weed_server  # fixtures (one SeaweedFS per test session)
s3_store = s3_fixtures.s3_store

BIG = bytes(range(256)) * (MIN_PART_BYTES // 256 * 2 + 1000)  # > 2 parts of a multipart upload


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        store: Storage = LocalStorage(tmp_path / "data")
    else:
        s3: S3Store = request.getfixturevalue("s3_store")
        store = S3Storage(s3.url, endpoint_url=s3.server.endpoint)
    store.open()
    return store


def _upload(storage: Storage, key: str, content: bytes, max_bytes: int = 1 << 32) -> None:
    part = storage.new_upload(key, max_bytes)
    for i in range(0, len(content), 1 << 20):
        part.write(content[i : i + (1 << 20)])
    part.close()
    assert part.bytes == len(content)
    assert part.sha256 == hashlib.sha256(content).hexdigest()
    storage.commit_upload(part, key)


@pytest.mark.parametrize("content", [b"small", BIG], ids=["one-request", "multipart"])
def test_an_upload_is_visible_whole_after_commit(storage: Storage, content: bytes) -> None:
    _upload(storage, "files/f_a", content)
    assert storage.get_bytes("files/f_a") == content
    info = storage.info("files/f_a")
    assert info is not None and info.bytes == len(content)
    assert b"".join(storage.read_range("files/f_a", 3, 9)) == content[3:10]


def test_a_discarded_upload_leaves_nothing(storage: Storage, tmp_path: Path, request) -> None:
    part = storage.new_upload("files/f_b", 1 << 32)
    part.write(BIG)  # two parts already sent to S3
    part.discard()
    assert storage.info("files/f_b") is None
    assert list(storage.list("files/")) == []
    if isinstance(storage, S3Storage):
        s3: S3Store = request.getfixturevalue("s3_store")
        assert s3.multipart_uploads() == []  # aborted in the store too


def test_an_upload_over_the_cap_is_refused_and_leaves_nothing(storage: Storage, request) -> None:
    part = storage.new_upload("files/f_c", MIN_PART_BYTES + 10)
    part.write(BIG[:MIN_PART_BYTES])
    with pytest.raises(PayloadTooLargeError, match="RECALIB_MAX_UPLOAD_BYTES"):
        part.write(BIG[:MIN_PART_BYTES])
    part.discard()
    assert list(storage.list("files/")) == []
    if isinstance(storage, S3Storage):
        assert request.getfixturevalue("s3_store").multipart_uploads() == []


def test_objects_list_download_and_delete(storage: Storage, tmp_path: Path) -> None:
    storage.put_bytes("jobs/j_1/attempt-1/report.json", b"{}")
    storage.put_bytes("jobs/j_1/attempt-2/report.json", b"{}")
    storage.put_bytes("files/f_x", b"x")
    keys = sorted(info.key for info in storage.list("jobs/j_1/"))
    assert keys == ["jobs/j_1/attempt-1/report.json", "jobs/j_1/attempt-2/report.json"]
    storage.download("files/f_x", tmp_path / "out" / "x.bin")
    assert (tmp_path / "out" / "x.bin").read_bytes() == b"x"
    storage.delete_prefix("jobs/j_1/")
    assert list(storage.list("jobs/")) == []
    storage.delete("files/f_x")
    storage.delete("files/f_x")  # absent is fine
    with pytest.raises(ObjectMissingError, match="files/f_x"):
        storage.download("files/f_x", tmp_path / "out" / "y.bin")
    assert storage.get_bytes("files/f_x") is None


def test_probe_passes_on_a_working_store(storage: Storage) -> None:
    storage.probe()


def test_wrong_credentials_are_a_503_naming_the_store_and_the_fix(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-" + SECRET_KEY)
    store = S3Storage(s3_store.url, endpoint_url=s3_store.server.endpoint)
    for attempt in (store.probe, lambda: store.get_bytes("files/x"), lambda: store.info("x")):
        with pytest.raises(ServiceUnavailableError) as info:
            attempt()
        message = info.value.message
        assert "refuses the API's credentials" in message and s3_store.url in message, message
        assert "AWS credentials" in message and "RECALIB_S3_ENDPOINT_URL" in message
        assert "not-" + SECRET_KEY not in message and SECRET_KEY not in message


def test_a_store_that_does_not_answer_is_a_503(s3_store: S3Store) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    store = S3Storage(s3_store.url, endpoint_url=dead)
    with pytest.raises(ServiceUnavailableError, match="does not answer") as info:
        store.probe()
    assert dead in info.value.message


def test_a_missing_bucket_is_a_503(s3_store: S3Store) -> None:
    store = S3Storage("s3://no-such-bucket-here/x", endpoint_url=s3_store.server.endpoint)
    with pytest.raises(ServiceUnavailableError, match=r"NoSuchBucket"):
        store.probe()


def test_stale_multipart_uploads_are_aborted(s3_store: S3Store) -> None:
    store = S3Storage(s3_store.url, endpoint_url=s3_store.server.endpoint)
    part = store.new_upload("files/f_killed", 1 << 32)
    part.write(BIG)  # an API killed here leaves a multipart upload in the store
    assert s3_store.multipart_uploads() == [f"{s3_store.prefix}/files/f_killed"]
    assert store.clean_stale_uploads(older_than_s=3600) == 0  # young: may still be in flight
    assert store.clean_stale_uploads(older_than_s=-1) == 1
    assert s3_store.multipart_uploads() == []
