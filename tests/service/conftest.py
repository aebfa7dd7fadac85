"""Fixtures of the API tests: ``api``, a live API (real HTTP, the real Valkey) with default
settings, which a module overrides for its own settings; ``client`` over it; ``file_ids``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live import ApiThread, make_settings


@pytest.fixture
def api(tmp_path: Path, redis_conn, redis_url: str) -> Iterator[ApiThread]:
    with ApiThread(make_settings(tmp_path / "data", redis_url)) as server:
        yield server


@pytest.fixture
def client(api: ApiThread) -> Iterator[httpx.Client]:
    with api.client() as client:
        yield client


@pytest.fixture
def file_ids(client: httpx.Client) -> dict[str, str]:
    """A model and a calibration file uploaded through ``client``: ``JobCreate`` fields → ids."""

    def upload(name: str) -> str:
        response = client.post("/v1/files", params={"filename": name}, content=name.encode())
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    return {"model_file": upload("model.pt2"), "calibration_file": upload("calib.npz")}
