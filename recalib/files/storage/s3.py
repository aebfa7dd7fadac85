"""The S3 backend: objects in ``s3://bucket/prefix`` of AWS S3 or any S3-compatible store.

boto3 finds the credentials by its standard chain (environment, profile, instance role); they
are never taken from a request nor written to a log. ``RECALIB_S3_ENDPOINT_URL`` names a store
other than AWS (path-style addressing then); ``RECALIB_S3_PUBLIC_ENDPOINT_URL`` the address
clients use for presigned URLs when it differs from the one the API and workers use.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from recalib.errors import InvalidOptionError
from recalib.files.storage.base import ObjectInfo, ObjectMissingError, UploadPart
from recalib.files.storage.s3_errors import is_missing, none_if_missing, unavailable
from recalib.files.storage.s3_part import S3Part

READ_CHUNK_BYTES = 1024 * 1024
TRANSFER = TransferConfig(multipart_chunksize=16 * 1024**2, max_concurrency=8)


def parse_s3_url(url: str, *, field: str = "RECALIB_STORAGE_URL") -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix without slashes at either end)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise InvalidOptionError(f"{field}: {url!r} is not s3://bucket[/prefix]", field=field)
    return parts.netloc, parts.path.strip("/")


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` under :meth:`S3Storage.guard` (the store's faults become 503s)."""

    @functools.wraps(method)
    def wrapper(self: S3Storage, *args: Any, **kwargs: Any) -> Any:
        with self.guard():
            return method(self, *args, **kwargs)

    return wrapper


def make_client(endpoint_url: str | None, *, connect_timeout_s: float = 5.0) -> Any:
    """A boto3 S3 client (thread-safe) for ``endpoint_url`` (None: AWS)."""
    session = boto3.session.Session()
    config = Config(
        signature_version="s3v4",
        connect_timeout=connect_timeout_s,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    return session.client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=session.region_name or "us-east-1",
        config=config,
    )


class S3Storage:
    """Objects under ``prefix`` in ``bucket``."""

    is_local = False

    def __init__(
        self,
        url: str,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        *,
        who: str = "API",
    ) -> None:
        self.who = who
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url or None
        self.client = make_client(self.endpoint_url)
        public = public_endpoint_url or None
        self.presign_client = make_client(public) if public and public != endpoint_url else None

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"the object store {self.url}{where} (RECALIB_STORAGE_URL)"

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def guard(self, who: str | None = None) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            error = unavailable(exc, self._where(), who or self.who)
            if error is None:
                raise
            raise error from exc

    def probe(self) -> None:
        key = self.key(f".probe/{secrets.token_hex(6)}")
        with self.guard():
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"ok")
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"not a relative key: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- writing ---------------------------------------------------------------------------

    def new_upload(self, key: str, max_bytes: int) -> S3Part:
        return S3Part(self.client, self.bucket, self.key(key), max_bytes)

    def commit_upload(self, part: UploadPart, key: str) -> None:
        if not isinstance(part, S3Part) or part.key != self.key(key):
            raise TypeError(f"not an upload of this store to {key}: {part!r}")
        part.commit()

    @_guarded
    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=data)

    @_guarded
    def upload_file(self, path: Path, key: str) -> None:
        self.client.upload_file(str(path), self.bucket, self.key(key), Config=TRANSFER)

    @_guarded
    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(key))

    @_guarded
    def delete_prefix(self, prefix: str) -> None:
        batch: list[dict[str, str]] = []
        for info in self.list(prefix):
            batch.append({"Key": self.key(info.key)})
            if len(batch) == 1000:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, batch: list[dict[str, str]]) -> None:
        self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    @_guarded
    def clean_stale_uploads(self, older_than_s: float) -> int:
        """Abort multipart uploads under the prefix started more than ``older_than_s`` ago."""
        cutoff = time.time() - older_than_s
        aborted = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self.key(""))
        for page in pages:
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() < cutoff:
                    with contextlib.suppress(Exception):
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        aborted += 1
        return aborted

    # -- reading ---------------------------------------------------------------------------

    def local_path(self, key: str) -> None:
        del key
        return

    @_guarded
    def get_bytes(self, key: str) -> bytes | None:
        answer = none_if_missing(
            lambda: self.client.get_object(Bucket=self.bucket, Key=self.key(key))
        )
        return None if answer is None else bytes(answer["Body"].read())

    @_guarded
    def info(self, key: str) -> ObjectInfo | None:
        head = none_if_missing(
            lambda: self.client.head_object(Bucket=self.bucket, Key=self.key(key))
        )
        if head is None:
            return None
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    @_guarded
    def download(self, key: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self.key(key), str(target), Config=TRANSFER)
        except Exception as exc:
            if is_missing(exc):
                raise ObjectMissingError(
                    f"{self.key(key)} is not in {self.describe()}", file=key
                ) from exc
            raise

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        strip = len(self.key(""))
        paginator = self.client.get_paginator("list_objects_v2")
        with self.guard():
            pages = list(paginator.paginate(Bucket=self.bucket, Prefix=self.key(prefix)))
        for page in pages:
            for item in page.get("Contents", []):
                yield ObjectInfo(
                    item["Key"][strip:], int(item["Size"]), item["LastModified"].timestamp()
                )

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        with self.guard():
            answer = self.client.get_object(
                Bucket=self.bucket, Key=self.key(key), Range=f"bytes={start}-{end}"
            )
        body = answer["Body"]
        try:
            with self.guard():
                yield from body.iter_chunks(READ_CHUNK_BYTES)
        finally:
            body.close()

    def presign_get(self, key: str, filename: str, expires_s: int) -> str:
        disposition = f"attachment; filename=\"{filename}\"; filename*=UTF-8''{quote(filename)}"
        client = self.presign_client or self.client
        return str(
            client.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": self.key(key),
                    "ResponseContentDisposition": disposition,
                },
                ExpiresIn=expires_s,
            )
        )

    # -- direct uploads (presigned multipart) ----------------------------------------------

    @_guarded
    def create_multipart(self, key: str) -> str:
        created = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key(key))
        return str(created["UploadId"])

    def presign_part(self, key: str, upload_id: str, number: int, expires_s: int) -> str:
        client = self.presign_client or self.client
        params = {
            "Bucket": self.bucket,
            "Key": self.key(key),
            "UploadId": upload_id,
            "PartNumber": number,
        }
        return str(client.generate_presigned_url("upload_part", Params=params, ExpiresIn=expires_s))

    @_guarded
    def list_parts(self, key: str, upload_id: str) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        paginator = self.client.get_paginator("list_parts")
        for page in paginator.paginate(Bucket=self.bucket, Key=self.key(key), UploadId=upload_id):
            parts.extend(page.get("Parts", []))
        return parts

    @_guarded
    def complete_multipart(self, key: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
        self.client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=self.key(key),
            UploadId=upload_id,
            MultipartUpload={
                "Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in parts]
            },
        )

    @_guarded
    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.key(key), UploadId=upload_id
            )
        except Exception as exc:
            if not is_missing(exc):
                raise

    def _where(self) -> str:
        return self.url + (f" at {self.endpoint_url}" if self.endpoint_url else "")
