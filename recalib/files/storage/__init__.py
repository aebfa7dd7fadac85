"""Where uploads and artifacts live: a local directory or S3-compatible object storage.

``RECALIB_STORAGE_URL`` chooses: empty (the default) is ``RECALIB_DATA_DIR`` on this machine
(:class:`LocalStorage`), ``s3://bucket/prefix`` an object store (:class:`S3Storage`, boto3;
``RECALIB_S3_ENDPOINT_URL`` for stores other than AWS). The file store, the artifact store, the
readiness probe and retention all go through :func:`open_storage`'s object. Writes stream
through :mod:`.meter` (counted, hashed, capped); the local backend's uploads in flight lie in its
:mod:`.upload_area`.
"""

from __future__ import annotations

import os
from pathlib import Path

from recalib.errors import InvalidOptionError
from recalib.files.storage.base import ObjectInfo, ObjectMissingError, Storage, UploadPart
from recalib.files.storage.local import LocalStorage, storage_error
from recalib.settings import Settings

__all__ = [
    "LocalStorage",
    "ObjectInfo",
    "ObjectMissingError",
    "Storage",
    "UploadPart",
    "open_storage",
    "scratch_root",
    "storage_error",
]


def scratch_root(settings: Settings) -> Path:
    """This machine's directory for the runs' working files when the store is not local."""
    return Path(settings.data_dir) / "scratch"


# What the standard AWS chain reads from the environment: a change makes a new client.
_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)
_opened: dict[tuple[str | int | None, ...], Storage] = {}


def open_storage(settings: Settings, who: str = "API") -> Storage:
    """The store ``settings`` name (boto3 is imported only for ``s3://``); ``who`` (``API``,
    ``worker``) is named in its errors: the credentials to fix are that process's.

    An object store is opened once per process, URL, endpoints, ``who`` and credential
    variables, and reused: a boto3 client costs ~0.1 s to make and keeps its connections, and a
    worker opens the store several times per job. A forked child opens its own."""
    url = settings.storage_url.strip()
    if not url:
        return LocalStorage(settings.data_dir)
    if url.startswith("s3://"):
        from recalib.files.storage.s3 import S3Storage

        endpoint, public = settings.s3_endpoint_url or None, settings.s3_public_endpoint_url or None
        key = (os.getpid(), url, endpoint, public, who)
        key += tuple(os.environ.get(name) for name in _CREDENTIAL_VARS)
        if key not in _opened:
            _opened[key] = S3Storage(
                url, endpoint_url=endpoint, public_endpoint_url=public, who=who
            )
        return _opened[key]
    raise InvalidOptionError(
        f"RECALIB_STORAGE_URL={url!r}: use s3://bucket/prefix, or leave it empty for the local "
        "data directory (RECALIB_DATA_DIR)",
        field="RECALIB_STORAGE_URL",
    )
