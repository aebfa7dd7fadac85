"""API keys over real HTTP: 401 without a right key, tenants isolated, keys never logged."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from recalib.errors import InvalidOptionError, UnauthorizedError
from service.auth import ApiKeys
from tests.live import ApiThread, make_settings

KEY_A = "alice-key-0123456789"
KEY_B = "bob-key-9876543210"
KEYS = ["alice:" + KEY_A, "bob:sha256:" + hashlib.sha256(KEY_B.encode()).hexdigest()]


@pytest.fixture
def api(tmp_path: Path, redis_conn, redis_url: str) -> Iterator[ApiThread]:
    with ApiThread(make_settings(tmp_path / "data", redis_url, api_keys=KEYS)) as server:
        yield server


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic abc", "Bearer"])
def test_missing_or_wrong_key_is_401_problem(api: ApiThread, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    with api.client() as client:
        for method, url in [("GET", "/v1/files"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs")]:
            response = client.request(method, url, headers=headers)
            assert response.status_code == 401, (method, url)
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["type"].endswith("/unauthorized")


def test_health_and_metrics_stay_open(api: ApiThread) -> None:
    with api.client() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_tenants_see_only_their_own_files_and_jobs(api: ApiThread) -> None:
    alice, bob = api.client(KEY_A), api.client(KEY_B)
    with alice, bob:
        file_id = alice.post("/v1/files", params={"filename": "m.pt2"}, content=b"m").json()["id"]
        job = alice.post("/v1/jobs", json={"model_file": file_id, "calibration_file": file_id})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        assert alice.get(f"/v1/files/{file_id}").status_code == 200
        assert alice.get(f"/v1/jobs/{job_id}").status_code == 200

        assert bob.get("/v1/files").json()["items"] == []
        assert bob.get("/v1/jobs").json()["items"] == []
        for url in [
            f"/v1/files/{file_id}",
            f"/v1/jobs/{job_id}",
            f"/v1/jobs/{job_id}/events",
            f"/v1/jobs/{job_id}/checkpoint",
            f"/v1/jobs/{job_id}/report",
        ]:
            response = bob.get(url)
            assert response.status_code == 404, url
            assert response.headers["content-type"] == "application/problem+json"
        assert bob.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
        assert bob.delete(f"/v1/files/{file_id}").status_code == 404
        stolen = bob.post("/v1/jobs", json={"model_file": file_id, "calibration_file": file_id})
        assert stolen.status_code == 422
        assert stolen.json()["field"] == "model_file"
        assert alice.get(f"/v1/files/{file_id}").status_code == 200  # bob's delete did nothing


def test_keys_never_reach_the_logs(
    tmp_path: Path, redis_conn, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(tmp_path / "data", redis_url, api_keys=KEYS)
    with ApiThread(settings) as server, server.client(KEY_A) as client:
        client.get("/v1/files")
        client.get("/v1/files", headers={"Authorization": "Bearer " + KEY_B + "x"})
        client.post("/v1/jobs", json={"model_file": "f_" + "x" * 20, "calibration_file": "bad"})
    assert "alice" in caplog.text  # the tenants are logged at start, so logging was captured
    for secret in (KEY_A, KEY_B, hashlib.sha256(KEY_B.encode()).hexdigest()):
        assert secret not in caplog.text


def test_api_keys_parsing_and_matching() -> None:
    keys = ApiKeys(KEYS)
    assert keys.tenants == ["alice", "bob"]
    assert keys.tenant_for(f"Bearer {KEY_A}") == "alice"
    assert keys.tenant_for(f"bearer {KEY_B}") == "bob"
    with pytest.raises(UnauthorizedError):
        keys.tenant_for(f"Bearer {KEY_A[:-1]}")
    assert ApiKeys([]).tenant_for(None) == "default"
    with pytest.raises(InvalidOptionError) as excinfo:
        ApiKeys(["no-colon-secret"])
    assert "no-colon-secret" not in str(excinfo.value)


def test_open_api_warns_at_start(
    tmp_path: Path, redis_conn, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with ApiThread(make_settings(tmp_path / "data", redis_url)) as server, server.client() as c:
        assert c.get("/v1/files").status_code == 200  # no key needed
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("OPEN" in r.getMessage() for r in warnings)
