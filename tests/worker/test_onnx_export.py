"""options.export = ["onnx"]: a job on a .pt2, TorchScript or state_dict model also writes
``<stem>.recalibrated.onnx``, whose ONNX Runtime outputs equal the recalibrated torch model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from recalib import defaults
from recalib.contract import JobOptions, JobSpec
from recalib.errors import InvalidOptionError
from tests.worker.test_onnx_recalibrate import assert_logits_equal, run_onnx
from worker.formats.models import read_model
from worker.pipeline import run_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def torch_models(digits_case, digits_files, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("export")
    model = digits_case.model.eval()
    torch.jit.save(torch.jit.script(model), str(out / "scripted.pt"))
    torch.save(model.state_dict(), out / "weights.pt")
    return {
        "pt2": {"model": digits_files["model"]},
        "torchscript": {"model": out / "scripted.pt"},
        "state_dict": {"model": out / "weights.pt", "arch": "worker.digits:DigitsNet"},
    }


@pytest.mark.parametrize("kind", ["pt2", "torchscript", "state_dict"])
def test_export_onnx_equals_the_recalibrated_torch_model(
    torch_models, digits_files, tmp_path, kind
):
    case = torch_models[kind]
    spec = JobSpec(
        model_path=str(case["model"]),
        calibration_path=str(digits_files["calibration"]),
        eval_path=str(digits_files["evaluation"]),
        out_dir=str(tmp_path),
        arch=case.get("arch"),
        arch_allowlist=["worker.digits"],
        options=JobOptions(export=["onnx"]),
    )
    report = run_job(spec)
    (export,) = report.exports
    stem = Path(case["model"]).stem
    assert export.artifact.file == f"{stem}.recalibrated.onnx" and export.artifact.format == "onnx"
    assert export.max_abs_diff <= export.tolerance
    assert export.tolerance >= defaults.ONNX_EXPORT_TOLERANCE  # × max(1, max |logit|)
    proto = onnx.load(tmp_path / export.artifact.file)
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == 3
    # the recalibrated checkpoint, loaded back in torch, against the ONNX on all eval samples
    recalibrated = read_model(
        tmp_path / report.checkpoint.file, arch=case.get("arch"), arch_allowlist=("worker.digits",)
    ).module
    inputs = np.load(digits_files["evaluation"])["inputs"]
    with torch.no_grad():
        want = recalibrated(torch.from_numpy(inputs)).numpy()
    got = run_onnx(proto, {proto.graph.input[0].name: inputs})  # dynamic batch: all of them
    assert_logits_equal(got, want)


def test_export_is_refused_for_an_onnx_model(tmp_path, digits_case, digits_files):
    from tests.worker.onnx_models import export_legacy

    path = export_legacy(
        digits_case.model, (torch.from_numpy(digits_case.calibration[0][:4]),),
        tmp_path / "m.onnx", opset=17,
    )  # fmt: skip
    spec = JobSpec(
        model_path=str(path),
        calibration_path=str(digits_files["calibration"]),
        out_dir=str(tmp_path / "out"),
        options=JobOptions(export=["onnx"]),
    )
    with pytest.raises(InvalidOptionError, match="ONNX already"):
        run_job(spec)


def test_an_export_beyond_the_tolerance_fails_and_leaves_no_file(digits_case, tmp_path):
    from recalib.errors import InvalidModelError
    from worker.onnx.export import export_onnx

    example = torch.from_numpy(digits_case.shifted_evaluation[0][:8])
    out = tmp_path / "digits.recalibrated.onnx"
    report = export_onnx(digits_case.model, example, out)
    assert report.max_abs_diff <= report.tolerance and out.is_file()
    with pytest.raises(InvalidModelError, match=r"differs from it by .* on an evaluation batch"):
        export_onnx(digits_case.model, example, out, tolerance=-1.0)  # no difference is < 0
    assert not out.exists() and not list(tmp_path.glob(".partial-*"))
