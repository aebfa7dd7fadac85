"""worker.pipeline.run_job end to end on the real digits domain shift (.pt2 model, shifted .npz)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from recalib.contract import JobOptions, JobSpec, Phase, Progress, Report, Verdict
from recalib.errors import (
    InvalidDataError,
    InvalidModelError,
    InvalidOptionError,
    JobCancelledError,
    NoBatchNormError,
    NotFoundError,
)
from worker.digits import accuracy
from worker.pipeline import run_job


def _spec(files: dict[str, Path], out_dir: Path, *, eval_file: bool = True, **options) -> JobSpec:
    return JobSpec(
        model_path=str(files["model"]),
        calibration_path=str(files["calibration"]),
        eval_path=str(files["evaluation"]) if eval_file else None,
        out_dir=str(out_dir),
        options=JobOptions(**options),
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _export(module: nn.Module, path: Path) -> Path:
    example = torch.zeros(4, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(
        torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},)), path
    )
    return path


@pytest.fixture(scope="module")
def digits_run(digits_files, tmp_path_factory) -> tuple[Report, Path, list[Progress]]:
    """One job with the eval file, default options (shared by the read-only tests)."""
    out_dir = tmp_path_factory.mktemp("run")
    events: list[Progress] = []
    report = run_job(_spec(digits_files, out_dir), on_progress=events.append)
    return report, out_dir, events


def test_recalibration_repairs_the_shifted_domain(digits_run) -> None:
    report, _, _ = digits_run
    assert report.before.top1 < 0.2
    assert report.after.top1 > 0.8
    assert report.verdict is Verdict.better
    assert report.after.loss < report.before.loss
    assert report.before.top5 is not None  # 10 classes
    assert report.before.samples == report.after.samples == 360
    assert report.prediction_change > 0.5
    assert report.bn_layers == 3
    assert len(report.layers) == 3
    assert report.model_format == "pt2"
    assert report.calibration.samples == report.calibration.available_samples == 359
    assert report.data.evaluated_on == "eval_file"
    assert report.data.eval_indices is None
    assert report.data.calibration_indices is None
    assert report.device == "cpu"
    expected = {"load", "evaluate_before", "recalibrate", "evaluate_after", "save", "total"}
    assert set(report.timings_s) == expected


def test_report_json_is_schema_valid_and_matches(digits_run) -> None:
    report, out_dir, _ = digits_run
    written = Report.model_validate_json((out_dir / "report.json").read_text())
    assert written == report
    assert json.loads((out_dir / "report.json").read_text())["verdict"] == "better"


def test_checkpoint_carries_the_new_statistics(digits_run, digits_case) -> None:
    report, out_dir, _ = digits_run
    path = out_dir / report.checkpoint.file
    assert report.checkpoint.sha256 == _sha256(path)
    assert report.checkpoint.bytes == path.stat().st_size
    module = torch.export.load(path).module()
    inputs, labels = digits_case.shifted_evaluation
    assert accuracy(module, inputs, labels) == pytest.approx(report.after.top1, abs=1e-6)


def test_progress_phases_in_order_at_most_once_per_batch(digits_run) -> None:
    _, _, events = digits_run
    phases = [e.phase for i, e in enumerate(events) if i == 0 or e.phase != events[i - 1].phase]
    assert phases == [
        Phase.loading,
        Phase.evaluating,
        Phase.recalibrating,
        Phase.evaluating,
        Phase.saving,
    ]
    recalibrating = [e for e in events if e.phase is Phase.recalibrating]
    assert recalibrating[-1].done == recalibrating[-1].total == 6  # 359 samples / 64
    assert len(recalibrating) <= recalibrating[-1].total + 1


def test_same_seed_same_result(digits_files, digits_run, tmp_path) -> None:
    first, _, _ = digits_run
    second = run_job(_spec(digits_files, tmp_path))
    skip = {"timings_s", "checkpoint", "runtime"}  # runtime: seconds waited and computed
    assert second.model_dump(exclude=skip) == first.model_dump(exclude=skip)
    assert first.runtime is not None and second.runtime is not None
    for field in ("data_workers", "pinned_memory", "oom_retries"):
        assert getattr(second.runtime, field) == getattr(first.runtime, field), field
    # torch.export.save writes the same bytes for the same program and weights.
    assert second.checkpoint.sha256 == first.checkpoint.sha256


def test_holdout_split_is_disjoint_and_seeded(digits_files, tmp_path) -> None:
    report = run_job(_spec(digits_files, tmp_path / "a", eval_file=False, max_samples=100))
    data = report.data
    assert data.evaluated_on == "holdout"
    assert data.holdout_fraction == 0.5
    assert len(data.eval_indices) == 180  # round(0.5 · 359)
    assert report.calibration.available_samples == 179
    assert report.calibration.samples == len(data.calibration_indices) == 100
    assert not set(data.eval_indices) & set(data.calibration_indices)
    assert data.eval_indices == sorted(data.eval_indices)
    assert report.after.samples == 180
    assert report.after.top1 > 0.7
    again = run_job(_spec(digits_files, tmp_path / "b", eval_file=False, max_samples=100))
    assert again.data == data
    other = run_job(_spec(digits_files, tmp_path / "c", eval_file=False, holdout=0.3, seed=1))
    assert len(other.data.eval_indices) == round(0.3 * 359)
    assert other.data.eval_indices != data.eval_indices


def test_calibrating_on_the_wrong_domain_is_reported_worse(
    digits_case, digits_files, tmp_path
) -> None:
    # Shifted calibration data, clean evaluation data: the new statistics hurt.
    inputs, labels = digits_case.evaluation
    np.savez(tmp_path / "clean.npz", inputs=inputs, labels=labels)
    report = run_job(_spec({**digits_files, "evaluation": tmp_path / "clean.npz"}, tmp_path))
    assert report.before.top1 > 0.9
    assert report.after.top1 < report.before.top1 - 0.1
    assert report.verdict is Verdict.worse


def test_fold_writes_an_equivalent_model(digits_files, tmp_path) -> None:
    report = run_job(_spec(digits_files, tmp_path, fold=True))
    folded = report.folded
    assert folded is not None
    assert folded.folded >= 2
    assert folded.max_abs_diff < 1e-3
    assert (tmp_path / folded.artifact.file).is_file()
    assert folded.artifact.sha256 == _sha256(tmp_path / folded.artifact.file)
    assert "fold" in report.timings_s


def test_unlabeled_calibration_evaluates_label_free_on_itself(digits_case, tmp_path) -> None:
    inputs, _ = digits_case.shifted_calibration
    np.savez(tmp_path / "unlabeled.npz", inputs=inputs)
    files = {"model": _model_file(digits_case, tmp_path), "calibration": tmp_path / "unlabeled.npz"}
    report = run_job(_spec(files, tmp_path / "out", eval_file=False))
    assert report.verdict is Verdict.unknown
    assert report.before.top1 is None
    assert report.after.loss is None
    assert report.data.evaluated_on == "calibration"
    assert report.after.samples == len(inputs)
    # The label-free metrics of the unchanged model, computed here from its softmax outputs.
    with torch.no_grad():
        probs = torch.softmax(digits_case.model.eval()(torch.from_numpy(inputs)).double(), 1)
    entropy = float(-(probs * probs.clamp_min(1e-300).log()).sum(1).mean())
    assert report.before.mean_confidence == pytest.approx(float(probs.max(1).values.mean()))
    assert report.before.mean_entropy == pytest.approx(entropy, rel=1e-4, abs=1e-6)
    # Before, the shift saturates the model (near-certain and mostly wrong); the new statistics
    # bring back graded confidence and change most predictions.
    assert report.after.mean_confidence < report.before.mean_confidence
    assert report.after.mean_entropy > report.before.mean_entropy
    assert report.prediction_change > 0.5
    with pytest.raises(InvalidOptionError, match="labels") as info:
        run_job(_spec(files, tmp_path / "out2", eval_file=False, holdout=0.5))
    assert info.value.field == "options.holdout"


def _model_file(digits_case, tmp_path: Path) -> Path:
    return _export(digits_case.model, tmp_path / "digits.pt2")


def test_cancel_during_recalibration(digits_files, tmp_path) -> None:
    seen: list[Phase] = []
    with pytest.raises(JobCancelledError):
        run_job(
            _spec(digits_files, tmp_path),
            on_progress=lambda p: seen.append(p.phase),
            should_stop=lambda: Phase.recalibrating in seen,
        )
    assert Phase.saving not in seen
    assert not (tmp_path / "report.json").exists()


def test_eval_file_with_holdout_is_rejected(digits_files, tmp_path) -> None:
    with pytest.raises(InvalidOptionError, match="eval file") as info:
        run_job(_spec(digits_files, tmp_path, holdout=0.2))
    assert info.value.field == "options.holdout"


def test_labels_out_of_range(digits_case, digits_files, tmp_path) -> None:
    inputs, labels = digits_case.shifted_evaluation
    np.savez(tmp_path / "bad.npz", inputs=inputs, labels=labels + 10)
    files = {**digits_files, "evaluation": tmp_path / "bad.npz"}
    with pytest.raises(InvalidDataError, match="label"):
        run_job(_spec(files, tmp_path / "out"))


def test_eval_data_the_model_cannot_take(digits_files, tmp_path) -> None:
    rgb = np.random.default_rng(0).random((10, 3, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "rgb.npz", inputs=rgb, labels=np.zeros(10, dtype=np.int64))
    files = {**digits_files, "evaluation": tmp_path / "rgb.npz"}
    with pytest.raises(InvalidDataError, match=r"shape \(3, 8, 8\) from rgb\.npz") as info:
        run_job(_spec(files, tmp_path / "out"))
    assert info.value.file == str(tmp_path / "rgb.npz")


class _PerPixel(nn.Module):
    """BN model whose output is (N, 10, 1): not classifier logits."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[:, :, None]


def test_model_output_not_2d(digits_case, digits_files, tmp_path) -> None:
    files = {**digits_files, "model": _export(_PerPixel(digits_case.model), tmp_path / "m.pt2")}
    with pytest.raises(InvalidModelError, match=r"shape \(2, 10, 1\)"):
        run_job(_spec(files, tmp_path / "out"))


def test_model_without_batchnorm(digits_files, tmp_path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    files = {**digits_files, "model": _export(model, tmp_path / "linear.pt2")}
    with pytest.raises(NoBatchNormError):
        run_job(_spec(files, tmp_path / "out"))


def test_missing_file_is_named(digits_files, tmp_path) -> None:
    files = {**digits_files, "calibration": tmp_path / "nope.npz"}
    with pytest.raises(NotFoundError, match=r"nope\.npz") as info:
        run_job(_spec(files, tmp_path / "out"))
    assert info.value.file == str(tmp_path / "nope.npz")


def test_batch_size_one_calibrates_in_pairs(digits_files, tmp_path) -> None:
    events: list[Progress] = []
    spec = _spec(digits_files, tmp_path, batch_size=1, max_samples=200)
    report = run_job(spec, on_progress=events.append)
    calibration = report.calibration
    assert (calibration.samples, calibration.batches, calibration.merged_batches) == (200, 100, 100)
    recalibrating = [e for e in events if e.phase is Phase.recalibrating]
    assert recalibrating[-1].done == recalibrating[-1].total == 200
