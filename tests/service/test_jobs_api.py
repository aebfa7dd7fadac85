"""``/v1/jobs`` over real HTTP with the real job store (no worker: jobs stay queued)."""

from __future__ import annotations

import httpx
import pytest


def _body(file_ids: dict[str, str], **options: object) -> dict:
    return {**file_ids, "options": options}


def test_create_is_202_with_location_and_readable(client: httpx.Client, file_ids) -> None:
    response = client.post("/v1/jobs", json=_body(file_ids, batch_size=16))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["id"].startswith("j_")
    assert job["status"] == "queued"
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    fetched = client.get(response.headers["location"]).json()
    assert fetched["id"] == job["id"]
    assert fetched["request"]["options"]["batch_size"] == 16
    assert "tenant" not in fetched  # JobPublic, not the stored record


@pytest.mark.parametrize("field", ["model_file", "calibration_file", "eval_file"])
def test_unknown_file_id_is_422_naming_the_field(client: httpx.Client, file_ids, field) -> None:
    body = _body(file_ids) | {field: "f_" + "Z" * 22}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert response.json()["field"] == field
    assert "f_" + "Z" * 22 in response.json()["detail"]


def test_misspelt_option_is_422_naming_it(client: httpx.Client, file_ids) -> None:
    response = client.post("/v1/jobs", json=_body(file_ids, momentun=0.2))
    assert response.status_code == 422
    assert response.json()["field"] == "options.momentun"


def test_idempotency_key_returns_the_same_job(client: httpx.Client, file_ids) -> None:
    headers = {"Idempotency-Key": "build-1234"}
    first = client.post("/v1/jobs", json=_body(file_ids, seed=1), headers=headers)
    again = client.post("/v1/jobs", json=_body(file_ids, seed=1), headers=headers)
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", json=_body(file_ids, seed=2), headers=headers)
    assert other.status_code == 422
    assert other.json()["type"].endswith("/idempotency-key-reused")
    assert len(client.get("/v1/jobs").json()["items"]) == 1


def test_list_is_newest_first_paginated_and_filtered(client: httpx.Client, file_ids) -> None:
    ids = [client.post("/v1/jobs", json=_body(file_ids, seed=i)).json()["id"] for i in range(3)]
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [job["id"] for job in page["items"]] == ids[::-1][:2]
    rest = client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [job["id"] for job in rest["items"]] == [ids[0]]
    assert rest["next_cursor"] is None
    queued = client.get("/v1/jobs", params={"status": "queued"}).json()["items"]
    assert {job["id"] for job in queued} == set(ids)
    assert client.get("/v1/jobs", params={"status": "succeeded"}).json()["items"] == []


def test_unknown_job_is_404(client: httpx.Client) -> None:
    for url in ["/v1/jobs/j_" + "q" * 22, "/v1/jobs/j_" + "q" * 22 + "/events"]:
        response = client.get(url)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"


def test_cancel_queued_job_ends_it_and_sse_stream_stops(client: httpx.Client, file_ids) -> None:
    job_id = client.post("/v1/jobs", json=_body(file_ids)).json()["id"]
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 202
    assert cancelled.json()["status"] in ("cancelled", "cancelling")
    events = client.get(f"/v1/jobs/{job_id}/events").json()
    assert [event["seq"] for event in events] == sorted(event["seq"] for event in events)
    assert events[-1]["status"] == "cancelled"
    headers = {"Accept": "text/event-stream"}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=10) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())  # ends by itself: the job is final
    assert "event: cancelled" in text
    assert f"id: {events[-1]['seq']}" in text


def test_artifacts_of_unfinished_job_are_409(client: httpx.Client, file_ids) -> None:
    job_id = client.post("/v1/jobs", json=_body(file_ids)).json()["id"]
    for which in ("checkpoint", "report", "folded"):
        response = client.get(f"/v1/jobs/{job_id}/{which}")
        assert response.status_code == 409
        assert response.json()["type"].endswith("/conflict")


def test_metrics_report_jobs_queue_and_upload_bytes(client: httpx.Client, file_ids) -> None:
    client.post("/v1/jobs", json=_body(file_ids))
    cancelled = client.post("/v1/jobs", json=_body(file_ids, seed=1)).json()["id"]
    client.post(f"/v1/jobs/{cancelled}/cancel")
    text = client.get("/metrics").text
    assert 'recalib_jobs{status="queued"} 1.0' in text
    assert 'recalib_jobs{status="cancelled"} 1.0' in text
    assert "recalib_queue_depth 1.0" in text
    assert "recalib_upload_bytes_total 18.0" in text  # b"model.pt2" + b"calib.npz"
    assert "recalib_workers_live 0.0" in text
    assert 'recalib_job_duration_seconds_bucket{le="+Inf"}' in text
    assert "recalib_redis_up 1.0" in text
