"""The web page's submit form admits a job by the same rules as ``POST /v1/jobs``.

Before, the form called the job store directly: ``options.register`` on a server without MLflow
was refused over REST but queued by the form, and failed in the worker after the whole run.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from recalib.admission import admit
from recalib.contract import JobCreate
from recalib.errors import UserError
from service.auth import DEFAULT_TENANT
from tests.live import ApiThread, make_settings
from tests.service.test_web import _browser, _csrf

REGISTER = {"register": {"name": "digits-cnn", "alias": "production"}}


@pytest.fixture
def api(tmp_path: Path, redis_conn, redis_url: str) -> Iterator[ApiThread]:
    settings = make_settings(tmp_path / "data", redis_url, mlflow_tracking_uri="")
    with ApiThread(settings) as server:
        yield server


def _form_error(page: httpx.Response) -> str:
    match = re.search(r'<p class="error" id="form-error">(.*?)</p>', page.text, re.S)
    assert match is not None, page.text
    return html.unescape(match.group(1))


def test_the_form_refuses_register_without_mlflow_as_rest_does(api: ApiThread) -> None:
    with api.client() as client, _browser(api) as browser:
        ids = {
            role: client.post("/v1/files", params={"filename": name}, content=b"x").json()["id"]
            for role, name in (("model_file", "m.pt2"), ("calibration_file", "c.npz"))
        }
        rest = client.post("/v1/jobs", json={**ids, "options": REGISTER})
        assert rest.status_code == 422, rest.text
        assert "RECALIB_MLFLOW_TRACKING_URI" in rest.json()["detail"]

        token = _csrf(browser, "/submit")
        form = browser.post(
            "/submit",
            data={"csrf_token": token, "options": json.dumps(REGISTER)},
            files={"model": ("m.pt2", b"model"), "calibration": ("c.npz", b"calib")},
        )
        assert form.status_code == rest.status_code, form.text
        assert _form_error(form) == rest.json()["detail"]
        assert client.get("/v1/jobs").json()["items"] == []  # no job, from either entrance
        kept = {file["id"] for file in client.get("/v1/files").json()["items"]}
        assert kept == set(ids.values())  # the form's uploads were not kept


def test_admit_refuses_a_webhook_to_an_internal_address_as_rest_does(api: ApiThread) -> None:
    """The job layer's admission is the rule REST applies: same field, same message."""
    state = api.app.state
    with api.client() as client:
        file_id = client.post("/v1/files", params={"filename": "m.pt2"}, content=b"x").json()["id"]
        body = {
            "model_file": file_id,
            "calibration_file": file_id,
            "webhook": {"url": "http://127.0.0.1:9/hook"},
        }
        rest = client.post("/v1/jobs", json=body)
        assert rest.status_code == 422, rest.text
        with pytest.raises(UserError) as refused:
            admit(state.job_store, state.file_store, DEFAULT_TENANT, JobCreate.model_validate(body))
        assert refused.value.http_status == rest.status_code
        assert refused.value.message == rest.json()["detail"]
        assert "127.0.0.1" in refused.value.message
        assert client.get("/v1/jobs").json()["items"] == []
