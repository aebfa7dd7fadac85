"""worker.splits.plan_data: which samples calibrate and which evaluate, seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recalib.contract import JobOptions
from recalib.errors import InvalidDataError, InvalidOptionError
from worker.formats.data import SampleSet, open_samples
from worker.splits import plan_data


def _samples(tmp_path: Path, n: int, *, labeled: bool, name: str = "data.npz") -> SampleSet:
    arrays = {"inputs": np.zeros((n, 1, 2, 2), dtype=np.float32)}
    if labeled:
        arrays["labels"] = np.arange(n, dtype=np.int64) % 3
    np.savez(tmp_path / name, **arrays)
    return open_samples(tmp_path / name)


def test_holdout_split_is_disjoint_complete_and_seeded(tmp_path) -> None:
    data = _samples(tmp_path, 20, labeled=True)
    plan = plan_data(data, None, JobOptions(holdout=0.3, seed=4))
    assert plan.evaluated_on == "holdout"
    assert plan.labeled
    assert plan.eval_set is data
    assert len(plan.eval_indices) == 6
    assert plan.available_samples == len(plan.calibration_indices) == 14
    assert sorted(plan.eval_indices + plan.calibration_indices) == list(range(20))
    assert plan_data(data, None, JobOptions(holdout=0.3, seed=4)) == plan
    assert plan_data(data, None, JobOptions(holdout=0.3, seed=5)).eval_indices != plan.eval_indices


def test_default_holdout_and_max_samples(tmp_path) -> None:
    plan = plan_data(_samples(tmp_path, 20, labeled=True), None, JobOptions(max_samples=4))
    assert plan.holdout_fraction == 0.5
    assert len(plan.eval_indices) == 10
    assert plan.available_samples == 10
    assert len(plan.calibration_indices) == 4
    assert not set(plan.calibration_indices) & set(plan.eval_indices)


def test_eval_file_keeps_all_calibration_in_seeded_order(tmp_path) -> None:
    calibration = _samples(tmp_path, 12, labeled=True)
    eval_set = _samples(tmp_path, 5, labeled=False, name="eval.npz")
    plan = plan_data(calibration, eval_set, JobOptions(seed=1))
    assert plan.evaluated_on == "eval_file"
    assert plan.eval_set is eval_set
    assert not plan.labeled  # the eval file decides
    assert plan.eval_indices == list(range(5))
    assert sorted(plan.calibration_indices) == list(range(12))
    assert plan.calibration_indices != list(range(12))  # shuffled by the seed
    with pytest.raises(InvalidOptionError, match="eval file") as info:
        plan_data(calibration, eval_set, JobOptions(holdout=0.2))
    assert info.value.field == "options.holdout"


def test_unlabeled_calibration_evaluates_on_itself(tmp_path) -> None:
    data = _samples(tmp_path, 9, labeled=False)
    plan = plan_data(data, None, JobOptions(max_samples=5))
    assert plan.evaluated_on == "calibration"
    assert not plan.labeled
    assert plan.eval_indices == sorted(plan.calibration_indices)
    assert len(plan.eval_indices) == 5
    with pytest.raises(InvalidOptionError, match="no labels"):
        plan_data(data, None, JobOptions(holdout=0.5))


def test_too_little_data_to_hold_out(tmp_path) -> None:
    with pytest.raises(InvalidDataError, match="leaves 2 to evaluate and 1 to calibrate"):
        plan_data(_samples(tmp_path, 3, labeled=True), None, JobOptions(holdout=0.6))
