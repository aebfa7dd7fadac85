"""``recalib submit`` and RecalibClient end to end: live API + ``recalib worker`` + digits files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from recalib.client import RecalibClient, sha256_of
from recalib.errors import (
    EXIT_INTERNAL,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_USER_ERROR,
    EXIT_WORSE,
    NotFoundError,
)
from tests.bn_oracle import assert_statistics_equal, digits_net, digits_oracle, one_sample
from tests.live import REPO_ROOT, Stack, free_port, with_db
from worker.digits import accuracy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API and one worker (tests/live.py) on a Redis database of this module's own."""
    url = with_db(redis_url, 13)
    redis.Redis.from_url(url).flushdb()
    with Stack(url, tmp_path_factory.mktemp("submit")) as stack:
        stack.start_api()
        stack.start_worker("submit-w1")
        yield stack


def submit(*args: str | Path, server: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "recalib.cli", "submit", *map(str, args), "--server", server]
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=180, check=False
    )


def test_submit_wait_download_verifies_files(service: Stack, digits_files, tmp_path) -> None:
    out = tmp_path / "out"
    result = submit(
        digits_files["model"],
        "--calib", digits_files["calibration"],
        "--eval", digits_files["evaluation"],
        "--fold", "--wait", "--download", out, "--json",
        server=service.url,
    )  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr
    job = json.loads(result.stdout)
    report = job["result"]
    assert job["status"] == "succeeded"
    assert report["verdict"] == "better"
    source, oracle, statistics = digits_oracle(
        digits_files["model"], digits_files["calibration"], digits_files["evaluation"]
    )
    target = np.load(digits_files["evaluation"])
    inputs, labels = target["inputs"], target["labels"]
    one = one_sample(labels)
    assert report["before"]["top1"] == pytest.approx(accuracy(source, inputs, labels), abs=one)
    assert report["after"]["top1"] == pytest.approx(accuracy(oracle, inputs, labels), abs=one)
    checkpoint = out / "digits.recalibrated.pt2"
    assert_statistics_equal(digits_net(checkpoint), statistics)
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == report["checkpoint"]["sha256"]
    folded = out / f"digits.folded{Path(report['folded']['artifact']['file']).suffix}"
    assert sha256_of(folded) == report["folded"]["artifact"]["sha256"]
    assert json.loads((out / "digits.report.json").read_text())["verdict"] == "better"
    assert "sha256 verified" in result.stderr


def test_artifacts_have_etag_range_and_disposition(service: Stack, digits_files) -> None:
    with RecalibClient(service.url) as client:
        ids = [client.upload_file(digits_files[k]).id for k in ("model", "calibration")]
        job = client.wait(client.create_job(*ids).id, poll_s=0.1)
    assert job.status == "succeeded", job.error
    checkpoint = job.result.checkpoint
    url = f"{service.url}/v1/jobs/{job.id}/checkpoint"
    full = httpx.get(url)
    assert full.status_code == 200
    assert full.headers["etag"] == f'"{checkpoint.sha256}"'
    assert full.headers["content-disposition"] == 'attachment; filename="digits.recalibrated.pt2"'
    assert hashlib.sha256(full.content).hexdigest() == checkpoint.sha256
    assert httpx.get(url, headers={"If-None-Match": full.headers["etag"]}).status_code == 304
    part = httpx.get(url, headers={"Range": "bytes=10-109"})
    assert part.status_code == 206
    assert part.content == full.content[10:110]
    assert part.headers["content-range"] == f"bytes 10-109/{len(full.content)}"
    beyond = httpx.get(url, headers={"Range": f"bytes={len(full.content) + 5}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-type"] == "application/problem+json"
    assert beyond.headers["content-range"] == f"bytes */{len(full.content)}"
    stale = httpx.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200  # If-Range mismatch: the whole file
    no_fold = httpx.get(f"{service.url}/v1/jobs/{job.id}/folded")
    assert no_fold.status_code == 404
    assert "fold" in no_fold.json()["detail"]


def test_fail_if_worse_exits_3(service: Stack, digits_case, digits_files, tmp_path) -> None:
    # Calibrate on the shifted domain but judge on the clean source domain: accuracy drops.
    clean = tmp_path / "clean-eval.npz"
    np.savez(clean, inputs=digits_case.evaluation[0], labels=digits_case.evaluation[1])
    common = [digits_files["model"], "--calib", digits_files["calibration"], "--eval", clean]
    common += ["--idempotency-key", "worse-case"]  # the second submit gets the same job back
    worse = submit(*common, "--fail-if-worse", server=service.url)
    assert worse.returncode == EXIT_WORSE, worse.stderr
    assert "verdict worse" in worse.stdout
    tolerated = submit(*common, "--wait", server=service.url)
    assert tolerated.returncode == EXIT_OK, tolerated.stderr
    assert tolerated.stdout == worse.stdout


def test_failed_job_exits_4_with_the_reason(service: Stack, tmp_path, digits_files) -> None:
    bogus = tmp_path / "bogus.pt2"
    bogus.write_bytes(b"this is not a model")
    result = submit(bogus, "--calib", digits_files["calibration"], "--wait", server=service.url)
    assert result.returncode == EXIT_JOB_FAILED, result.stderr
    assert "failed: [invalid-model]" in result.stdout


def test_bad_option_exits_2_naming_it(service: Stack, digits_files) -> None:
    result = submit(
        digits_files["model"], "--calib", digits_files["calibration"], "--batch-size", "0",
        server=service.url,
    )  # fmt: skip
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.startswith("recalib: error: --batch-size: "), result.stderr
    assert "→" not in result.stderr  # refused before any upload


def test_unreachable_server_exits_1_saying_so(digits_files) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = submit(digits_files["model"], "--calib", digits_files["calibration"], server=dead)
    assert result.returncode == EXIT_INTERNAL
    assert "unreachable" in result.stderr
    assert dead in result.stderr


def test_client_reuses_uploads_and_raises_typed_errors(service: Stack, digits_files) -> None:
    with RecalibClient(service.url) as client:
        first = client.upload_file(digits_files["model"])
        again = client.upload_file(digits_files["model"])
        assert again.id == first.id
        assert first.sha256 == sha256_of(digits_files["model"])
        with pytest.raises(NotFoundError):
            client.get_job("j_" + "n" * 22)
