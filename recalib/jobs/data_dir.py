"""Is this the API's data directory? A mark on disk and in Redis lets a worker tell.

The API and the workers must share one data directory (uploads in, artifacts out). A worker given
another one (``RECALIB_DATA_DIR`` unset, another volume, a typo) would fail every job with "the file
no longer exists". So the API, at start (:func:`publish`), keeps a random id in
``<data dir>/.recalib-id`` (written once, kept) and publishes it with its path in Redis
(``recalib:data-dir``); a worker (:func:`problem`) compares the id in its own data directory
against it, at start and before each job, and says what is wrong, naming ``RECALIB_DATA_DIR``.

Ids, not paths, are compared: the API and a worker may mount one volume at different paths.
Without the mark in Redis (an API older than this, or a Redis that lost its data) the worker can
only tell a data directory with no ``files/`` at all, which no API with uploads has.
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
from recalib.jobs.keys import DATA_DIR_KEY, as_text
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


def publish(conn: redis.Redis, data_dir: Path) -> None:
    """The API's side: mark ``data_dir`` and tell Redis. Never raises (logs a warning): the API
    serves without it, and the workers then fall back to a weaker check."""
    try:
        marker = ensure_marker(Path(data_dir))
        path = str(Path(data_dir).resolve())
        previous = conn.hget(DATA_DIR_KEY, "id")
        if previous is not None and as_text(previous) != marker:
            logger.warning(
                "another API published another data directory (%s) in this Redis; "
                "replacing it with %s: APIs sharing a Redis must share RECALIB_DATA_DIR",
                as_text(conn.hget(DATA_DIR_KEY, "path") or b"?"),
                path,
            )
        host = socket.gethostname()
        conn.hset(DATA_DIR_KEY, mapping={"id": marker, "path": path, "host": host})
    except (OSError, redis.RedisError) as exc:
        logger.warning("cannot publish the data directory %s for the workers: %s", data_dir, exc)


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
    """Why ``settings.data_dir`` is not the API's data directory, or None when it may be.

    Raises :class:`redis.RedisError` when Redis does not answer.
    """
    raw = conn.hgetall(DATA_DIR_KEY)
    published = {as_text(k): as_text(v) for k, v in raw.items()}  # type: ignore[union-attr]
    data_dir = Path(settings.data_dir)
    fix = "give the worker the API's data volume and set RECALIB_DATA_DIR to it"
    if published.get("id"):
        own = read_marker(data_dir)
        if own == published["id"]:
            return None
        found = "another one" if own else f"no {MARKER_NAME}"
        api_dir = f"{published.get('path', '?')} on {published.get('host', '?')}"
        return Problem(
            f"the worker's data directory {describe(settings)} is not the API's ({api_dir}; "
            f"the worker's has {found}); {fix}",
            definite=True,
        )
    if not layout.files_dir(data_dir).is_dir():
        return Problem(
            f"the worker's data directory {describe(settings)} has no files/ directory: no "
            f"upload of the API is there (if the API has any, {fix})",
            definite=False,
        )
    return None
