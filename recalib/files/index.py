"""The per-tenant index of uploaded files in Redis: the listing order and a sha256 → id lookup.

Only an index: the store (:class:`recalib.files.store.FileStore`) is the truth. The caller
passes ``read`` (a file id → its record, None when its metadata has gone); an entry whose file
has gone (a crash between the store and Redis) is dropped when a listing meets it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import redis

from recalib.contract import FilePublic, FileRecord, Page
from recalib.errors import InvalidOptionError
from recalib.keys import as_text, file_index_key, file_sha_key

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CURSOR_RE = re.compile(r"^\d{17}:f_[A-Za-z0-9_-]{16,64}$")

ReadFn = Callable[[str], FileRecord | None]


class FileIndex:
    """The files of each tenant, newest first, and each tenant's newest file of a content."""

    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn

    def add(self, record: FileRecord) -> None:
        with self.conn.pipeline() as pipe:
            pipe.zadd(file_index_key(record.tenant), {_index_member(record): 0})
            pipe.hset(file_sha_key(record.tenant), record.sha256, record.id)
            pipe.execute()

    def remove(self, record: FileRecord) -> None:
        self.conn.zrem(file_index_key(record.tenant), _index_member(record))
        sha_key = file_sha_key(record.tenant)
        current = self.conn.hget(sha_key, record.sha256)
        if current is not None and as_text(current) == record.id:
            self.conn.hdel(sha_key, record.sha256)

    def page(
        self, tenant: str, read: ReadFn, *, cursor: str | None = None, limit: int = 50
    ) -> Page[FilePublic]:
        """Files of ``tenant``, newest first, from after ``cursor`` (one this index returned)."""
        if cursor is not None and not _CURSOR_RE.match(cursor):
            raise InvalidOptionError("cursor is not one this API returned", field="cursor")
        high = b"(" + cursor.encode() if cursor else b"+"
        members = self.conn.zrevrangebylex(
            file_index_key(tenant), high, b"-", start=0, num=limit + 1
        )
        items: list[FilePublic] = []
        for member in members[:limit]:
            record = read(as_text(member).partition(":")[2])
            if record is None:
                self.conn.zrem(file_index_key(tenant), member)
                continue
            items.append(record)
        next_cursor = as_text(members[limit - 1]) if len(members) > limit else None
        return Page[FilePublic](items=items, next_cursor=next_cursor)

    def by_sha256(self, tenant: str, sha256: str, read: ReadFn) -> Page[FilePublic]:
        """The file of ``tenant`` with that content (lowercase hex), as a page of 0 or 1."""
        if not SHA256_RE.match(sha256):
            raise InvalidOptionError("sha256 must be 64 hex digits", field="sha256")
        file_id = self.conn.hget(file_sha_key(tenant), sha256)
        record = read(as_text(file_id)) if file_id else None
        if record is None or record.tenant != tenant or record.sha256 != sha256:
            return Page[FilePublic](items=[])
        return Page[FilePublic](items=[record])


def _index_member(record: FileRecord) -> str:
    """Lexicographic order = creation order: microseconds since the epoch, zero-padded, then id."""
    micros = int(record.created_at.timestamp() * 1_000_000)
    return f"{micros:017d}:{record.id}"
