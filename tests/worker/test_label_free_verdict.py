"""The label-free estimate and verdict (worker.evaluation.estimate, recalib.verdict): its bound
and threshold on hand-made scores, the digits cases of bench/label_free.py (never ``better``
where the labels say otherwise), and a job with a source set and unlabeled target data."""

from __future__ import annotations

import numpy as np
import pytest

from bench.label_free import SHIFTS, VARIANTS, run_case
from recalib.contract import Estimate, EstimatedTop1, Interval, JobSpec, Verdict
from recalib.verdict import estimate_verdict
from worker.evaluation.estimate import SourceReference, estimate_top1
from worker.pipeline import run_job

UNIFORM_LABELS = np.repeat(np.arange(10), 40)


def _reference(top1: float = 0.9) -> SourceReference:
    right = int(top1 * len(UNIFORM_LABELS))
    predictions = UNIFORM_LABELS.copy()
    predictions[right:] = (predictions[right:] + 1) % 10
    scores = np.linspace(-2.0, 0.0, len(UNIFORM_LABELS))
    return SourceReference.fit(predictions, scores, UNIFORM_LABELS, 10)


def test_atc_threshold_keeps_the_source_accuracy_above_it() -> None:
    reference = _reference(0.9)
    scores = np.linspace(-2.0, 0.0, len(UNIFORM_LABELS))
    assert reference.top1 == pytest.approx(0.9)
    assert (scores > reference.threshold).mean() == pytest.approx(0.9, abs=1 / 400)


def test_a_collapsed_model_is_unreliable_and_bounded_low() -> None:
    """Confident predictions all of class 3: ATC would say ~1.0; the class bound says ≤ 0.1."""
    result = estimate_top1(_reference(), np.full(400, 3), np.zeros(400))
    assert not result.reliable and result.top1 is None
    slack = 0.5 * np.sqrt(10 / 400) * 2
    assert result.upper_bound == pytest.approx(0.1 + slack)
    assert "out of its training distribution" in result.reason


def test_a_model_like_on_the_source_is_estimated_by_atc() -> None:
    predictions = np.tile(np.arange(10), 40)
    scores = np.where(np.arange(400) % 5 == 0, -3.0, 0.0)  # 80 % above any source threshold
    result = estimate_top1(_reference(0.9), predictions, scores)
    assert result.reliable and result.top1 == pytest.approx(0.8)
    assert result.interval.low < 0.8 < result.interval.high


def _side(top1: float | None, low: float, high: float, bound: float) -> EstimatedTop1:
    return EstimatedTop1(top1=top1, interval=Interval(low=low, high=high),
                         reliable=top1 is not None, upper_bound=bound, reason="")  # fmt: skip


@pytest.mark.parametrize(
    ("before", "after", "verdict"),
    [
        (_side(None, 0, 0.3, 0.3), _side(0.9, 0.87, 0.93, 1.0), Verdict.better),
        (_side(None, 0, 0.9, 0.9), _side(0.9, 0.87, 0.93, 1.0), Verdict.unknown),  # bound high
        (_side(0.8, 0.77, 0.83, 1.0), _side(0.9, 0.87, 0.93, 1.0), Verdict.unknown),  # margin
        (_side(0.7, 0.67, 0.73, 1.0), _side(0.9, 0.87, 0.93, 1.0), Verdict.better),
        (_side(0.9, 0.87, 0.93, 1.0), _side(None, 0, 0.2, 0.2), Verdict.worse),
        (_side(None, 0, 0.2, 0.2), _side(None, 0, 0.9, 0.9), Verdict.unknown),  # both unreliable
    ],
)
def test_estimate_verdict_rules(before, after, verdict) -> None:
    estimate = Estimate(method="m", source_top1=0.99, source_samples=360, before=before,
                        after=after)  # fmt: skip
    assert estimate_verdict(estimate) is verdict


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_label_free_never_says_better_where_labels_do_not(digits_case, variant: str) -> None:
    """Each case of bench/label_free.py on the seed-0 digits model: a label-free
    ``better``/``worse`` must be the labeled verdict too (inverted and permuted pixels, which BN
    cannot fix, AdaBN on 4 samples, which hurts, and a label shift included)."""
    shift, samples, classes = VARIANTS[variant]
    case = run_case(digits_case, 0, variant, SHIFTS[shift], samples, classes)
    if case.label_free == "better":
        assert case.labeled == "better", case
    if case.labeled == "worse":
        assert case.label_free != "better", case
    if case.label_free == "worse":
        assert case.labeled == "worse", case
    if variant.startswith("demo"):  # the shift AdaBN repairs: the estimate can tell
        assert case.label_free == "better", case


@pytest.fixture(scope="module")
def source_and_target(digits_case, digits_files, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("label-free")
    source_x, source_y = digits_case.calibration  # unshifted: the training domain
    target_x, _ = digits_case.shifted_evaluation
    paths = {"model": str(digits_files["model"])}
    for name, arrays in {
        "source": {"inputs": source_x, "labels": source_y},
        "target": {"inputs": target_x},  # no labels
        "inverted": {"inputs": (1.0 - digits_case.evaluation[0]).astype(np.float32)},
        "unlabeled_source": {"inputs": source_x},
    }.items():
        paths[name] = str(out / f"{name}.npz")
        np.savez(paths[name], **arrays)
    return paths


def _job(paths: dict[str, str], target: str, out_dir, source: str = "source"):
    spec = JobSpec(model_path=paths["model"], calibration_path=paths[target],
                   source_eval_path=paths[source], out_dir=str(out_dir))  # fmt: skip
    return run_job(spec)


@pytest.mark.slow
def test_job_without_target_labels_gets_a_label_free_verdict(source_and_target, tmp_path) -> None:
    report = _job(source_and_target, "target", tmp_path)
    assert report.before.top1 is None  # no target labels
    assert report.verdict is Verdict.better and report.verdict_basis == "estimate"
    estimate = report.estimate
    assert estimate is not None and estimate.source_samples == 359
    assert not estimate.before.reliable and estimate.after.reliable
    assert estimate.after.top1 > 0.8 and estimate.before.upper_bound < 0.5
    html = (tmp_path / "report.html").read_text()
    assert "label-free estimate" in html and 'id="estimate"' in html
    assert "out of its training distribution" in html  # the before estimate's reason


@pytest.mark.slow
def test_inverted_target_is_not_called_better(source_and_target, tmp_path) -> None:
    report = _job(source_and_target, "inverted", tmp_path)
    assert report.verdict is Verdict.unknown and report.verdict_basis == "estimate"
    assert report.estimate is not None and not report.estimate.after.reliable


@pytest.mark.slow
def test_an_unlabeled_source_set_is_refused(source_and_target, tmp_path) -> None:
    from recalib.errors import InvalidDataError

    with pytest.raises(InvalidDataError, match="source evaluation set needs labeled samples"):
        _job(source_and_target, "target", tmp_path, source="unlabeled_source")
