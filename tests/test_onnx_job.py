"""An ONNX model as a job: in-process (worker.pipeline.run_job), through ``recalib run`` (the
sandboxed job process) and through the REST API with a real worker.

The digits CNN is exported by torch's legacy exporter with BN kept; the job's recalibrated
``.onnx`` must give the torch oracle's logits (tests/bn_oracle: torch's own BN kernel on the
job's calibration batches) and differ from the input only in BN running statistics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from recalib.contract import JobOptions, JobSpec
from recalib.errors import InvalidOptionError, NoBatchNormError
from tests.bn_oracle import calibration_order, pooled_bn_statistics, with_statistics
from tests.live import REPO_ROOT, Stack, create_job, upload, wait_for_job
from tests.worker.onnx_models import export_dynamo, export_legacy
from tests.worker.test_onnx_recalibrate import (
    _stored_stats,
    assert_logits_equal,
    assert_only_bn_statistics_changed,
    run_onnx,
)
from worker.pipeline import run_job

FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def onnx_files(digits_case, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("onnx-job")
    example = (torch.from_numpy(digits_case.calibration[0][:4]),)
    files = {"model": export_legacy(digits_case.model, example, out / "digits.onnx", opset=17)}
    for name, (x, y) in {
        "calibration": digits_case.shifted_calibration,
        "evaluation": digits_case.shifted_evaluation,
    }.items():
        files[name] = out / f"{name}.npz"
        np.savez(files[name], inputs=x, labels=y)
    return files


def _oracle_logits(digits_case, files: dict[str, Path]) -> np.ndarray:
    """The oracle's logits on the evaluation inputs, for a job with default options."""
    order = calibration_order(files["calibration"], files["evaluation"])
    inputs = torch.from_numpy(np.load(files["calibration"])["inputs"])
    net = digits_case.model
    statistics = pooled_bn_statistics(net, inputs, order, JobOptions().batch_size)
    with torch.no_grad():
        evaluation = torch.from_numpy(np.load(files["evaluation"])["inputs"])
        return with_statistics(net, statistics)(evaluation).numpy()


def _check_checkpoint(path: Path, files: dict[str, Path], want: np.ndarray) -> None:
    source, done = onnx.load(files["model"]), onnx.load(path)
    assert_only_bn_statistics_changed(source, done, _stored_stats(source))
    evaluation = np.load(files["evaluation"])["inputs"]
    assert_logits_equal(run_onnx(done, {"x": evaluation}), want)


@pytest.mark.slow
def test_an_onnx_job_equals_the_torch_oracle(digits_case, onnx_files, tmp_path):
    spec = JobSpec(
        model_path=str(onnx_files["model"]),
        calibration_path=str(onnx_files["calibration"]),
        eval_path=str(onnx_files["evaluation"]),
        out_dir=str(tmp_path),
        options=JobOptions(),
    )
    report = run_job(spec)
    assert report.model_format == "onnx"
    assert report.checkpoint.file == "digits.recalibrated.onnx"
    assert report.checkpoint.format == "onnx"
    assert [layer.name for layer in report.layers] == [
        "/features/features.1/BatchNormalization",
        "/features/features.4/BatchNormalization",
        "/head/head.1/BatchNormalization",
    ]
    want = _oracle_logits(digits_case, onnx_files)
    labels = np.load(onnx_files["evaluation"])["labels"]
    assert report.after.top1 == pytest.approx(float((want.argmax(1) == labels).mean()), abs=1e-9)
    assert report.after.top1 > report.before.top1 + 0.3
    _check_checkpoint(tmp_path / report.checkpoint.file, onnx_files, want)


@pytest.mark.slow
def test_label_free_onnx_job_measures_the_output_change(onnx_files, tmp_path):
    spec = JobSpec(
        model_path=str(onnx_files["model"]),
        calibration_path=str(onnx_files["calibration"]),
        out_dir=str(tmp_path),
        options=JobOptions(task="none"),
    )
    report = run_job(spec)
    assert report.output_change is not None and report.output_change.relative_l2 > 0.1


def test_fold_on_onnx_writes_a_folded_graph_with_the_same_outputs(onnx_files, tmp_path):
    spec = JobSpec(
        model_path=str(onnx_files["model"]),
        calibration_path=str(onnx_files["calibration"]),
        eval_path=str(onnx_files["evaluation"]),
        out_dir=str(tmp_path),
        options=JobOptions(fold=True),
    )
    report = run_job(spec)
    assert report.folded is not None
    assert report.folded.artifact.file == "digits.folded.onnx"
    assert report.folded.folded == report.bn_layers and report.folded.not_folded == []
    folded = onnx.load(tmp_path / "digits.folded.onnx")
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    recalibrated = onnx.load(tmp_path / report.checkpoint.file)
    x = np.load(onnx_files["evaluation"])["inputs"]
    want = run_onnx(recalibrated, {"x": x})
    assert_logits_equal(run_onnx(folded, {"x": x}), want)
    assert report.folded.max_abs_diff <= 1e-4 * float(np.abs(want).max())
    assert report.device == "cpu, ONNX Runtime CPUExecutionProvider"


@pytest.mark.slow
def test_a_folded_onnx_job_fails_with_no_batchnorm_and_the_advice(
    digits_case, onnx_files, tmp_path
):
    example = (torch.from_numpy(digits_case.calibration[0][:4]),)
    folded = export_dynamo(digits_case.model, example, tmp_path / "folded.onnx", optimize=True)
    spec = JobSpec(
        model_path=str(folded),
        calibration_path=str(onnx_files["calibration"]),
        out_dir=str(tmp_path / "out"),
        options=JobOptions(),
    )
    with pytest.raises(NoBatchNormError, match="optimize=False"):
        run_job(spec)


def _cli(files: dict[str, Path], out: Path) -> dict:
    cmd = [sys.executable, "-m", "recalib.cli", "run", str(files["model"]),
           "--calib", str(files["calibration"]), "--eval", str(files["evaluation"]),
           "--out", str(out), "--json", "--device", "cpu"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture(scope="module")
def stack(live_redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    with Stack(live_redis_url, tmp_path_factory.mktemp("onnx-stack")) as stack:
        stack.start_api()
        stack.start_worker("w1")
        yield stack


@pytest.mark.slow
def test_recalib_run_and_the_rest_api_run_an_onnx_job_sandboxed(
    digits_case, onnx_files, stack, tmp_path
):
    want = _oracle_logits(digits_case, onnx_files)
    cli = _cli(onnx_files, tmp_path / "cli")
    assert cli["sandbox"]["level"] == "strict" and cli["model_format"] == "onnx"
    _check_checkpoint(tmp_path / "cli" / cli["checkpoint"]["file"], onnx_files, want)
    with stack.client() as client:
        body = {
            "model_file": upload(client, onnx_files["model"]),
            "calibration_file": upload(client, onnx_files["calibration"]),
            "eval_file": upload(client, onnx_files["evaluation"]),
            "options": {"device": "cpu"},
        }
        done = wait_for_job(client, create_job(client, body)["id"], FINAL, timeout_s=180)
        assert done["status"] == "succeeded", done["error"]
        checkpoint = client.get(f"/v1/jobs/{done['id']}/checkpoint")
        assert checkpoint.status_code == 200
    service = done["result"]
    assert service["sandbox"]["level"] == "strict" and service["model_format"] == "onnx"
    path = tmp_path / service["checkpoint"]["file"]
    path.write_bytes(checkpoint.content)
    _check_checkpoint(path, onnx_files, want)
    for phase in ("before", "after"):
        for metric, value in cli[phase].items():
            if isinstance(value, float):
                assert service[phase][metric] == pytest.approx(value, abs=1e-6), (phase, metric)


@pytest.mark.slow
def test_an_onnx_export_is_an_artifact_of_the_rest_api(digits_files, stack, tmp_path):
    """A .pt2 job with options.export=["onnx"]: GET /v1/jobs/{id}/onnx serves the export."""
    with stack.client() as client:
        body = {
            "model_file": upload(client, digits_files["model"]),
            "calibration_file": upload(client, digits_files["calibration"]),
            "eval_file": upload(client, digits_files["evaluation"]),
            "options": {"device": "cpu", "export": ["onnx"]},
        }
        done = wait_for_job(client, create_job(client, body)["id"], FINAL, timeout_s=180)
        assert done["status"] == "succeeded", done["error"]
        (export,) = done["result"]["exports"]
        response = client.get(f"/v1/jobs/{done['id']}/onnx")
        assert response.status_code == 200
        assert "digits.recalibrated.onnx" in response.headers["content-disposition"]
        assert response.headers["etag"].strip('"') == export["artifact"]["sha256"]
        plain = wait_for_job(
            client, create_job(client, {**body, "options": {"device": "cpu"}})["id"], FINAL,
            timeout_s=180,
        )  # fmt: skip
        missing = client.get(f"/v1/jobs/{plain['id']}/onnx")
        assert missing.status_code == 404 and "options.export" in missing.json()["detail"]
    model = onnx.load_from_string(response.content)
    evaluation = np.load(digits_files["evaluation"])["inputs"]
    assert run_onnx(model, {model.graph.input[0].name: evaluation}).shape == (len(evaluation), 10)


def test_a_drift_check_on_an_onnx_model_is_refused_clearly(onnx_files, tmp_path):
    spec = JobSpec(
        kind="drift",
        model_path=str(onnx_files["model"]),
        calibration_path=str(onnx_files["calibration"]),
        out_dir=str(tmp_path),
    )
    with pytest.raises(InvalidOptionError, match=r"drift check .*ONNX"):
        run_job(spec)
