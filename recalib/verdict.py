"""The verdict: did recalibration help? One module for everything that decides or reads it.

Labeled verdicts (``verdict_basis: "labels"``) come from a paired test on the same samples before
and after, at ``ALPHA`` (two-sided):

- classification: the exact McNemar test, i.e. a two-sided binomial test (p = 1/2) of the
  samples right after among those whose correctness changed (``b`` right only before, ``c`` right
  only after). The difference's interval is the exact (Clopper–Pearson) interval of ``c/(b+c)``
  mapped to ``(c − b)/n``, conditional on the ``b + c`` discordant samples, so it excludes 0
  exactly when the test rejects;
- segmentation: a paired bootstrap over images of the mean IoU (resampled in the worker,
  :mod:`worker.evaluation.verdict`); p-value and interval from the replicate differences.

Then: ``better``/``worse`` when the test rejects at ``ALPHA`` (sign of the difference);
``unchanged`` when the difference's interval lies within ±tolerance (``TOP1_TOLERANCE``,
``MEAN_IOU_TOLERANCE``); ``inconclusive`` otherwise (too few samples to tell); ``unknown`` without
labels. ``samples_needed`` is the labeled sample size at which the observed difference would be
detected with power ``POWER`` (Connor 1987 for McNemar; the bootstrap's standard error scaled by
1/√n for the mean IoU).

The gates (:func:`fails`, :func:`alias_may_move`) and the one-line explanation
(:func:`explain`) are what the CLI, the MLflow registration, the HTML report and the web page
use. Plain Python (no numpy, no torch): the service and the CLI import this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

from recalib.contract import Estimate, EstimatedTop1, Interval, Report, Significance, Verdict

ALPHA = 0.05
"""Two-sided significance level of a labeled ``better``/``worse``."""

INTERVAL_LEVEL = 0.95
"""Confidence level of every interval of the report (metrics and the difference)."""

TOP1_TOLERANCE = 0.01
"""A top-1 difference whose interval lies within ±this (one point) is ``unchanged``."""

MEAN_IOU_TOLERANCE = 0.01
"""A mean-IoU difference whose interval lies within ±this is ``unchanged``."""

POWER = 0.8
"""Power at which ``samples_needed`` would detect the observed difference."""

BOOTSTRAP_REPLICATES = 2000
"""Resamples of the paired bootstrap (mean IoU)."""

BOOTSTRAP_SEED = 0
"""Seed of the bootstrap: the same data give the same report."""

REQUIREMENTS = ("better", "not-worse")
"""Values of ``--require``: ``better`` fails on anything but better; ``not-worse`` on worse."""

_MAX_FRACTION_ITERATIONS = 100_000
_EPSILON = 1e-15


def _z(level: float) -> float:
    """The standard normal quantile with ``level`` central mass: 1.96 for 0.95."""
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: int, trials: int, level: float = INTERVAL_LEVEL) -> Interval:
    """Wilson score interval of a binomial proportion ``successes / trials``.

    Raises:
        ValueError: ``trials`` < 1 or ``successes`` outside [0, trials].
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, trials >= 1; got {successes}/{trials}")
    z = _z(level)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return Interval(low=max(0.0, centre - half), high=min(1.0, centre + half))


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, _MAX_FRACTION_ITERATIONS):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < _EPSILON:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def regularized_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1.0 - x) / b


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return regularized_beta(n - k, k + 1, 1.0 - p)


def exact_mcnemar_p(only_before: int, only_after: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when there are none)."""
    discordant = only_before + only_after
    if discordant == 0:
        return 1.0
    return min(1.0, 2.0 * binomial_cdf(min(only_before, only_after), discordant, 0.5))


def _solve(f: object, target: float) -> float:
    """x in [0, 1] with increasing ``f(x) == target``, by bisection to 1e-12."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if f(middle) < target:  # type: ignore[operator]
            low = middle
        else:
            high = middle
    return (low + high) / 2


def clopper_pearson(successes: int, trials: int, level: float = INTERVAL_LEVEL) -> Interval:
    """Exact (Clopper–Pearson) interval of ``successes / trials`` (``trials`` >= 1)."""
    tail = (1 - level) / 2
    k, n = successes, trials
    low = 0.0 if k == 0 else _solve(lambda x: regularized_beta(k, n - k + 1, x), tail)
    high = 1.0 if k == n else _solve(lambda x: regularized_beta(k + 1, n - k, x), 1 - tail)
    return Interval(low=low, high=high)


def mcnemar_samples_needed(
    only_before: int, only_after: int, samples: int, alpha: float = ALPHA, power: float = POWER
) -> int | None:
    """Paired samples at which McNemar's test would detect the observed difference (Connor 1987:
    ``n = (z_{1−α/2}·√ψ + z_power·√(ψ − δ²))² / δ²``, ψ the discordant rate, δ the difference);
    None when the difference is zero."""
    difference = (only_after - only_before) / samples
    if difference == 0:
        return None
    discordant_rate = (only_after + only_before) / samples
    z_alpha, z_power = _z(1 - alpha), NormalDist().inv_cdf(power)
    root = z_alpha * math.sqrt(discordant_rate) + z_power * math.sqrt(
        max(discordant_rate - difference**2, 0.0)
    )
    return math.ceil((root / difference) ** 2)


def _decide(significant: bool, difference: float, interval: Interval, tolerance: float) -> Verdict:
    if significant:
        return Verdict.better if difference > 0 else Verdict.worse
    if -tolerance <= interval.low and interval.high <= tolerance:
        return Verdict.unchanged
    return Verdict.inconclusive


def paired_top1(
    before_correct: Sequence[bool], after_correct: Sequence[bool], alpha: float = ALPHA
) -> tuple[Verdict, Significance]:
    """The verdict of top-1 before vs after on the same samples (per-sample correctness, in the
    same order), by the exact McNemar test.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    if len(before_correct) != len(after_correct) or not before_correct:
        raise ValueError(
            f"need the same non-empty samples before and after, got {len(before_correct)} and "
            f"{len(after_correct)}"
        )
    samples = len(before_correct)
    pairs = list(zip(before_correct, after_correct, strict=True))
    only_before = sum(1 for b, a in pairs if b and not a)
    only_after = sum(1 for b, a in pairs if a and not b)
    return top1_from_counts(only_before, only_after, samples, alpha)


def top1_from_counts(
    only_before: int, only_after: int, samples: int, alpha: float = ALPHA
) -> tuple[Verdict, Significance]:
    """:func:`paired_top1` from the discordant counts and the number of paired samples."""
    discordant = only_before + only_after
    difference = (only_after - only_before) / samples
    if discordant == 0:
        interval = Interval(low=0.0, high=0.0)
    else:
        share = clopper_pearson(only_after, discordant, 1 - alpha)
        scale = discordant / samples
        interval = Interval(low=scale * (2 * share.low - 1), high=scale * (2 * share.high - 1))
    p_value = exact_mcnemar_p(only_before, only_after)
    significance = Significance(
        test="mcnemar_exact",
        p_value=p_value,
        alpha=alpha,
        difference=difference,
        difference_interval=interval,
        tolerance=TOP1_TOLERANCE,
        samples=samples,
        samples_needed=mcnemar_samples_needed(only_before, only_after, samples, alpha),
        only_before_correct=only_before,
        only_after_correct=only_after,
    )
    return _decide(p_value < alpha, difference, interval, TOP1_TOLERANCE), significance


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear-interpolation percentile (numpy's default) of ascending ``sorted_values``."""
    position = fraction * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    weight = position - low
    return sorted_values[low] * (1 - weight) + sorted_values[high] * weight


def bootstrap_interval(replicates: Sequence[float], level: float = INTERVAL_LEVEL) -> Interval:
    """The percentile interval of bootstrap replicates."""
    ordered = sorted(replicates)
    tail = (1 - level) / 2
    return Interval(low=percentile(ordered, tail), high=percentile(ordered, 1 - tail))


def paired_bootstrap(
    difference: float,
    replicate_differences: Sequence[float],
    samples: int,
    alpha: float = ALPHA,
    tolerance: float = MEAN_IOU_TOLERANCE,
) -> tuple[Verdict, Significance]:
    """The verdict of a difference from its paired bootstrap replicates (the same resampled
    images before and after): significant when the percentile interval at 1 − α excludes 0;
    the p-value is twice the smaller share of replicates on either side of 0."""
    replicates = list(replicate_differences)
    if not replicates:
        raise ValueError("need bootstrap replicates")
    interval = bootstrap_interval(replicates, 1 - alpha)
    count = len(replicates)
    below = sum(1 for r in replicates if r <= 0) / count
    above = sum(1 for r in replicates if r >= 0) / count
    p_value = min(1.0, max(2 * min(below, above), 1 / (count + 1)))
    mean = sum(replicates) / count
    spread = math.sqrt(sum((r - mean) ** 2 for r in replicates) / max(count - 1, 1))
    needed = None
    if difference != 0:
        per_sample = spread * math.sqrt(samples)
        z = _z(1 - alpha) + NormalDist().inv_cdf(POWER)
        needed = max(1, math.ceil((z * per_sample / difference) ** 2))
    significant = interval.low > 0 or interval.high < 0
    significance = Significance(
        test="paired_bootstrap",
        p_value=p_value,
        alpha=alpha,
        difference=difference,
        difference_interval=interval,
        tolerance=tolerance,
        samples=samples,
        samples_needed=needed,
    )
    return _decide(significant, difference, interval, tolerance), significance


ESTIMATE_MARGIN = 0.05
"""How far a reliable label-free estimate may be off (ATC's error on shifts it handles): the
after estimate must clear the before's upper end by this to say ``better``."""


def estimate_verdict(estimate: Estimate) -> Verdict:
    """The label-free verdict: ``better`` only when the after estimate is reliable and its lower
    end clears everything the before model could have reached: its class bound, and (when the
    before estimate is reliable) its upper end plus ``ESTIMATE_MARGIN``; ``worse`` symmetrically;
    ``unknown`` otherwise. An unreliable estimate counts only by its bound, which holds without
    any confidence assumption (no label shift assumed)."""
    before, after = estimate.before, estimate.after

    def ceiling(side: EstimatedTop1) -> float:
        if side.reliable:
            return min(side.upper_bound, side.interval.high + ESTIMATE_MARGIN)
        return side.upper_bound

    if after.reliable and after.interval.low > ceiling(before):
        return Verdict.better
    if before.reliable and before.interval.low > ceiling(after):
        return Verdict.worse
    return Verdict.unknown


# -- the readers ---------------------------------------------------------------------------


def fails(
    verdict: Verdict | str, *, fail_if_worse: bool = False, require: str | None = None
) -> bool:
    """Whether a pipeline gate fails: ``--fail-if-worse`` on ``worse``; ``--require better`` on
    anything but ``better``; ``--require not-worse`` on ``worse``.

    Raises:
        ValueError: ``require`` is not one of ``REQUIREMENTS``.
    """
    value = Verdict(verdict)
    if require is not None and require not in REQUIREMENTS:
        raise ValueError(f"require must be one of {', '.join(REQUIREMENTS)}, got {require!r}")
    if require == "better" and value is not Verdict.better:
        return True
    return (fail_if_worse or require == "not-worse") and value is Verdict.worse


def alias_may_move(verdict: Verdict | str) -> bool:
    """Whether a registered model's alias may move to the new version: unless ``worse`` (the
    meaning it had before verdicts carried their uncertainty)."""
    return Verdict(verdict) is not Verdict.worse


def explain(report: Report) -> str:
    """One line saying what the verdict rests on, e.g. ``top-1 +0.0840 [+0.0612, +0.1071],
    exact McNemar p = 1.2e-08 < α 0.05 on 360 samples``; or why it is unknown."""
    significance = report.significance
    if significance is not None:
        name = "top-1" if significance.test == "mcnemar_exact" else "mean IoU"
        test = "exact McNemar" if significance.test == "mcnemar_exact" else "paired bootstrap"
        interval = significance.difference_interval
        relation = "<" if (significance.p_value or 1.0) < significance.alpha else "≥"
        text = (
            f"{name} {significance.difference:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}], "
            f"{test} p = {significance.p_value:.2g} {relation} α {significance.alpha:g} on "
            f"{significance.samples} samples"
        )
        if report.verdict is Verdict.unchanged:
            text += f", within ±{significance.tolerance:g}"
        elif report.verdict is Verdict.inconclusive and significance.samples_needed is not None:
            text += f"; about {significance.samples_needed} labeled samples would detect it"
        return text
    if report.verdict_basis == "estimate" and report.estimate is not None:
        est = report.estimate
        return (
            f"label-free estimate ({est.method}, source top-1 {est.source_top1:.4f}): before "
            f"{_estimate_text(est.before)}, after {_estimate_text(est.after)}"
        )
    if report.verdict is Verdict.unknown:
        if report.estimate is not None:
            est = report.estimate
            return (
                f"no labels; the label-free estimate cannot tell: before "
                f"{_estimate_text(est.before)}, after {_estimate_text(est.after)}"
            )
        return "no labeled evaluation data: nothing to compare"
    return f"{report.verdict.value} (no test recorded: an older report)"


def _estimate_text(side: EstimatedTop1) -> str:
    if not side.reliable or side.top1 is None:
        return f"unreliable (top-1 ≤ {side.upper_bound:.2f})"
    return f"{side.top1:.2f} [{side.interval.low:.2f}, {side.interval.high:.2f}]"
