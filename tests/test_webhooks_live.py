"""Webhooks end to end: the API process's sender, a real worker running a digits job, and a real
receiver on 127.0.0.1 that checks each signature with the ``standardwebhooks`` package.

The receiver answers 500, then is down (connection refused), then comes back: the job is not
delayed by any of it, and the ``completed`` message arrives once the receiver is back, under the
same ``webhook-id``, every attempt visible at ``GET /v1/jobs/{id}/deliveries``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live import Stack, create_job, upload, wait_for_job, wait_until
from tests.webhook_receiver import Receiver, new_secret, verify

SECRET = new_secret()
KEYS = {"acme": "key-acme-0123456789", "globex": "key-globex-0123456789"}
FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def stack(live_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {
        "RECALIB_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
        "RECALIB_WEBHOOK_SECRETS": f"acme:{SECRET}",  # globex has none
        "RECALIB_OUTBOUND_ALLOW_HOSTS": "127.0.0.1",
        # every progress event: a warm digits job can end within any interval after `started`
        # (throttling has its own test in tests/webhooks/test_webhooks.py)
        "RECALIB_WEBHOOK_PROGRESS_INTERVAL_S": "0",
    }
    with Stack(live_redis_url, tmp_path_factory.mktemp("webhooks"), **env) as stack:
        stack.start_api()
        stack.start_worker("w1")
        yield stack


def _client(stack: Stack, tenant: str) -> httpx.Client:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
    return httpx.Client(base_url=stack.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def acme(stack: Stack) -> Iterator[httpx.Client]:
    with _client(stack, "acme") as client:
        yield client


@pytest.fixture(scope="module")
def ids(acme: httpx.Client, digits_files: dict[str, Path]) -> dict[str, str]:
    return {name: upload(acme, path) for name, path in digits_files.items()}


def _body(ids: dict[str, str], webhook: dict[str, object]) -> dict[str, object]:
    return {
        "model_file": ids["model"],
        "calibration_file": ids["calibration"],
        "eval_file": ids["evaluation"],
        "webhook": webhook,
    }


def _deliveries(client: httpx.Client, job_id: str) -> list[dict]:
    response = client.get(f"/v1/jobs/{job_id}/deliveries")
    assert response.status_code == 200, response.text
    return list(response.json())


@pytest.mark.slow
def test_completed_reaches_a_receiver_that_was_failing_then_down(
    stack: Stack, acme: httpx.Client, ids: dict[str, str]
) -> None:
    receiver = Receiver(status=500).start()
    port = receiver.port
    try:
        events = ["started", "progress", "completed"]
        job = create_job(acme, _body(ids, {"url": receiver.url, "events": events}))
        done = wait_for_job(acme, job["id"], FINAL, timeout_s=120)
        assert done["status"] == "succeeded", done["error"]  # the failing receiver held nothing up

        def completed_tries(status: int | None = None) -> int:
            return len(receiver.messages("job.completed", answered=status))

        wait_until(lambda: completed_tries(500) >= 2, 30, "two tries of completed (500)")
        receiver.stop()  # down: connection refused
        wait_until(
            lambda: any(
                a["error"] and "ConnectError" in a["error"]
                for d in _deliveries(acme, job["id"])
                if d["type"] == "job.completed"
                for a in d["attempts"]
            ),
            30,
            "a refused attempt of completed",
        )
        receiver.port = port
        receiver.status = 200
        receiver.start()  # back
        wait_until(lambda: completed_tries(200) == 1, 60, "completed delivered after the outage")
        wait_until(
            lambda: all(d["state"] == "delivered" for d in _deliveries(acme, job["id"])),
            60,
            "every message delivered",
        )
    finally:
        receiver.stop()

    deliveries = _deliveries(acme, job["id"])
    (completed,) = [d for d in deliveries if d["type"] == "job.completed"]
    tries = [(a["status_code"], bool(a["error"])) for a in completed["attempts"]]
    assert tries[:2] == [(500, False), (500, False)]
    assert (None, True) in tries  # refused while down
    assert tries[-1] == (200, False)
    assert all("payload" not in d and "url" not in d for d in deliveries)  # the public view

    (message,) = receiver.messages("job.completed", answered=200)
    assert message.headers["webhook-id"] == completed["id"]
    assert {m.headers["webhook-id"] for m in receiver.messages("job.completed")} == {
        completed["id"]
    }
    body = verify(SECRET, message)  # signed with acme's secret, checked by standardwebhooks
    assert body["data"]["job"]["id"] == job["id"]
    assert body["data"]["job"]["status"] == "succeeded"
    assert body["data"]["job"]["result"] == done["result"]
    assert body["data"]["event"]["status"] == "succeeded"

    types = [d["type"] for d in deliveries]
    assert types[0] == "job.started" and types[-1] == "job.completed"
    assert "job.progress" in types
    assert [d["seq"] for d in deliveries] == sorted(d["seq"] for d in deliveries)
    for received in receiver.messages(answered=200):
        verify(SECRET, received)


@pytest.mark.slow
def test_webhooks_refused_at_create_name_the_field(
    stack: Stack, acme: httpx.Client, ids: dict[str, str], digits_files: dict[str, Path]
) -> None:
    private = acme.post("/v1/jobs", json=_body(ids, {"url": "http://10.1.2.3/hook"}))
    assert private.status_code == 422, private.text
    assert private.json()["field"] == "webhook.url"
    assert "RECALIB_OUTBOUND_ALLOW_HOSTS" in private.json()["detail"]

    scheme = acme.post("/v1/jobs", json=_body(ids, {"url": "file:///etc/passwd"}))
    assert scheme.status_code == 422, scheme.text
    assert scheme.json()["field"] == "webhook.url"

    unknown = acme.post(
        "/v1/jobs", json=_body(ids, {"url": "http://127.0.0.1:9/", "events": ["x"]})
    )
    assert unknown.status_code == 422, unknown.text

    with _client(stack, "globex") as globex:
        globex_ids = {name: upload(globex, path) for name, path in digits_files.items()}
        hook = {"url": "http://127.0.0.1:9/hook"}
        no_secret = globex.post("/v1/jobs", json=_body(globex_ids, hook))
        assert no_secret.status_code == 422, no_secret.text
        assert no_secret.json()["field"] == "webhook"
        assert "RECALIB_WEBHOOK_SECRETS" in no_secret.json()["detail"]
        assert globex.get("/v1/jobs").json()["items"] == []  # nothing was created
