"""``prior_strength: "auto"`` (an N per layer chosen from the data) and the convergence report,
on the digits case: the demo's shifted digits (a real shift) and held-out clean digits (none)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from recalib.contract import JobOptions, JobSpec
from recalib.errors import InvalidOptionError
from worker.digits import accuracy
from worker.engine import recalibrate
from worker.engine.estimators import MAX_PRIOR_STRENGTH
from worker.pipeline import run_job


def _calibrate(model, data: torch.Tensor, batch: int, prior: float | str = "auto"):
    batches = data.split(batch)
    adapted = copy.deepcopy(model)
    result = recalibrate(adapted, batches, prior_strength=prior, total_batches=len(batches))
    return adapted, result


def test_auto_adapts_fully_to_a_real_shift_and_keeps_the_source_without_one(digits_case) -> None:
    shifted = torch.from_numpy(digits_case.shifted_calibration[0])
    clean = torch.from_numpy(digits_case.calibration[0])
    _, on_shift = _calibrate(digits_case.model, shifted, 16)
    assert on_shift.prior is not None and on_shift.prior.chosen_by == "auto"
    assert set(on_shift.prior.per_layer) == {"features.1", "features.4", "head.1"}
    # a real shift: N ≪ n, so the target statistics get nearly all the weight
    assert max(on_shift.prior.per_layer.values()) < 0.01 * on_shift.samples
    _, on_clean = _calibrate(digits_case.model, clean, 16)
    # no shift: the data can barely tell target from source; N ≳ n keeps much of the source
    assert min(on_clean.prior.per_layer.values()) > 0.5 * on_clean.samples


def test_auto_with_few_samples_beats_full_adaptation_on_clean_data(digits_case) -> None:
    """Eight clean samples: full adaptation replaces good statistics by noisy ones."""
    clean = torch.from_numpy(digits_case.calibration[0][:8])
    eval_x, eval_y = digits_case.evaluation
    full, _ = _calibrate(digits_case.model, clean, 4, prior=0.0)
    auto, _ = _calibrate(digits_case.model, clean, 4)
    assert accuracy(auto, eval_x, eval_y) > accuracy(full, eval_x, eval_y)


def test_auto_converges_to_full_adaptation_with_many_samples(digits_case) -> None:
    shifted = torch.from_numpy(digits_case.shifted_calibration[0])
    full, _ = _calibrate(digits_case.model, shifted, 16, prior=0.0)
    auto, _ = _calibrate(digits_case.model, shifted, 16)
    for name, buffer in full.state_dict().items():
        if name.endswith("running_mean"):
            diff = (auto.state_dict()[name] - buffer).abs().max()
            var = full.state_dict()[name.replace("mean", "var")]
            assert float(diff / var.sqrt().max()) < 0.01, name


def test_convergence_shrinks_with_more_samples(digits_case) -> None:
    shifted = torch.from_numpy(digits_case.shifted_calibration[0])
    _, few = _calibrate(digits_case.model, shifted[:32], 4, prior=0.0)
    _, many = _calibrate(digits_case.model, shifted, 4, prior=0.0)
    assert few.convergence is not None and many.convergence is not None
    assert few.convergence.samples_at_three_quarters == 24
    assert many.convergence.samples_at_three_quarters == 268  # 67 of 90 batches of 4 (last: 3)
    assert many.convergence.last_quarter_change < few.convergence.last_quarter_change
    assert set(many.convergence.per_layer) == {"features.1", "features.4", "head.1"}
    _, three_batches = _calibrate(digits_case.model, shifted[:12], 4, prior=0.0)
    assert three_batches.convergence is None  # under 4 batches: nothing to compare


def test_a_fixed_prior_is_reported_as_fixed_and_bad_values_are_refused(digits_case) -> None:
    shifted = torch.from_numpy(digits_case.shifted_calibration[0][:64])
    _, fixed = _calibrate(digits_case.model, shifted, 16, prior=16.0)
    assert fixed.prior is not None
    assert (fixed.prior.chosen_by, fixed.prior.strength, fixed.prior.per_layer) == (
        "fixed",
        16.0,
        None,
    )
    with pytest.raises(InvalidOptionError, match="prior_strength"):
        _calibrate(digits_case.model, shifted, 16, prior="often")
    assert JobOptions.model_validate({"prior_strength": "auto"}).prior_strength == "auto"
    assert JobOptions.model_validate({"prior_strength": "16"}).prior_strength == 16.0
    with pytest.raises(ValueError, match="prior_strength"):
        JobOptions.model_validate({"prior_strength": "often"})
    assert MAX_PRIOR_STRENGTH == 1e12  # what a report shows for "keep the source"


def test_the_report_explains_the_prior_and_the_convergence(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    spec = JobSpec(
        model_path=str(digits_files["model"]),
        calibration_path=str(digits_files["calibration"]),
        eval_path=str(digits_files["evaluation"]),
        out_dir=str(tmp_path / "out"),
        options={"prior_strength": "auto", "batch_size": 32},
    )
    report = run_job(spec)
    prior = report.calibration.prior
    assert prior is not None and prior.chosen_by == "auto"
    assert prior.per_layer is not None and len(prior.per_layer) == 3
    assert report.calibration.convergence is not None
    assert report.calibration.convergence.last_quarter_change < 0.1
    assert report.verdict.value == "better"
