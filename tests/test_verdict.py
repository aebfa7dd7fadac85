"""recalib.verdict: its statistics against scipy's, the verdict rules, the gates, old reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from recalib import verdict
from recalib.contract import Report, Verdict

CASES = [(0, 1), (1, 1), (0, 5), (3, 5), (17, 30), (1, 100), (50, 100), (999, 1000), (7, 12345)]


@pytest.mark.parametrize(("successes", "trials"), CASES)
def test_wilson_matches_scipy(successes: int, trials: int) -> None:
    reference = stats.binomtest(successes, trials).proportion_ci(0.95, method="wilson")
    interval = verdict.wilson_interval(successes, trials)
    assert interval.low == pytest.approx(reference.low, abs=1e-12)
    assert interval.high == pytest.approx(reference.high, abs=1e-12)


@pytest.mark.parametrize(("successes", "trials"), CASES)
def test_clopper_pearson_matches_scipy(successes: int, trials: int) -> None:
    reference = stats.binomtest(successes, trials).proportion_ci(0.95, method="exact")
    interval = verdict.clopper_pearson(successes, trials)
    assert interval.low == pytest.approx(reference.low, abs=1e-10)
    assert interval.high == pytest.approx(reference.high, abs=1e-10)


@pytest.mark.parametrize(
    ("only_before", "only_after"),
    [(0, 1), (1, 0), (2, 3), (0, 6), (10, 25), (40, 41), (3, 300), (1234, 1300), (0, 2000)],
)
def test_exact_mcnemar_is_the_binomial_test_of_the_discordant_pairs(
    only_before: int, only_after: int
) -> None:
    reference = stats.binomtest(only_after, only_before + only_after, 0.5).pvalue
    assert verdict.exact_mcnemar_p(only_before, only_after) == pytest.approx(reference, rel=1e-9)


def test_mcnemar_without_discordant_pairs_is_one() -> None:
    assert verdict.exact_mcnemar_p(0, 0) == 1.0


def test_binomial_cdf_matches_scipy() -> None:
    for k, n, p in [(0, 10, 0.3), (5, 10, 0.5), (30, 100, 0.25), (499, 1000, 0.5)]:
        assert verdict.binomial_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-10)


def test_percentile_interval_matches_numpy() -> None:
    values = np.random.default_rng(3).normal(size=1001).tolist()
    interval = verdict.bootstrap_interval(values)
    assert interval.low == pytest.approx(np.percentile(values, 2.5))
    assert interval.high == pytest.approx(np.percentile(values, 97.5))


def test_difference_interval_excludes_zero_exactly_when_mcnemar_rejects() -> None:
    for only_before in range(12):
        for only_after in range(12):
            _, significance = verdict.top1_from_counts(only_before, only_after, 40)
            rejects = significance.p_value < verdict.ALPHA
            interval = significance.difference_interval
            excludes_zero = interval.low > 0 or interval.high < 0
            assert rejects == excludes_zero, (only_before, only_after)
            assert interval.low <= significance.difference <= interval.high


@pytest.mark.parametrize(
    ("only_before", "only_after", "samples", "expected"),
    [
        (0, 40, 100, Verdict.better),
        (40, 0, 100, Verdict.worse),
        (0, 0, 100, Verdict.unchanged),  # nothing changed
        (1, 2, 100, Verdict.inconclusive),  # the old rule said "better" (two samples)
        (2, 1, 100, Verdict.inconclusive),
        (10, 12, 10_000, Verdict.unchanged),  # interval within ±1 point
        (1, 4, 30, Verdict.inconclusive),
    ],
)
def test_top1_verdict(only_before, only_after, samples, expected) -> None:
    assert verdict.top1_from_counts(only_before, only_after, samples)[0] is expected


def test_paired_top1_counts_the_discordant_samples() -> None:
    before = [True, True, False, False, True]
    after = [True, False, True, True, True]
    _, significance = verdict.paired_top1(before, after)
    assert (significance.only_before_correct, significance.only_after_correct) == (1, 2)
    assert significance.difference == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="same non-empty samples"):
        verdict.paired_top1(before, after[:3])


def test_samples_needed_would_detect_the_difference() -> None:
    """At the sample size it names, the same rates give a significant test."""
    only_before, only_after, samples = 2, 6, 100
    result, significance = verdict.top1_from_counts(only_before, only_after, samples)
    assert result is Verdict.inconclusive
    needed = significance.samples_needed
    assert needed is not None and needed > samples
    scale = needed / samples
    p_at_needed = verdict.exact_mcnemar_p(round(only_before * scale), round(only_after * scale))
    assert p_at_needed < verdict.ALPHA
    scale = needed / samples / 4  # a quarter of it is not enough
    assert verdict.exact_mcnemar_p(round(only_before * scale), round(only_after * scale)) > 0.05
    assert verdict.top1_from_counts(3, 3, 100)[1].samples_needed is None


def test_paired_bootstrap_rules() -> None:
    shifted = [0.05 + 0.001 * i for i in range(-20, 21)]
    result, significance = verdict.paired_bootstrap(0.05, shifted, 50)
    assert result is Verdict.better and significance.p_value < 0.05
    assert verdict.paired_bootstrap(-0.05, [-x for x in shifted], 50)[0] is Verdict.worse
    assert verdict.paired_bootstrap(0.0, [0.0] * 100, 50)[0] is Verdict.unchanged
    wide = [0.1 * i for i in range(-10, 11)]
    assert verdict.paired_bootstrap(0.0, wide, 50)[0] is Verdict.inconclusive


@pytest.mark.parametrize(
    ("value", "fail_if_worse", "require", "fails"),
    [
        ("worse", True, None, True),
        ("inconclusive", True, None, False),
        ("unknown", True, None, False),
        ("better", False, "better", False),
        ("unchanged", False, "better", True),
        ("inconclusive", False, "better", True),
        ("unknown", False, "better", True),
        ("worse", False, "not-worse", True),
        ("inconclusive", False, "not-worse", False),
        ("worse", False, None, False),
    ],
)
def test_gates(value, fail_if_worse, require, fails) -> None:
    assert verdict.fails(value, fail_if_worse=fail_if_worse, require=require) is fails


def test_gate_refuses_an_unknown_requirement() -> None:
    with pytest.raises(ValueError, match="require must be one of"):
        verdict.fails("better", require="best")


def test_alias_moves_unless_worse() -> None:
    assert [verdict.alias_may_move(v) for v in Verdict] == [v is not Verdict.worse for v in Verdict]


OLD_METRICS = {"top1": 0.1, "top5": 0.5, "loss": 2.0, "samples": 360, "mean_entropy": 0.1,
               "mean_confidence": 0.9}  # fmt: skip
OLD_REPORT = {
    "schema_version": 1, "recalib_version": "0.1.0", "model_format": "pt2", "bn_layers": 1,
    "skipped_layers": [],
    "calibration": {"samples": 2, "batches": 1, "available_samples": 2, "estimator": "population"},
    "before": OLD_METRICS, "after": dict(OLD_METRICS, top1=0.9), "prediction_change": 0.8,
    "verdict": "better", "layers": [],
    "checkpoint": {"file": "m.pt2", "format": "pt2", "sha256": "0" * 64, "bytes": 1},
    "data": {"calibration_file": "c.npz", "eval_file": "e.npz"}, "options": {}, "device": "cpu",
    "timings_s": {"total": 1.0},
}  # fmt: skip
"""A report as workers wrote it before verdicts carried their uncertainty."""


def test_a_report_from_before_significance_still_reads() -> None:
    report = Report.model_validate(json.loads(json.dumps(OLD_REPORT)))
    assert report.significance is None and report.verdict_basis is None
    assert report.before is not None and report.before.top1_interval is None
    assert report.verdict is Verdict.better
    assert "older report" in verdict.explain(report)


def test_explain_names_test_p_and_interval() -> None:
    _, significance = verdict.top1_from_counts(0, 30, 360)
    text = verdict.explain(_report(Verdict.better, significance))
    assert "exact McNemar" in text and "p = 1.9e-09 < α 0.05" in text and "360 samples" in text
    assert math.isclose(significance.difference, 30 / 360)
    _, significance = verdict.top1_from_counts(1, 3, 30)
    text = verdict.explain(_report(Verdict.inconclusive, significance))
    assert f"about {significance.samples_needed} labeled samples" in text
    unknown = Report.model_validate(dict(OLD_REPORT, verdict="unknown", before=None, after=None))
    assert verdict.explain(unknown).startswith("no labeled evaluation data")


def _report(value: Verdict, significance) -> Report:
    return Report.model_validate(OLD_REPORT).model_copy(
        update={"verdict": value, "significance": significance}
    )
