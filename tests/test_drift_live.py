"""The drift check through the REST API with a real worker: clean and shifted digits, the job's
Prometheus metrics, and no model to download."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from recalib.errors import EXIT_DRIFTED, EXIT_OK, EXIT_USER_ERROR
from tests.live import Stack, create_job, upload, wait_for_job

FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def client(live_stack: Stack):
    with live_stack.client() as client:
        yield client


def _metric(text: str, name: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(name + "{")]
    assert len(lines) == 1, (name, text)
    return float(lines[0].rsplit(" ", 1)[1])


@pytest.mark.slow
def test_drift_jobs_through_the_api(
    client: httpx.Client, digits_ids, digits_case, tmp_path: Path
) -> None:
    clean_path = tmp_path / "clean.npz"
    np.savez(clean_path, inputs=digits_case.calibration[0])
    clean_id = upload(client, clean_path)
    jobs = {}
    for name, data_id in (("shifted", digits_ids["calibration"]), ("clean", clean_id)):
        body = {"kind": "drift", "model_file": digits_ids["model"], "calibration_file": data_id}
        jobs[name] = create_job(client, body)["id"]
    for name, job_id in jobs.items():
        done = wait_for_job(client, job_id, FINAL, timeout_s=120)
        assert done["status"] == "succeeded", done["error"]
        assert done["request"]["kind"] == "drift"
        report = done["result"]
        assert report["kind"] == "drift"
        assert report["checkpoint"] is None
        assert report["drift"]["recommend_recalibration"] is (name == "shifted")
        assert report["drift"]["samples"] == 359
        assert report["sandbox"] is not None  # run by the worker's sandboxed runner

        metrics = client.get(f"/v1/jobs/{job_id}/metrics")
        assert metrics.status_code == 200, metrics.text
        assert metrics.headers["content-type"].startswith("text/plain")
        assert _metric(metrics.text, "recalib_drift_score") == pytest.approx(
            report["drift"]["score"]
        )
        assert _metric(metrics.text, "recalib_drift_threshold") == 0.05
        assert _metric(metrics.text, "recalib_drift_recommend_recalibration") == float(
            name == "shifted"
        )
        assert f'layer="{report["drift"]["most_moved"][0]}"' in metrics.text
        assert f'job_id="{job_id}"' in metrics.text and 'kind="drift"' in metrics.text

        checkpoint = client.get(f"/v1/jobs/{job_id}/checkpoint")
        assert checkpoint.status_code == 404
        assert "writes no model" in checkpoint.json()["detail"]
        assert client.get(f"/v1/jobs/{job_id}/report").json()["drift"] == report["drift"]
        assert client.get(f"/v1/jobs/{job_id}/report.html").status_code == 200


def test_a_drift_job_cannot_ask_for_a_model(client: httpx.Client, digits_ids) -> None:
    base = {"kind": "drift", "model_file": digits_ids["model"],
            "calibration_file": digits_ids["calibration"]}  # fmt: skip
    for options, field in (({"fold": True}, "fold"), ({"register": "digits"}, "register")):
        response = client.post("/v1/jobs", json={**base, "options": options})
        assert response.status_code == 422, response.text
        assert f"options.{field}" in response.json()["detail"]
    unknown = client.post("/v1/jobs", json={**base, "kind": "prune"})
    assert unknown.status_code == 422
    assert "kind" in unknown.text


def test_metrics_of_an_unfinished_or_foreign_job(client: httpx.Client) -> None:
    assert client.get("/v1/jobs/j_0123456789abcdefgh/metrics").status_code == 404


@pytest.mark.slow
def test_submit_kind_drift_gates_a_pipeline(live_stack: Stack, digits_case, digits_files, tmp_path):
    clean = tmp_path / "clean.npz"
    np.savez(clean, inputs=digits_case.calibration[0])

    def submit(data: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "recalib.cli", "submit", str(digits_files["model"]),
               "--calib", str(data), "--server", live_stack.url, *extra]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)

    drifted = submit(digits_files["calibration"], "--kind", "drift", "--fail-if-drifted",
                     "--download", str(tmp_path / "out"))  # fmt: skip
    assert drifted.returncode == EXIT_DRIFTED, drifted.stderr
    assert "recalibrate" in drifted.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["digits.report.json"]
    calm = submit(clean, "--kind", "drift", "--fail-if-drifted")
    assert calm.returncode == EXIT_OK, calm.stderr
    assert "no recalibration needed" in calm.stdout
    misuse = submit(clean, "--fail-if-drifted")
    assert misuse.returncode == EXIT_USER_ERROR
    assert "--kind drift" in misuse.stderr
