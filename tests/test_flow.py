"""End to end through real HTTP: the API process, a real worker process, the digits domain shift.

Upload → job → progress events → checkpoint that loads and carries the new statistics; cancel
queued and running jobs; bad inputs end as failed jobs with clear messages; ``recalib serve``
runs the whole stack from one command and leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from recalib import layout
from tests.bn_oracle import assert_statistics_equal, digits_net, digits_oracle, one_sample
from tests.live import (
    REPO_ROOT,
    Stack,
    create_job,
    free_port,
    job_body,
    upload,
    wait_for_job,
    wait_until,
)
from worker.digits import accuracy

FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def client(live_stack: Stack):
    with live_stack.client() as client:
        yield client


@pytest.mark.slow
def test_digits_job_end_to_end(
    client: httpx.Client,
    live_stack: Stack,
    digits_ids,
    digits_case,
    digits_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    job = create_job(client, job_body(digits_ids))
    done = wait_for_job(client, job["id"], FINAL, timeout_s=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 1
    report = done["result"]
    # What the numbers must equal, computed here: the source model, and an oracle whose BN
    # statistics this test pooled over the job's calibration batches (tests/bn_oracle.py).
    source, oracle, statistics = digits_oracle(
        digits_files["model"], digits_files["calibration"], digits_files["evaluation"]
    )
    eval_inputs, eval_labels = digits_case.shifted_evaluation
    step = one_sample(eval_labels)
    assert report["before"]["top1"] == pytest.approx(
        accuracy(source, eval_inputs, eval_labels), abs=step
    )
    assert report["after"]["top1"] == pytest.approx(
        accuracy(oracle, eval_inputs, eval_labels), abs=step
    )
    events = client.get(f"/v1/jobs/{job['id']}/events").json()
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["status"] for e in events][:2] == ["queued", "running"]
    assert events[-1]["status"] == "succeeded"
    phases = [e["progress"]["phase"] for e in events]
    for phase in ("loading", "evaluating", "recalibrating", "saving", "done"):
        assert phase in phases
    assert phases.index("recalibrating") < phases.index("saving")
    later = client.get(f"/v1/jobs/{job['id']}/events", params={"after": 2}).json()
    assert [e["seq"] for e in later] == [e["seq"] for e in events[2:]]

    checkpoint = client.get(f"/v1/jobs/{job['id']}/checkpoint")
    assert checkpoint.status_code == 200
    path = tmp_path / "recalibrated.pt2"
    path.write_bytes(checkpoint.content)
    model = torch.export.load(path).module()
    assert_statistics_equal(digits_net(path), statistics)  # the new statistics are in it
    assert accuracy(model, eval_inputs, eval_labels) == pytest.approx(report["after"]["top1"])
    old_mean = digits_case.model.features[1].running_mean
    new_mean = dict(model.named_buffers())["features.1.running_mean"]
    assert not torch.allclose(old_mean, new_mean)
    assert client.get(f"/v1/jobs/{job['id']}/report").json()["after"] == report["after"]
    job_dir = layout.job_dir(live_stack.data_dir, job["id"])
    assert sorted(p.name for p in job_dir.iterdir()) == ["attempt-1"]  # served; inputs gone
    assert not (job_dir / "attempt-1" / "inputs").exists()


@pytest.mark.slow
def test_cancel_running_and_queued_jobs(
    client: httpx.Client, live_stack: Stack, digits_ids, long_calibration_id, record_property
) -> None:
    ids = digits_ids | {"calibration": long_calibration_id}
    running = create_job(client, job_body(ids, batch_size=2))
    wait_until(
        lambda: (
            client.get(f"/v1/jobs/{running['id']}").json()["progress"]["phase"] == "recalibrating"
        ),
        60,
        "the long job to recalibrate",
    )
    queued = create_job(client, job_body(ids, batch_size=2, seed=1))  # behind it: one worker
    assert client.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"

    asked_at = time.monotonic()
    cancel = client.post(f"/v1/jobs/{running['id']}/cancel")
    assert cancel.status_code == 202 and cancel.json()["status"] == "cancelling"
    ended = wait_for_job(client, running["id"], FINAL, timeout_s=15)
    took_s = time.monotonic() - asked_at
    record_property("running_cancel_s", round(took_s, 2))
    assert ended["status"] == "cancelled" and ended["error"] is None
    assert took_s < 10, f"cancelling a running job took {took_s:.1f} s"
    assert client.get(f"/v1/jobs/{running['id']}/checkpoint").status_code == 409
    assert not any(layout.job_dir(live_stack.data_dir, running["id"]).glob("attempt-*"))

    time.sleep(1.0)  # the worker is free now: the cancelled queued job must still never run
    never_ran = client.get(f"/v1/jobs/{queued['id']}").json()
    assert never_ran["status"] == "cancelled" and never_ran["attempts"] == 0
    statuses = [e["status"] for e in client.get(f"/v1/jobs/{queued['id']}/events").json()]
    assert statuses == ["queued", "cancelled"]


def _export(module: torch.nn.Module, path: Path) -> Path:
    example = torch.zeros(4, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


def _bad_inputs(tmp: Path, digits_case) -> dict[str, tuple[dict[str, Path], str]]:
    """Each case: files (model, calibration) and a word its error message must contain."""
    x, y = digits_case.shifted_calibration
    corrupt = tmp / "corrupt.pt2"
    corrupt.write_bytes(os.urandom(4096))
    np.savez(tmp / "rgb.npz", inputs=np.repeat(x, 3, axis=1), labels=y)
    np.savez(tmp / "labels.npz", inputs=x, labels=y + 10)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    no_bn = _export(linear, tmp / "no-bn.pt2")
    good_model = tmp / "good.pt2"
    _export(digits_case.model, good_model)
    good_data = tmp / "good.npz"
    np.savez(good_data, inputs=x, labels=y)
    return {
        "corrupt model": ({"model": corrupt, "calibration": good_data}, "corrupt.pt2"),
        "wrong shape": ({"model": good_model, "calibration": tmp / "rgb.npz"}, "rgb.npz"),
        "labels out of range": ({"model": good_model, "calibration": tmp / "labels.npz"}, "label"),
        "no BN": ({"model": no_bn, "calibration": good_data}, "BatchNorm"),
    }  # fmt: skip


@pytest.mark.slow
def test_bad_inputs_fail_with_clear_messages(
    client: httpx.Client, digits_case, tmp_path: Path
) -> None:
    jobs = {}
    for case, (files, _) in _bad_inputs(tmp_path, digits_case).items():
        ids = {role: upload(client, path) for role, path in files.items()}
        jobs[case] = create_job(client, job_body(ids))["id"]
    for case, (_, word) in _bad_inputs(tmp_path, digits_case).items():
        job = wait_for_job(client, jobs[case], FINAL, timeout_s=60)
        assert job["status"] == "failed", case
        assert job["error"]["type"] != "internal-error", (case, job["error"])
        assert word in job["error"]["message"], (case, job["error"])
        assert job["attempts"] == 1, case  # a user error is not retried


def _pids_where(predicate) -> list[int]:
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if predicate(proc):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_serve_runs_the_stack_and_leaves_nothing_behind(tmp_path: Path, digits_files) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "RECALIB_REDIS_URL"}
    env |= {"RECALIB_WORKER_DEVICE": "cpu", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "recalib.cli", "serve", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir)]
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    started: list[int] = []

    def one_worker() -> bool:
        if serve.poll() is not None:
            pytest.fail(f"recalib serve exited: {(tmp_path / 'serve.log').read_text()[-2000:]}")
        try:
            return len(httpx.get(f"{url}/readyz", timeout=2).json()["workers"]) == 1
        except (httpx.TransportError, ValueError):
            return False

    try:
        wait_until(one_worker, 90, "recalib serve to report one worker")
        with httpx.Client(base_url=url, timeout=30) as client:
            ids = {name: upload(client, path) for name, path in digits_files.items()}
            job = wait_for_job(client, create_job(client, job_body(ids))["id"], FINAL, 120)
        assert job["status"] == "succeeded", job["error"]
        assert (data_dir / "valkey" / "appendonlydir").is_dir()
        assert f"http://127.0.0.1:{port}" in (tmp_path / "serve.log").read_text()
        started = _pids_where(lambda p: f"-serve-{serve.pid}-" in (p / "cmdline").read_text())
        started += _pids_where(lambda p: str(data_dir) in os.readlink(p / "cwd"))
        assert len(started) >= 2  # the worker and Valkey
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
        log.close()
    time.sleep(0.5)
    left = [pid for pid in started if Path(f"/proc/{pid}").exists()]
    left = [pid for pid in left if "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]
    assert left == [], f"recalib serve left processes behind: {left}"
