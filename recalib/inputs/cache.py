"""A worker's cache of its inputs: content by sha256, a URI → (validator, sha256) map.

Inputs fetched by URI, and uploads when the store is not local (a job on the same upload, or
another upload of the same content, links it from here instead of downloading it again).

``<root>/sha256/<hex>`` is the content, ``<root>/uris/<sha256 of the URI>.json`` what was fetched
from a URI and the validator (S3 ETag, HTTP ETag or Last-Modified) the source gave with it: a
later fetch whose source still gives that validator is served from here. Everything is written
under a temporary name and renamed, so concurrent workers on one machine never see a half file;
the job links its input from here (a link survives an eviction). Least recently used content is
evicted once the cache holds more than ``max_bytes``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    validator: str
    sha256: str
    bytes: int
    path: Path


class InputCache:
    """Content fetched by URI under ``root``, at most ``max_bytes`` (0: nothing is kept)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, uri: str) -> CacheEntry | None:
        """What was fetched from ``uri`` before, if its content is still here."""
        if not self.enabled:
            return None
        try:
            meta = json.loads(self._uri_path(uri).read_text(encoding="utf-8"))
            entry = CacheEntry(meta["validator"], meta["sha256"], int(meta["bytes"]), Path())
        except (OSError, ValueError, KeyError, TypeError):
            return None
        path = self.content(entry.sha256, entry.bytes)
        return None if path is None else dataclasses.replace(entry, path=path)

    def content(self, sha256: str, size: int) -> Path | None:
        """The kept content with ``sha256`` (``size`` bytes), marked recently used; else None."""
        if not self.enabled:
            return None
        path = self._content_path(sha256)
        try:
            if path.stat().st_size != size:
                return None
            os.utime(path)  # recently used
        except OSError:
            return None
        return path

    def tmp_path(self) -> Path:
        """A fresh path in the cache's filesystem to download into."""
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp / f"fetch-{os.getpid()}-{secrets.token_hex(6)}"

    def add(self, uri: str, validator: str | None, path: Path, sha256: str, size: int) -> Path:
        """Keep the downloaded ``path`` (moved in) as the content of ``uri``; return its place.

        Without a validator the content is kept by sha256 but the URI is not remembered.
        """
        target = self.keep(path, sha256)
        if validator:
            meta = {"uri": uri, "validator": validator, "sha256": sha256, "bytes": size}
            uri_path = self._uri_path(uri)
            uri_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = uri_path.with_name(f".{uri_path.name}.{secrets.token_hex(4)}")
            tmp.write_text(json.dumps(meta), encoding="utf-8")
            os.replace(tmp, uri_path)
        return target

    def keep(self, path: Path, sha256: str) -> Path:
        """Move the downloaded ``path``, whose content has ``sha256``, in; return its place."""
        target = self._content_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        self._evict(keep=target)
        return target

    def _evict(self, keep: Path) -> None:
        contents = []
        for path in (self.root / "sha256").glob("*"):
            with contextlib.suppress(OSError):
                stat = path.stat()
                contents.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in contents)
        for _, size, path in sorted(contents):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                logger.info("input cache: evicted %s (%d bytes)", path.name, size)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _uri_path(self, uri: str) -> Path:
        return self.root / "uris" / f"{hashlib.sha256(uri.encode()).hexdigest()}.json"

    def _content_path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256
