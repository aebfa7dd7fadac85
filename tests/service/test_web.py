"""The web page over real HTTP (no browser): login cookie, CSRF, escaping, report.html's route.

Jobs are moved through the job layer's own state machine (``recalib.jobs.states``) instead of a
worker, so these tests stay fast; tests/test_web_ui.py runs the real thing in Chromium.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from recalib import layout
from recalib.contract import JobError, JobStatus, Report
from recalib.jobs import states
from service.web.session import CSRF_COOKIE, KEY_COOKIE
from tests.live import ApiThread, make_settings

KEY_A = "alice-key-0123456789"
KEY_B = "bob-key-9876543210"
KEYS = ["alice:" + KEY_A, "bob:" + KEY_B]
HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture
def api(tmp_path: Path, redis_conn, redis_url: str) -> Iterator[ApiThread]:
    with ApiThread(make_settings(tmp_path / "data", redis_url, api_keys=KEYS)) as server:
        yield server


def _browser(api: ApiThread) -> httpx.Client:
    """A client that keeps cookies and sends the page's Origin, like a browser on the page."""
    return httpx.Client(base_url=api.url, headers={"Origin": api.url}, timeout=30)


def _csrf(client: httpx.Client, path: str = "/login") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match is not None
    assert client.cookies[CSRF_COOKIE] == match.group(1)
    return match.group(1)


def _login(client: httpx.Client, key: str) -> httpx.Response:
    token = _csrf(client)
    return client.post("/login", data={"key": key, "csrf_token": token, "next": "/submit"})


def test_pages_need_the_key_and_login_sets_a_strict_httponly_cookie(api: ApiThread) -> None:
    with _browser(api) as browser:
        for path in ("/", "/submit", "/jobs/j_0123456789abcdefgh"):
            response = browser.get(path)
            assert response.status_code == 303
            assert response.headers["location"].startswith("/login?next=")
        wrong = _login(browser, "not-a-key")
        assert wrong.status_code == 401
        assert "wrong API key" in wrong.text
        assert KEY_COOKIE not in browser.cookies
        right = _login(browser, KEY_A)
        assert right.status_code == 303
        assert right.headers["location"] == "/submit"
        cookie = right.headers["set-cookie"]
        assert cookie.startswith(f"{KEY_COOKIE}={KEY_A};")
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        page = browser.get("/")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        nonce = re.search(r"'nonce-([^']+)'", csp)
        assert nonce is not None and f'nonce="{nonce.group(1)}"' in page.text
        assert "frame-ancestors 'none'" in csp


def test_the_cookie_counts_for_reading_the_api_never_for_changing_it(api: ApiThread) -> None:
    with api.client(KEY_A) as alice:
        file_id = alice.post("/v1/files", params={"filename": "m.pt2"}, content=b"m").json()["id"]
    with _browser(api) as browser:
        assert _login(browser, KEY_A).status_code == 303
        assert browser.get("/v1/files").json()["items"][0]["id"] == file_id
        assert browser.get(f"/v1/files/{file_id}").status_code == 200
        assert browser.delete(f"/v1/files/{file_id}").status_code == 401
        body = {"model_file": file_id, "calibration_file": file_id}
        assert browser.post("/v1/jobs", json=body).status_code == 401
        assert browser.post("/v1/files", content=b"x").status_code == 401
    with api.client(KEY_A) as alice:
        assert alice.get(f"/v1/files/{file_id}").status_code == 200  # still there


def _submit_files() -> dict[str, tuple[str, bytes]]:
    return {"model": ("m.pt2", b"model"), "calibration": ("c.npz", b"calib")}


def test_forms_refuse_another_origin_and_a_missing_token(api: ApiThread, tmp_path: Path) -> None:
    with _browser(api) as browser:
        assert _login(browser, KEY_A).status_code == 303
        token = _csrf(browser, "/submit")
        evil = browser.post(
            "/submit",
            data={"csrf_token": token},
            files=_submit_files(),
            headers={"Origin": "https://evil.example"},
        )
        assert evil.status_code == 403
        assert "another site" in evil.text
        no_token = browser.post("/submit", data={}, files=_submit_files())
        assert no_token.status_code == 403
        assert "security token" in no_token.text
        browser.cookies.delete(CSRF_COOKIE)
        stale = browser.post("/submit", data={"csrf_token": token}, files=_submit_files())
        assert stale.status_code == 403
        assert browser.get("/v1/files").json()["items"] == []  # nothing was kept
    assert not list(layout.tmp_dir(tmp_path / "data").rglob("*.part"))


def test_submit_form_creates_a_job_of_the_tenant(api: ApiThread) -> None:
    with _browser(api) as browser:
        assert _login(browser, KEY_A).status_code == 303
        token = _csrf(browser, "/submit")
        bad = browser.post(
            "/submit",
            data={"csrf_token": token, "batch_size": "0", "options": '{"seed": 3}'},
            files=_submit_files(),
        )
        assert bad.status_code == 422
        assert "batch_size" in bad.text
        assert 'value="0"' in bad.text  # the form keeps what was typed
        assert browser.get("/v1/files").json()["items"] == []  # refused before keeping files
        response = browser.post(
            "/submit",
            data={"csrf_token": token, "estimator": "ema", "fold": "on", "options": '{"seed": 3}'},
            files=_submit_files(),
        )
        assert response.status_code == 303
        job_id = response.headers["location"].removeprefix("/?created=")
        job = browser.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "queued"
        assert job["request"]["options"]["estimator"] == "ema"
        assert job["request"]["options"]["fold"] is True
        assert job["request"]["options"]["seed"] == 3
        assert job["request"]["eval_file"] is None
        listing = browser.get(response.headers["location"])
        assert job_id in listing.text
        assert f'data-job="{job_id}" data-live' in listing.text  # followed over SSE
    with api.client(KEY_B) as bob:
        assert bob.get(f"/v1/jobs/{job_id}").status_code == 404


def _minimal_report(out_files: dict[str, str]) -> Report:
    return Report.model_validate(
        {
            "recalib_version": "0",
            "model_format": "pt2",
            "bn_layers": 1,
            "skipped_layers": [],
            "calibration": {
                "samples": 2, "batches": 1, "available_samples": 2, "estimator": "population"
            },
            "before": None,
            "after": None,
            "prediction_change": None,
            "verdict": "unknown",
            "layers": [],
            "checkpoint": {"file": out_files["checkpoint"], "format": "pt2", "sha256": "0" * 64,
                           "bytes": 1},
            "data": {"calibration_file": "c.npz", "eval_file": None},
            "options": {},
            "device": "cpu",
            "timings_s": {"total": 1.0},
        }
    )  # fmt: skip


def _finish(conn: redis.Redis, job_id: str, status: JobStatus, **outcome: object) -> None:
    assert states.start_run(conn, job_id, None, "w-test", 2) is not None
    assert states.finish_run(conn, job_id, 1, "w-test", status, **outcome) is not None  # type: ignore[arg-type]


def test_report_html_route_and_job_page(api: ApiThread, tmp_path: Path, redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    with api.client(KEY_A) as alice, api.client(KEY_B) as bob, _browser(api) as browser:
        file_id = alice.post("/v1/files", params={"filename": "m.pt2"}, content=b"m").json()["id"]
        body = {"model_file": file_id, "calibration_file": file_id}
        done, failed = (alice.post("/v1/jobs", json=body).json()["id"] for _ in range(2))
        assert alice.get(f"/v1/jobs/{done}/report.html").status_code == 409  # still queued

        out_dir = layout.attempt_dir(tmp_path / "data", done, 1)
        out_dir.mkdir(parents=True)
        (out_dir / "report.json").write_text("{}")
        _finish(conn, done, JobStatus.succeeded, result=_minimal_report({"checkpoint": "m.pt2"}))
        missing = alice.get(f"/v1/jobs/{done}/report.html")
        assert missing.status_code == 404
        assert "report.html" in missing.json()["detail"]

        page = f"<!DOCTYPE html><title>{HOSTILE}</title>".replace("<img", "&lt;img")
        (out_dir / "report.html").write_text(page)
        served = alice.get(f"/v1/jobs/{done}/report.html")
        assert served.status_code == 200
        assert served.text == page
        assert served.headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in served.headers["content-security-policy"]
        assert served.headers["etag"] == f'"{hashlib.sha256(page.encode()).hexdigest()}"'
        again = alice.get(
            f"/v1/jobs/{done}/report.html", headers={"If-None-Match": served.headers["etag"]}
        )
        assert again.status_code == 304
        assert bob.get(f"/v1/jobs/{done}/report.html").status_code == 404
        assert httpx.get(f"{api.url}/v1/jobs/{done}/report.html").status_code == 401

        _finish(
            conn, failed, JobStatus.failed, error=JobError(type="invalid-model", message=HOSTILE)
        )
        assert _login(browser, KEY_A).status_code == 303
        job_page = browser.get(f"/jobs/{done}")
        assert f'src="/v1/jobs/{done}/report.html"' in job_page.text
        assert f"/v1/jobs/{done}/checkpoint" in job_page.text
        assert browser.get(f"/v1/jobs/{done}/report.html").status_code == 200  # the cookie
        failed_page = browser.get(f"/jobs/{failed}")
        assert HOSTILE not in failed_page.text
        assert "&lt;img src=x onerror=alert(1)&gt;" in failed_page.text
        listing = browser.get("/")
        assert HOSTILE not in listing.text
        assert "invalid-model" in listing.text
        assert browser.get("/jobs/j_0123456789abcdefgh").status_code == 404
    conn.close()


def test_login_redirect_goes_only_to_local_paths(api: ApiThread) -> None:
    with _browser(api) as browser:
        token = _csrf(browser)
        for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
            response = browser.post(
                "/login", data={"key": KEY_A, "csrf_token": token, "next": target}
            )
            assert response.status_code == 303
            assert response.headers["location"] == "/"


def _drift_report(recommend: bool) -> Report:
    report = _minimal_report({"checkpoint": "unused"}).model_dump(mode="json")
    layer = {"name": "features.1", "type": "BatchNorm2d", "channels": 8, "score": 2.5,
             "max_channel_score": 4.0, "noise": 0.001, "mean_shift_std": 1.2,
             "var_ratio": 0.3}  # fmt: skip
    drift = {"score": 2.5 if recommend else 0.001, "threshold": 0.05,
             "recommend_recalibration": recommend, "samples": 359, "reliable": True,
             "most_moved": ["features.1"], "layers": [layer]}  # fmt: skip
    return Report.model_validate({**report, "kind": "drift", "checkpoint": None, "drift": drift})


def test_submit_form_queues_a_drift_check(api: ApiThread, tmp_path: Path, redis_url: str) -> None:
    with _browser(api) as browser:
        assert _login(browser, KEY_A).status_code == 303
        form = browser.get("/submit")
        assert '<select id="kind" name="kind">' in form.text
        assert '<option value="drift">' in form.text
        token = _csrf(browser, "/submit")
        refused = browser.post(
            "/submit", data={"csrf_token": token, "kind": "drift", "fold": "on"},
            files=_submit_files(),
        )  # fmt: skip
        assert refused.status_code == 422
        assert "writes no model" in refused.text
        assert '<option value="drift" selected>' in refused.text  # the form keeps the choice
        assert browser.get("/v1/files").json()["items"] == []
        unknown = browser.post(
            "/submit", data={"csrf_token": token, "kind": "prune"}, files=_submit_files()
        )
        assert unknown.status_code == 422
        response = browser.post(
            "/submit", data={"csrf_token": token, "kind": "drift"}, files=_submit_files()
        )
        assert response.status_code == 303
        job_id = response.headers["location"].removeprefix("/?created=")
        job = browser.get(f"/v1/jobs/{job_id}").json()
        assert job["request"]["kind"] == "drift"
        assert job["request"]["options"]["fold"] is False

        conn = redis.Redis.from_url(redis_url)
        try:
            _finish(conn, job_id, JobStatus.succeeded, result=_drift_report(recommend=True))
        finally:
            conn.close()
        page = browser.get(f"/jobs/{job_id}")
        assert 'id="drift"' in page.text
        assert "recalibrate" in page.text
        assert f"/v1/jobs/{job_id}/checkpoint" not in page.text  # a drift check writes no model
        assert f"/v1/jobs/{job_id}/metrics" in page.text
        assert "drift: recalibrate" in browser.get("/").text


def test_submit_form_takes_a_labeled_source_set_for_the_label_free_verdict(api: ApiThread) -> None:
    with _browser(api) as browser:
        assert _login(browser, KEY_A).status_code == 303
        page = browser.get("/submit").text
        assert 'name="source_evaluation"' in page
        token = _csrf(browser, "/submit")
        files = _submit_files() | {"source_evaluation": ("source.npz", b"source")}
        response = browser.post("/submit", data={"csrf_token": token}, files=files)
        assert response.status_code == 303, response.text
        job_id = response.headers["location"].removeprefix("/?created=")
        request = browser.get(f"/v1/jobs/{job_id}").json()["request"]
        source = browser.get(f"/v1/files/{request['source_eval_file']}").json()
        assert source["filename"] == "source.npz"
        page = browser.get(f"/jobs/{job_id}")
        assert page.status_code == 200 and "source.npz" in page.text
