"""Is this the API's store? A mark in the store and in Redis lets a worker tell.

The API and the workers must share one store (uploads in, artifacts out): the local data
directory (a shared volume) or one S3 bucket/prefix. A worker given another one
(``RECALIB_DATA_DIR`` unset, another volume, a typo, ``RECALIB_STORAGE_URL`` forgotten) would
fail every job with "the file no longer exists". So the API, at start (:func:`publish`), keeps a
random id in the store's ``.recalib-id`` (written once, kept) and publishes it with the store's
path or URL in Redis (``recalib:data-dir``); a worker (:func:`problem`) compares the id in its
own store against it, at start and before each job, and says what is wrong, naming the setting.

Ids, not paths, are compared: the API and a worker may mount one volume at different paths.
Without the mark in Redis (an API older than this, or a Redis that lost its data) the worker can
only tell a local data directory with no ``files/`` at all, which no API with uploads has. With
object storage the workers need no shared directory at all: their data directory is only scratch.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import redis

from recalib import defaults, layout
from recalib.errors import RecalibError
from recalib.files.storage import LocalStorage, Storage, open_storage
from recalib.keys import DATA_DIR_KEY, as_text
from recalib.settings import Settings

logger = logging.getLogger(__name__)

MARKER_NAME = ".recalib-id"


def marker_path(data_dir: Path) -> Path:
    return Path(data_dir) / MARKER_NAME


def read_marker(data_dir: Path) -> str | None:
    """The id in ``data_dir``'s marker, None when there is none (or it cannot be read)."""
    try:
        return marker_path(data_dir).read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def ensure_marker(data_dir: Path) -> str:
    """The id of ``data_dir``, created on first use (atomically: concurrent APIs agree)."""
    existing = read_marker(data_dir)
    if existing:
        return existing
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f"{MARKER_NAME}.{secrets.token_hex(4)}.tmp"
    tmp.write_text(secrets.token_hex(16) + "\n", encoding="ascii")
    try:
        os.link(tmp, marker_path(data_dir))  # fails if another process was first
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    marker = read_marker(data_dir)
    if marker is None:
        raise OSError(f"cannot read {marker_path(data_dir)} after writing it")
    return marker


def store_marker(storage: Storage, *, create: bool) -> str | None:
    """The id in ``storage``'s marker (created on first use when ``create``)."""
    if isinstance(storage, LocalStorage):
        return ensure_marker(storage.root) if create else read_marker(storage.root)
    raw = storage.get_bytes(MARKER_NAME)
    if raw is None and create:
        storage.put_bytes(MARKER_NAME, (secrets.token_hex(16) + "\n").encode())
        raw = storage.get_bytes(MARKER_NAME)  # two APIs starting at once: the last write wins
    return raw.decode("ascii", "replace").strip() or None if raw else None


def store_name(storage: Storage) -> str:
    if isinstance(storage, LocalStorage):
        return str(storage.root.resolve())
    return (
        storage.describe().removeprefix("the object store ").removesuffix(" (RECALIB_STORAGE_URL)")
    )


def publish(conn: redis.Redis, settings: Settings, storage: Storage | None = None) -> None:
    """The API's side: mark its store and tell Redis. Never raises (logs a warning): the API
    serves without it, and the workers then fall back to a weaker check."""
    storage = storage or open_storage(settings)
    try:
        with storage.guard():
            marker = store_marker(storage, create=True)
        if marker is None:
            raise OSError(f"cannot read the marker of {storage.describe()} after writing it")
        path = store_name(storage)
        previous = conn.hget(DATA_DIR_KEY, "id")
        if previous is not None and as_text(previous) != marker:
            logger.warning(
                "another API published another store (%s) in this Redis; replacing it with %s: "
                "APIs sharing a Redis must share RECALIB_DATA_DIR or RECALIB_STORAGE_URL",
                as_text(conn.hget(DATA_DIR_KEY, "path") or b"?"),
                path,
            )
        host = socket.gethostname()
        conn.hset(DATA_DIR_KEY, mapping={"id": marker, "path": path, "host": host})
    except (OSError, RecalibError, redis.RedisError) as exc:
        logger.warning("cannot publish the store %s for the workers: %s", storage.url, exc)


def describe(settings: Settings) -> str:
    """The data directory, absolute, and whether it was set or the default (for messages)."""
    path = Path(settings.data_dir).resolve()
    if "data_dir" in settings.model_fields_set:
        return f"{path} (RECALIB_DATA_DIR)"
    return f"{path} (the default ./{defaults.DATA_DIR}: RECALIB_DATA_DIR is unset)"


@dataclass(frozen=True)
class Problem:
    """What is wrong with a worker's data directory; ``definite`` when the API's mark says so
    (else it is a guess from a data directory with no ``files/``: no API upload is there)."""

    message: str
    definite: bool


def problem(conn: redis.Redis, settings: Settings) -> Problem | None:
    """Why the worker's store is not the API's, or None when it may be (or cannot be read now:
    a store that is down is waited for by the job, not judged here).

    Raises :class:`redis.RedisError` when Redis does not answer.
    """
    raw = conn.hgetall(DATA_DIR_KEY)
    published = {as_text(k): as_text(v) for k, v in raw.items()}  # type: ignore[union-attr]
    storage = open_storage(settings, who="worker")
    local = isinstance(storage, LocalStorage)
    fix = (
        "give the worker the API's data volume and set RECALIB_DATA_DIR to it (or, with object "
        "storage, the API's RECALIB_STORAGE_URL and RECALIB_S3_ENDPOINT_URL)"
    )
    if published.get("id"):
        try:
            with storage.guard("worker"):
                own = store_marker(storage, create=False)
        except RecalibError as exc:
            logger.warning("cannot read the marker of %s: %s", storage.describe(), exc)
            return None
        if own == published["id"]:
            return None
        found = "another one" if own else f"no {MARKER_NAME}"
        api_store = f"{published.get('path', '?')} on {published.get('host', '?')}"
        mine = f"data directory {describe(settings)}" if local else storage.describe()[4:]
        return Problem(
            f"the worker's {mine} is not the API's ({api_store}; the worker's has {found}); {fix}",
            definite=True,
        )
    if local and not layout.files_dir(Path(settings.data_dir)).is_dir():
        return Problem(
            f"the worker's data directory {describe(settings)} has no files/ directory: no "
            f"upload of the API is there (if the API has any, {fix})",
            definite=False,
        )
    return None
