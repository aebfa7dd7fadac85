"""The labeled verdict end to end on a real digits model and a mild shift (+12 points of top-1
after recalibration): ``better`` with p < 0.01 on the 360-sample eval set, ``inconclusive`` on 20
of its samples; through the worker's pipeline, ``recalib run --require better``, and the REST API
with a real worker and the job's web page."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from recalib.contract import JobSpec, Report, Verdict
from recalib.errors import EXIT_OK, EXIT_WORSE
from tests.live import REPO_ROOT, Stack, create_job, job_body, upload, wait_for_job, with_db
from worker.pipeline import run_job

pytestmark = pytest.mark.slow

TINY_SAMPLES = 20


def _mild_shift(inputs: np.ndarray, seed: int) -> np.ndarray:
    """Contrast ×0.8, brightness +0.1, noise σ 0.05: the source model keeps most of its top-1."""
    noise = np.random.default_rng(seed).normal(0.0, 0.05, inputs.shape)
    return (0.8 * inputs + 0.1 + noise).astype(np.float32)


@pytest.fixture(scope="module")
def mild_files(digits_case, digits_files, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("mild")
    x_cal, y_cal = digits_case.calibration
    x_eval, y_eval = digits_case.evaluation
    files = {"model": digits_files["model"]}
    for name, (x, y) in {
        "calibration": (_mild_shift(x_cal, 1), y_cal),
        "evaluation": (_mild_shift(x_eval, 2), y_eval),
        "tiny": (_mild_shift(x_eval, 2)[:TINY_SAMPLES], y_eval[:TINY_SAMPLES]),
    }.items():
        files[name] = out / f"mild-{name}.npz"
        np.savez(files[name], inputs=x, labels=y)
    return files


def _run(files: dict[str, Path], eval_name: str, out_dir: Path) -> Report:
    spec = JobSpec(
        model_path=str(files["model"]),
        calibration_path=str(files["calibration"]),
        eval_path=str(files[eval_name]),
        out_dir=str(out_dir),
    )
    return run_job(spec)


def test_large_eval_set_is_better_with_p_below_one_percent(mild_files, tmp_path) -> None:
    report = _run(mild_files, "evaluation", tmp_path)
    significance = report.significance
    assert report.verdict is Verdict.better and report.verdict_basis == "labels"
    assert significance is not None and significance.test == "mcnemar_exact"
    assert significance.p_value < 0.01 and significance.samples == 360
    assert report.after.top1 - report.before.top1 == pytest.approx(significance.difference)
    assert significance.difference_interval.low > 0
    for metrics in (report.before, report.after):
        interval = metrics.top1_interval
        assert interval is not None and interval.low < metrics.top1 < interval.high
    html = (tmp_path / "report.html").read_text()
    assert "exact McNemar" in html and 'class="verdict better"' in html


def test_tiny_eval_set_is_inconclusive(mild_files, tmp_path) -> None:
    report = _run(mild_files, "tiny", tmp_path)
    significance = report.significance
    assert report.verdict is Verdict.inconclusive
    assert significance is not None and significance.p_value >= significance.alpha
    assert significance.difference > 0  # a real improvement, too few samples to show it
    assert significance.samples_needed is not None and significance.samples_needed > TINY_SAMPLES
    assert "inconclusive" in (tmp_path / "report.html").read_text()


def _cli_run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recalib.cli", "run", *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT,
    )  # fmt: skip


def test_run_require_better_fails_on_inconclusive(mild_files, tmp_path) -> None:
    common = (mild_files["model"], "--calib", mild_files["calibration"])
    tiny = _cli_run(*common, "--eval", mild_files["tiny"], "--out", tmp_path / "t", "--require",
                    "better")  # fmt: skip
    assert tiny.returncode == EXIT_WORSE, tiny.stderr
    assert "verdict: inconclusive" in tiny.stdout
    assert "labeled samples would detect it" in tiny.stdout
    worse_only = _cli_run(*common, "--eval", mild_files["tiny"], "--out", tmp_path / "w",
                          "--fail-if-worse")  # fmt: skip
    assert worse_only.returncode == EXIT_OK, worse_only.stderr
    large = _cli_run(*common, "--eval", mild_files["evaluation"], "--out", tmp_path / "l",
                     "--require", "better")  # fmt: skip
    assert large.returncode == EXIT_OK, large.stderr
    assert "verdict: better" in large.stdout and "exact McNemar" in large.stdout


@pytest.fixture(scope="module")
def service(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    url = with_db(redis_url, 11)
    redis.Redis.from_url(url).flushdb()
    with Stack(url, tmp_path_factory.mktemp("verdict")) as stack:
        stack.start_api()
        stack.start_worker("verdict-w1")
        yield stack


def test_rest_api_reports_the_significance(service: Stack, mild_files) -> None:
    with service.client() as client:
        ids = {name: upload(client, mild_files[name]) for name in ("model", "calibration")}
        jobs = {}
        for name in ("evaluation", "tiny"):
            body = job_body({**ids, "evaluation": upload(client, mild_files[name])})
            jobs[name] = create_job(client, body)["id"]
        done = {name: wait_for_job(client, job, {"succeeded", "failed"}, 120)
                for name, job in jobs.items()}  # fmt: skip
        large, tiny = done["evaluation"]["result"], done["tiny"]["result"]
        assert large["verdict"] == "better" and large["verdict_basis"] == "labels"
        assert large["significance"]["p_value"] < 0.01
        assert set(large["before"]["top1_interval"]) == {"low", "high"}
        assert tiny["verdict"] == "inconclusive"
        assert tiny["significance"]["samples_needed"] > TINY_SAMPLES
        page = client.get(f"/jobs/{jobs['tiny']}")
        assert page.status_code == 200
        assert 'id="job-verdict">inconclusive' in page.text
        assert "labeled samples would detect it" in page.text


def test_rest_api_label_free_verdict_from_a_source_set(
    service: Stack, digits_case, digits_files, tmp_path
) -> None:
    """No target labels: the job's source_eval_file gives the verdict (basis estimate)."""
    source_x, source_y = digits_case.calibration
    np.savez(tmp_path / "source.npz", inputs=source_x, labels=source_y)
    np.savez(tmp_path / "target.npz", inputs=digits_case.shifted_evaluation[0])
    with service.client() as client:
        body = {
            "model_file": upload(client, digits_files["model"]),
            "calibration_file": upload(client, tmp_path / "target.npz"),
            "source_eval_file": upload(client, tmp_path / "source.npz"),
        }
        job = wait_for_job(client, create_job(client, body)["id"], {"succeeded", "failed"}, 120)
        assert job["status"] == "succeeded", job.get("error")
        report = job["result"]
        assert report["verdict"] == "better" and report["verdict_basis"] == "estimate"
        assert report["estimate"]["after"]["reliable"] is True
        assert report["estimate"]["before"]["reliable"] is False
        roles = [source["role"] for source in report["data"]["sources"]]
        assert roles == ["model", "calibration", "source_eval"]
        bad = dict(body, source_eval_file="f_" + "0" * 32)
        refused = client.post("/v1/jobs", json=bad)
        assert refused.status_code == 422 and "source_eval_file" in refused.text


def test_run_source_eval_gives_the_verdict_without_target_labels(
    digits_case, digits_files, tmp_path
) -> None:
    source_x, source_y = digits_case.calibration
    np.savez(tmp_path / "source.npz", inputs=source_x, labels=source_y)
    np.savez(tmp_path / "target.npz", inputs=digits_case.shifted_evaluation[0])
    result = _cli_run(digits_files["model"], "--calib", tmp_path / "target.npz",
                      "--source-eval", tmp_path / "source.npz", "--out", tmp_path / "out",
                      "--require", "better")  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr
    assert "verdict: better" in result.stdout
    assert "label-free estimate (atc-ne+class-bound" in result.stdout
    assert "before unreliable (top-1 ≤" in result.stdout
