"""worker.evaluation: exact metrics on hand-made logits, the verdict rules, bad model outputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from recalib.contract import Metrics, Verdict
from recalib.errors import InvalidModelError, JobCancelledError
from worker.evaluation import (
    ClassificationAccumulator,
    Evaluation,
    evaluate,
    infer_num_classes,
    judge,
    max_output_diff,
    prediction_change,
)

LN3, LN8 = math.log(3.0), math.log(8.0)


def _batches(logits: list[list[float]], labels: list[int], batch_size: int = 1):
    x, y = torch.tensor(logits), torch.tensor(labels)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def _entropy(probs: list[float]) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def test_metrics_exact_on_hand_made_logits() -> None:
    # Softmax of [ln3, 0, 0] is [.6, .2, .2] (correct, label 0); of [0, ln8, 0] is [.1, .8, .1]
    # (wrong, label 2).
    batches = _batches([[LN3, 0.0, 0.0], [0.0, LN8, 0.0]], [0, 2])
    result = evaluate(nn.Identity(), batches, labeled=True)
    metrics = result.metrics
    assert metrics.samples == 2
    assert metrics.top1 == pytest.approx(0.5)
    assert metrics.top5 is None  # fewer than 5 classes
    assert metrics.loss == pytest.approx((-math.log(0.6) - math.log(0.1)) / 2, abs=1e-6)
    expected_entropy = (_entropy([0.6, 0.2, 0.2]) + _entropy([0.1, 0.8, 0.1])) / 2
    assert metrics.mean_entropy == pytest.approx(expected_entropy, abs=1e-6)
    assert metrics.mean_confidence == pytest.approx((0.6 + 0.8) / 2, abs=1e-6)
    assert result.predictions.tolist() == [0, 1]


def test_top5_with_six_classes_across_batches() -> None:
    # Sample 0: label 3 has rank 4 → top-5 hit, top-1 miss. Sample 1: label 5 ranks last → miss.
    # Sample 2: label 1 ranks first → both hit.
    logits = [
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],
        [0.0, 9.0, 0.0, 0.0, 0.0, 0.0],
    ]
    result = evaluate(nn.Identity(), _batches(logits, [3, 5, 1], batch_size=2), labeled=True)
    assert result.metrics.top1 == pytest.approx(1 / 3)
    assert result.metrics.top5 == pytest.approx(2 / 3)
    assert result.predictions.tolist() == [0, 0, 1]


def test_unlabeled_gives_label_free_metrics_only() -> None:
    batches = _batches([[LN3, 0.0, 0.0], [0.0, 0.0, 0.0]], [-1, -1])
    metrics = evaluate(nn.Identity(), batches, labeled=False).metrics
    assert (metrics.top1, metrics.top5, metrics.loss) == (None, None, None)
    assert metrics.mean_confidence == pytest.approx((0.6 + 1 / 3) / 2, abs=1e-6)
    expected = (_entropy([0.6, 0.2, 0.2]) + math.log(3.0)) / 2
    assert metrics.mean_entropy == pytest.approx(expected, abs=1e-6)


def test_extreme_logits_keep_entropy_finite() -> None:
    metrics = evaluate(nn.Identity(), _batches([[0.0, 1e4]], [1]), labeled=True).metrics
    assert metrics.mean_entropy == pytest.approx(0.0, abs=1e-6)
    assert metrics.mean_confidence == pytest.approx(1.0)


def test_progress_and_cancellation() -> None:
    seen: list[tuple[int, int | None]] = []
    batches = _batches([[1.0, 0.0]] * 3, [0, 0, 0])
    evaluate(
        nn.Identity(), batches, labeled=True, total_batches=3, progress=lambda *a: seen.append(a)
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]
    calls = iter([False, True])
    with pytest.raises(JobCancelledError):
        evaluate(nn.Identity(), batches, labeled=True, should_stop=lambda: next(calls))


def test_prediction_change() -> None:
    before, after = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])
    assert prediction_change(before, after) == pytest.approx(0.5)
    assert prediction_change(before, before) == 0.0
    with pytest.raises(ValueError, match="shape"):
        prediction_change(before, after[:3])


def _evaluation(correct: list[bool] | None) -> Evaluation:
    top1 = None if correct is None else sum(correct) / len(correct)
    metrics = Metrics(top1=top1, samples=len(correct or [0]), mean_entropy=1.0)
    flags = None if correct is None else torch.tensor(correct)
    return Evaluation(metrics=metrics, predictions=None, correct=flags)


INCONCLUSIVE = Verdict.inconclusive


@pytest.mark.parametrize(
    ("before", "after", "verdict"),
    [
        ([False] * 60 + [True] * 40, [True] * 100, Verdict.better),  # 60 fixed: p ≈ 2^-59
        ([True] * 100, [False] * 60 + [True] * 40, Verdict.worse),
        ([True] * 50 + [False] * 50, [True] * 50 + [False] * 50, Verdict.unchanged),
        # two samples more of 100: the old rule said better; McNemar p = 0.5
        ([False] * 2 + [True] * 48 + [False] * 50, [True] * 50 + [False] * 50, INCONCLUSIVE),
    ],
)
def test_verdict_by_paired_top1(before, after, verdict: Verdict) -> None:
    judgement = judge(_evaluation(before), _evaluation(after))
    assert judgement.verdict is verdict and judgement.basis == "labels"
    assert judgement.significance is not None and judgement.significance.test == "mcnemar_exact"


def test_verdict_unknown_without_labels() -> None:
    judgement = judge(_evaluation(None), _evaluation(None))
    assert judgement.verdict is Verdict.unknown and judgement.basis is None
    assert judgement.significance is None


def test_top1_interval_is_wilson() -> None:
    accumulator = ClassificationAccumulator(labeled=True)
    accumulator.update(torch.eye(4)[[0, 1, 2, 3, 0]], torch.tensor([0, 1, 2, 3, 1]))
    metrics = accumulator.result().metrics
    assert metrics.top1 == pytest.approx(0.8)
    interval = metrics.top1_interval
    assert interval is not None
    assert (interval.low, interval.high) == pytest.approx((0.3755, 0.9638), abs=1e-4)


class _Returns(nn.Module):
    def __init__(self, output: object) -> None:
        super().__init__()
        self.output = output

    def forward(self, x: torch.Tensor) -> object:
        return self.output


@pytest.mark.parametrize(
    ("output", "match"),
    [
        (torch.zeros(2, 3, 4), r"shape \(2, 3, 4\)"),
        (torch.zeros(2, dtype=torch.int64), r"shape \(2,\)"),
        (torch.zeros(5, 3), r"shape \(5, 3\)"),  # not one row per input
        ((torch.zeros(2, 3),), "returned tuple"),
        (torch.full((2, 3), float("nan")), "NaN"),
    ],
)
def test_bad_model_outputs_are_user_errors(output: object, match: str) -> None:
    with pytest.raises(InvalidModelError, match=match):
        infer_num_classes(_Returns(output), torch.zeros(2, 1))


def test_infer_num_classes_and_max_output_diff() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(4, 7)
    assert infer_num_classes(linear, torch.zeros(2, 4)) == 7
    shifted = nn.Linear(4, 7)
    shifted.load_state_dict(linear.state_dict())
    with torch.no_grad():
        shifted.bias[3] += 0.25
    batches = [(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64)) for _ in range(2)]
    assert max_output_diff(linear, shifted, batches) == pytest.approx(0.25, abs=1e-6)
    assert max_output_diff(linear, linear, batches) == 0.0


class _TakesFour(nn.Module):
    """Identity that refuses any batch but 4 samples, as a fixed-batch torch.export program does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 4:
            raise AssertionError(f"Guard failed: x.size()[0] == 4 (got {x.shape[0]})")
        return x


def test_min_batch_size_pads_a_short_batch_and_drops_the_padding() -> None:
    logits = [[LN3, 0, 0], [0, LN8, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, LN3]]
    batches = _batches(logits, [0, 2, 2, 0, 1, 2], batch_size=4)  # 4 + 2
    padded = evaluate(_TakesFour(), batches, labeled=True, min_batch_size=4)
    plain = evaluate(nn.Identity(), batches, labeled=True)
    assert padded.metrics == plain.metrics and padded.metrics.samples == 6
    assert torch.equal(padded.predictions, plain.predictions)
    assert max_output_diff(_TakesFour(), _TakesFour(), batches, min_batch_size=4) == 0.0
