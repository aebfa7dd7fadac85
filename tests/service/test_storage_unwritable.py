"""An unwritable data directory makes the file routes answer 503 naming it, never 500, and a
refused delete leaves the file whole: listed, readable and usable by a job.

Real HTTP and Valkey; the directory is made unwritable with ``tests.unwritable`` (``chattr +i`` as
root, whom permission bits do not stop; ``chmod a-w`` otherwise).
"""

from __future__ import annotations

from pathlib import Path

import httpx

from recalib import layout
from tests.unwritable import unwritable


def _upload(client: httpx.Client, name: str, content: bytes = b"content") -> httpx.Response:
    return client.post("/v1/files", params={"filename": name}, content=content)


def _assert_storage_problem(response: httpx.Response, data_dir: Path) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"].endswith("/service-unavailable")
    assert str(data_dir) in problem["detail"]
    assert "RECALIB_DATA_DIR" in problem["detail"]


def _upload_area(data_dir: Path) -> Path:
    (own,) = [p for p in layout.tmp_dir(data_dir).iterdir() if p.is_dir()]
    return own


def test_upload_into_an_unwritable_upload_area_is_503(client: httpx.Client, tmp_path: Path):
    data_dir = tmp_path / "data"
    with unwritable(_upload_area(data_dir)):
        _assert_storage_problem(_upload(client, "m.pt2"), data_dir)
    assert _upload(client, "m.pt2").status_code == 201  # writable again: works again


def test_upload_into_an_unwritable_files_dir_is_503_and_leaves_nothing(
    client: httpx.Client, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    assert _upload(client, "first.npz").status_code == 201  # files/ exists
    with unwritable(layout.files_dir(data_dir)):
        _assert_storage_problem(_upload(client, "m.pt2", b"refused"), data_dir)
    assert list(layout.tmp_dir(data_dir).rglob("*.part")) == []
    assert [f["filename"] for f in client.get("/v1/files").json()["items"]] == ["first.npz"]


def test_delete_from_an_unwritable_files_dir_is_503_and_the_file_stays_usable(
    client: httpx.Client, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    model = _upload(client, "model.pt2", b"model").json()
    calib = _upload(client, "calib.npz", b"calib").json()
    with unwritable(layout.files_dir(data_dir)):
        _assert_storage_problem(client.delete(f"/v1/files/{model['id']}"), data_dir)
    assert layout.file_path(data_dir, model["id"]).read_bytes() == b"model"
    assert client.get(f"/v1/files/{model['id']}").status_code == 200
    listed = [f["id"] for f in client.get("/v1/files").json()["items"]]
    assert model["id"] in listed  # still listed: the index entries were put back
    by_sha = client.get("/v1/files", params={"sha256": model["sha256"]}).json()["items"]
    assert [f["id"] for f in by_sha] == [model["id"]]
    job = client.post("/v1/jobs", json={"model_file": model["id"], "calibration_file": calib["id"]})
    assert job.status_code == 202, job.text
    assert client.delete(f"/v1/files/{model['id']}").status_code == 204  # writable again
    assert not layout.file_path(data_dir, model["id"]).exists()
