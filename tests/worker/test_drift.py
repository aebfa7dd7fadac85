"""The drift check: the divergence itself, the engine function on the digits case, the job.

Clean digits (held out from training) against the demo's shifted digits: the check must tell them
apart at the default threshold, change nothing in the model, and write a report without a model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from recalib import defaults
from recalib.contract import JobSpec
from recalib.errors import InvalidModelError, NoBatchNormError
from worker.engine.drift import measure_drift, symmetric_kl
from worker.pipeline import run_job


def _reference_jeffreys(mean_a, var_a, mean_b, var_b) -> torch.Tensor:
    a, b = Normal(mean_a, var_a.sqrt()), Normal(mean_b, var_b.sqrt())
    return 0.5 * (kl_divergence(a, b) + kl_divergence(b, a))


def test_symmetric_kl_is_torchs_kl_both_ways_and_scale_free() -> None:
    generator = torch.Generator().manual_seed(0)
    mean_a, mean_b = torch.randn(50, generator=generator), torch.randn(50, generator=generator)
    var_a = torch.rand(50, generator=generator) + 0.1
    var_b = torch.rand(50, generator=generator) + 0.1
    ours = symmetric_kl(mean_a, var_a, mean_b, var_b)
    torch.testing.assert_close(ours, _reference_jeffreys(mean_a, var_a, mean_b, var_b))
    torch.testing.assert_close(ours, symmetric_kl(mean_b, var_b, mean_a, var_a))
    scale = 37.0  # a channel in other units: means ×s, variances ×s²
    scaled = symmetric_kl(scale * mean_a, scale**2 * var_a, scale * mean_b, scale**2 * var_b)
    torch.testing.assert_close(scaled, ours)
    assert float(symmetric_kl(mean_a, var_a, mean_a, var_a).abs().max()) == 0.0


def _clean(digits_case) -> torch.Tensor:
    return torch.from_numpy(digits_case.calibration[0])


def _shifted(digits_case) -> torch.Tensor:
    return torch.from_numpy(digits_case.shifted_calibration[0])


def test_clean_and_shifted_digits_fall_on_either_side_of_the_threshold(digits_case) -> None:
    model = digits_case.model
    clean = measure_drift(model, _clean(digits_case).split(64))
    shifted = measure_drift(model, _shifted(digits_case).split(64))
    assert clean.samples == shifted.samples == len(digits_case.calibration[0])
    assert clean.score < defaults.DRIFT_THRESHOLD / 10  # measured 0.0005
    assert shifted.score > defaults.DRIFT_THRESHOLD * 10  # measured 2.8
    assert [layer.name for layer in shifted.layers] == ["features.1", "features.4", "head.1"]
    assert all(layer.score > defaults.DRIFT_THRESHOLD for layer in shifted.layers)
    assert shifted.most_moved(1)[0].score == max(layer.score for layer in shifted.layers)


def test_sixteen_clean_samples_stay_under_the_threshold_and_noise_is_subtracted(
    digits_case,
) -> None:
    result = measure_drift(digits_case.model, _clean(digits_case)[:16].split(8))
    assert result.samples == 16
    noise = sum(layer.noise for layer in result.layers) / len(result.layers)
    assert noise > 0.0
    assert result.score < defaults.DRIFT_THRESHOLD
    assert measure_drift(digits_case.model, _shifted(digits_case)[:16].split(8)).score > 1.0


def test_nothing_of_the_model_changes(digits_case) -> None:
    model = copy.deepcopy(digits_case.model)
    model.train()
    model.features[1].eval()  # a mixed state must come back exactly as it was
    flags = {name: module.training for name, module in model.named_modules()}
    state = {key: value.clone() for key, value in model.state_dict().items()}
    measure_drift(model, _shifted(digits_case).split(64))
    assert {name: module.training for name, module in model.named_modules()} == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not any(module._forward_pre_hooks for module in model.modules())


def test_the_pass_runs_in_eval_mode(digits_case) -> None:
    """In train mode BN would normalize with batch statistics and the deeper layers would see
    other inputs; the drift pass must see what inference sees."""
    model = copy.deepcopy(digits_case.model)
    seen: list[bool] = []
    model.features[1].register_forward_pre_hook(lambda module, args: seen.append(module.training))
    model.train()
    measure_drift(model, _shifted(digits_case).split(64))
    assert seen and not any(seen)


def test_torchscript_and_models_without_bn_are_refused(digits_case) -> None:
    scripted = torch.jit.script(copy.deepcopy(digits_case.model))
    with pytest.raises(InvalidModelError, match="TorchScript"):
        measure_drift(scripted, _clean(digits_case).split(64))
    with pytest.raises(NoBatchNormError):
        measure_drift(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), _clean(digits_case).split(64))


def test_drift_job_writes_a_report_with_drift_and_no_model(
    digits_case, digits_files: dict[str, Path], tmp_path: Path
) -> None:
    clean_path = tmp_path / "clean.npz"
    np.savez(clean_path, inputs=digits_case.calibration[0], labels=digits_case.calibration[1])
    found = {}
    for name, data in (("clean", clean_path), ("shifted", digits_files["calibration"])):
        out_dir = tmp_path / name
        spec = JobSpec(
            kind="drift",
            model_path=str(digits_files["model"]),
            calibration_path=str(data),
            eval_path=str(digits_files["evaluation"]),  # ignored by a drift check
            out_dir=str(out_dir),
            options={"eval_batch_size": 100},
        )
        report = run_job(spec)
        assert sorted(path.name for path in out_dir.iterdir()) == ["report.html", "report.json"]
        stored = json.loads((out_dir / "report.json").read_text())
        assert stored["kind"] == "drift"
        assert stored["checkpoint"] is None
        assert stored["before"] is None and stored["after"] is None
        assert report.drift is not None
        assert report.drift.samples == report.calibration.samples == 359  # every sample, no split
        assert report.calibration.batches == 4
        assert report.drift.threshold == defaults.DRIFT_THRESHOLD
        assert report.drift.reliable
        assert len(report.drift.layers) == report.bn_layers == 3
        assert report.drift.most_moved[0] == max(report.drift.layers, key=lambda x: x.score).name
        html = (out_dir / "report.html").read_text()
        assert 'id="drift-layers"' in html
        found[name] = report.drift
    assert not found["clean"].recommend_recalibration
    assert found["shifted"].recommend_recalibration
    assert found["clean"].score < defaults.DRIFT_THRESHOLD < found["shifted"].score


def test_drift_job_honours_max_samples_and_the_threshold_option(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    spec = JobSpec(
        kind="drift",
        model_path=str(digits_files["model"]),
        calibration_path=str(digits_files["calibration"]),
        out_dir=str(tmp_path / "out"),
        options={"max_samples": 12, "drift_threshold": 1000.0, "seed": 4},
    )
    report = run_job(spec)
    assert report.drift is not None
    assert report.drift.samples == 12
    assert not report.drift.reliable  # under DRIFT_MIN_SAMPLES
    assert report.drift.threshold == 1000.0
    assert not report.drift.recommend_recalibration  # 2.x is far under 1000
    assert report.data.calibration_indices is not None
    assert len(report.data.calibration_indices) == 12


def test_a_drift_spec_refuses_fold_and_register(digits_files: dict[str, Path]) -> None:
    base = {
        "kind": "drift",
        "model_path": str(digits_files["model"]),
        "calibration_path": str(digits_files["calibration"]),
        "out_dir": "x",
    }
    with pytest.raises(ValueError, match=r"options\.fold"):
        JobSpec.model_validate({**base, "options": {"fold": True}})
    with pytest.raises(ValueError, match=r"options\.register"):
        JobSpec.model_validate({**base, "options": {"register": "digits"}})
