"""Files put straight into the file store (no API), for the tests that play the worker's part."""

from __future__ import annotations

from pathlib import Path

from redis import Redis

from recalib.files.store import FileStore
from recalib.settings import Settings


def store_files(conn: Redis, settings: Settings, paths: dict[str, Path]) -> dict[str, str]:
    """Each of ``paths`` stored as a committed file of tenant ``default``: role → file id."""
    files = FileStore(settings.data_dir, conn, settings.max_upload_bytes)
    ids = {}
    for role, path in paths.items():
        file_id, part = files.new_part()
        part.write(path.read_bytes())
        part.close()
        ids[role] = files.commit("default", file_id, part, path.name).id
    return ids
