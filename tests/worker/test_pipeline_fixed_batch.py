""".pt2 programs exported with fixed sizes through worker.pipeline.run_job: a fixed batch size is
honoured (evaluation pads, calibration drops the remainder); other fixed sizes are user errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from recalib.contract import JobOptions, JobSpec
from recalib.errors import InvalidDataError, InvalidModelError
from worker.digits import accuracy
from worker.engine import recalibrate
from worker.formats.data import open_samples
from worker.pipeline import run_job
from worker.splits import plan_data


def _spec(model: Path, calibration: Path, evaluation: Path, out_dir: Path) -> JobSpec:
    return JobSpec(
        model_path=str(model),
        calibration_path=str(calibration),
        eval_path=str(evaluation),
        out_dir=str(out_dir),
        options=JobOptions(),
    )


def _export_fixed(model: torch.nn.Module, batch: int, path: Path) -> Path:
    """Exported without dynamic_shapes: every dimension, the batch too, is fixed."""
    example = torch.zeros(batch, 1, 8, 8)
    torch.export.save(torch.export.export(copy.deepcopy(model).eval(), (example,)), path)
    return path


@pytest.mark.parametrize("batch", [2, 5])
def test_fixed_batch_program_is_evaluated_and_calibrated_in_that_batch_size(
    digits_case, digits_files, tmp_path, batch
) -> None:
    model_path = _export_fixed(digits_case.model, batch, tmp_path / f"fixed{batch}.pt2")
    inputs, labels = digits_case.shifted_evaluation
    inputs, labels = inputs[:358], labels[:358]  # not a multiple of 5 or 2·… : a padded tail
    np.savez(tmp_path / "eval.npz", inputs=inputs, labels=labels)
    spec = _spec(model_path, digits_files["calibration"], tmp_path / "eval.npz", tmp_path / "out")
    report = run_job(spec)

    assert report.before.samples == report.after.samples == 358
    assert report.before.top1 == pytest.approx(accuracy(digits_case.model, inputs, labels))
    used = 359 // batch * batch  # 359 calibration samples: the short remainder is dropped
    assert report.calibration.available_samples == 359
    assert (report.calibration.samples, report.calibration.batches) == (used, used // batch)

    # The same recalibration, done eagerly on the same samples in the same order.
    plan = plan_data(
        open_samples(digits_files["calibration"]), open_samples(tmp_path / "eval.npz"), spec.options
    )
    x = plan.calibration.get_batch(plan.calibration_indices)[0][:used]
    reference = copy.deepcopy(digits_case.model)
    recalibrate(reference, x.split(batch))
    saved = torch.export.load(tmp_path / "out" / report.checkpoint.file).state_dict
    for key, value in reference.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(saved[key], value, rtol=1e-6, atol=1e-6, msg=key)
    assert report.after.top1 == pytest.approx(accuracy(reference, inputs, labels))
    assert report.after.top1 > report.before.top1


def test_program_fixed_to_one_sample_fails_naming_the_layer(
    digits_case, digits_files, tmp_path
) -> None:
    model_path = _export_fixed(digits_case.model, 1, tmp_path / "single.pt2")
    spec = _spec(
        model_path, digits_files["calibration"], digits_files["evaluation"], tmp_path / "out"
    )
    with pytest.raises(InvalidModelError, match=r"head\.1.*dynamic batch"):
        run_job(spec)


def test_fixed_spatial_size_mismatch_names_the_dimension(digits_case, tmp_path) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(
        copy.deepcopy(digits_case.model).eval(),
        (torch.zeros(4, 1, 8, 8),),
        dynamic_shapes=({0: batch},),
    )
    torch.export.save(program, tmp_path / "digits8.pt2")
    inputs, labels = digits_case.shifted_calibration
    big = inputs.repeat(2, axis=2).repeat(2, axis=3)  # 16×16: the model itself would run on it
    np.savez(tmp_path / "big.npz", inputs=big, labels=labels)
    np.savez(tmp_path / "small.npz", inputs=inputs, labels=labels)
    model = tmp_path / "digits8.pt2"
    for calibration, evaluation in (("big", "small"), ("small", "big")):
        spec = _spec(
            model,
            tmp_path / f"{calibration}.npz",
            tmp_path / f"{evaluation}.npz",
            tmp_path / "out",
        )
        with pytest.raises(InvalidDataError, match=r"dimension 2 .*8.*16") as info:
            run_job(spec)
        assert info.value.file == str(tmp_path / "big.npz")
