"""Fixtures of the API tests (each module provides its own ``client``)."""

from __future__ import annotations

import httpx
import pytest


@pytest.fixture
def file_ids(client: httpx.Client) -> dict[str, str]:
    """A model and a calibration file uploaded through ``client``: ``JobCreate`` fields → ids."""

    def upload(name: str) -> str:
        response = client.post("/v1/files", params={"filename": name}, content=name.encode())
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    return {"model_file": upload("model.pt2"), "calibration_file": upload("calib.npz")}
