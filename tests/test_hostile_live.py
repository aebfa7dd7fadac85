"""Defects found probing the live service, end to end: the API process, a real ``recalib worker``,
the real Valkey and the digits case.

- a job record that does not parse (written straight into Redis) is skipped by the worker, which
  lives on and runs the next job;
- a run that cannot write its outputs fails as ``service-unavailable`` naming the directory,
  even when the library that failed (torch) hid the OSError in a RuntimeError;
- uploads are deduplicated by content only when the name matches too: the job uses the
  filename given for it (the format is read from the extension, the download is named after it);
- ``HEAD`` on an artifact answers the ``GET``'s headers without the body.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from rq.job import Job

from recalib import layout
from recalib.client import RecalibClient
from recalib.jobs import queue
from recalib.keys import ACTIVE_KEY, events_key, job_index_key, job_key
from recalib.settings import Settings
from tests.live import (
    REPO_ROOT,
    Stack,
    create_job,
    job_body,
    wait_for_job,
    wait_until,
)
from tests.unwritable import unwritable

pytestmark = pytest.mark.slow
FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def client(live_stack: Stack):
    with live_stack.client() as client:
        yield client


def test_a_worker_skips_an_unreadable_job_and_runs_the_next(
    client: httpx.Client, live_stack: Stack, digits_ids
) -> None:
    worker = live_stack.workers["w1"]
    good = create_job(client, job_body(digits_ids))  # a readable record, then damaged in Redis
    raw = json.loads(live_stack.conn.hget(job_key(good["id"]), "record"))
    raw["request"]["options"]["prior_strength"] = None  # as 1e999 used to be stored
    bad_id = "j_" + "X" * 22
    rq_id = f"{bad_id}_r00000000"
    conn = live_stack.conn
    conn.hset(job_key(bad_id), mapping={"record": json.dumps(raw | {"id": bad_id}), "rq": rq_id})
    conn.rpush(events_key(bad_id), b"{not an event")
    conn.zadd(job_index_key("default"), {f"{10**11:012d}:{bad_id}": 0})
    conn.sadd(ACTIVE_KEY, bad_id)
    settings = Settings(redis_url=live_stack.redis_url, data_dir=live_stack.data_dir)
    queue.enqueue_run(conn, settings, bad_id, rq_id)  # the worker takes it after `good`

    after = create_job(client, job_body(digits_ids, seed=1))
    for job in (good, after):
        done = wait_for_job(client, job["id"], FINAL, timeout_s=120)
        assert done["status"] == "succeeded", done["error"]
    assert worker.alive()
    rq_run = Job.fetch(rq_id, connection=conn)
    assert rq_run.get_status() == "finished"  # taken, not started, and the horse exited cleanly
    assert client.get(f"/v1/jobs/{bad_id}").status_code == 409
    assert client.get("/v1/jobs").status_code == 200
    assert "not started" in worker.log()


def test_a_run_that_cannot_write_its_outputs_fails_service_unavailable(
    client: httpx.Client, live_stack: Stack, digits_ids, longer_calibration_id
) -> None:
    ids = digits_ids | {"calibration": longer_calibration_id}
    job = create_job(client, job_body(ids, batch_size=4))
    wait_until(
        lambda: client.get(f"/v1/jobs/{job['id']}").json()["progress"]["phase"] == "recalibrating",
        60,
        "the job to recalibrate",
        every_s=0.05,
    )
    attempt_dir = layout.attempt_dir(live_stack.data_dir, job["id"], 1)
    with unwritable(attempt_dir):  # torch.export.save fails with a RuntimeError (EPERM inside)
        done = wait_for_job(client, job["id"], FINAL, timeout_s=120)
    shutil.rmtree(attempt_dir, ignore_errors=True)
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "service-unavailable", done["error"]
    assert str(attempt_dir) in done["error"]["message"]
    assert "RECALIB_DATA_DIR" in done["error"]["message"]
    assert live_stack.workers["w1"].alive()


def submit(*args: str | Path, server: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "recalib.cli", "submit", *map(str, args), "--server", server]
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=180, check=False
    )


def test_submit_uses_the_filename_given_for_this_job(
    live_stack: Stack, digits_files, tmp_path: Path
) -> None:
    model_bytes = digits_files["model"].read_bytes()
    misnamed = tmp_path / "data.npz"
    misnamed.write_bytes(model_bytes)  # the same bytes, uploaded earlier under another name
    with RecalibClient(live_stack.url) as api:
        earlier = api.upload_file(misnamed)
        assert earlier.filename == "data.npz"
        again = api.upload_file(misnamed)
        assert again.id == earlier.id  # same name and content: reused
    model = tmp_path / "model.pt2"
    model.write_bytes(model_bytes)
    out = tmp_path / "dl"
    result = submit(
        model, "--calib", digits_files["calibration"], "--download", out, server=live_stack.url
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "model.recalibrated.pt2",
        "model.report.json",
    ]


def test_head_on_an_artifact_answers_the_get_headers_without_a_body(
    client: httpx.Client, digits_ids
) -> None:
    job = create_job(client, job_body(digits_ids, fold=True))
    assert wait_for_job(client, job["id"], FINAL, 120)["status"] == "succeeded"
    for which in ("checkpoint", "report", "folded"):
        url = f"/v1/jobs/{job['id']}/{which}"
        got, head = client.get(url), client.head(url)
        assert head.status_code == 200, (which, head.status_code)
        assert head.content == b""
        for name in ("etag", "content-length", "content-type", "content-disposition"):
            assert head.headers[name] == got.headers[name], (which, name)
        assert int(head.headers["content-length"]) == len(got.content)
        ranged = client.head(url, headers={"Range": "bytes=0-9"})
        assert ranged.status_code == 206 and ranged.content == b""
    queued = create_job(client, job_body(digits_ids, seed=7))
    client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert client.head(f"/v1/jobs/{queued['id']}/checkpoint").status_code == 409
