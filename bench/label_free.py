"""The label-free verdict against the labeled one, on digits models and shift families.

For each model (a DigitsNet trained on scikit-learn's digits, per seed) and each shift (some BN
recalibration repairs, some it cannot: inverted and permuted pixels), recalibrate on the shifted
calibration split (AdaBN, population statistics) and compare, on the shifted evaluation split:

- the true top-1 before and after, and the labeled verdict (exact McNemar, recalib.verdict);
- the label-free estimates (worker.evaluation.estimate, from the unshifted calibration split as
  the labeled source set) and the label-free verdict (recalib.verdict.estimate_verdict).

    .venv/bin/python -m bench.label_free [--seeds 0 1 2] [--markdown]

Prints one row per case and every case where the label-free verdict would have misled
(``better`` where labels do not say better, ``worse`` where they do not say worse).
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from recalib.contract import Verdict
from recalib.verdict import estimate_verdict, top1_from_counts, wilson_interval
from worker.digits import make_digits_case, shift_domain
from worker.engine import recalibrate
from worker.evaluation.estimate import SourceReference, scores_of
from worker.evaluation.estimate import estimate as estimate_from_scores

Shift = Callable[[np.ndarray, int], np.ndarray]


def _noise(inputs: np.ndarray, seed: int, sigma: float) -> np.ndarray:
    return inputs + np.random.default_rng(seed).normal(0.0, sigma, inputs.shape)


_PERMUTATION = np.random.default_rng(123).permutation(64)

SHIFTS: dict[str, Shift] = {
    "none": lambda x, s: x,
    "demo (contrast ×0.35, +0.5, noise)": lambda x, s: shift_domain(x, seed=s),
    "mild (contrast ×0.8, +0.1, noise)": lambda x, s: _noise(0.8 * x + 0.1, s, 0.05),
    "bright (+0.3)": lambda x, s: x + 0.3,
    "scale ×3": lambda x, s: 3.0 * x,
    "noise σ 0.3": lambda x, s: _noise(x, s, 0.3),
    "inverted (1 − x)": lambda x, s: 1.0 - x,
    "permuted pixels": lambda x, s: x.reshape(len(x), -1)[:, _PERMUTATION].reshape(x.shape),
    "shifted 2 px": lambda x, s: np.roll(x, 2, axis=3),
}
"""Target domains; BN adaptation cannot undo the last three (they change the image's structure)."""

FEW_SAMPLES = 4
"""Calibration samples of the ``(4 calibration samples)`` cases: AdaBN on too few hurts."""

LABEL_SHIFT_CLASSES = (0, 1, 2)
"""The classes of the label-shift cases, which break the estimate's one assumption (the target's
class frequencies are the source's): there to show what happens, not to pass."""

VARIANTS: dict[str, tuple[str, int | None, tuple[int, ...] | None]] = {
    **{name: (name, None, None) for name in SHIFTS},
    "none (4 calibration samples)": ("none", FEW_SAMPLES, None),
    "mild (4 calibration samples)": ("mild (contrast ×0.8, +0.1, noise)", FEW_SAMPLES, None),
    "bright (4 calibration samples)": ("bright (+0.3)", FEW_SAMPLES, None),
    "label shift: classes 0–2 only": ("none", None, LABEL_SHIFT_CLASSES),
    "label shift: classes 0–2, mild": (
        "mild (contrast ×0.8, +0.1, noise)",
        None,
        LABEL_SHIFT_CLASSES,
    ),
}
"""Every case: (shift, calibration samples or all, target classes or all)."""


@dataclass
class Case:
    seed: int
    shift: str
    true_before: float
    true_after: float
    labeled: str
    p_value: float
    estimate_before: float | None
    estimate_after: float | None
    bound_before: float
    bound_after: float
    reliable_before: bool
    reliable_after: bool
    label_free: str
    naive_atc: str  # ATC alone, no bound, no reliability check: what it would have said

    @property
    def label_shift(self) -> bool:
        return self.shift.startswith("label shift")

    @property
    def misled(self) -> bool:
        """The label-free verdict says better/worse where the labels do not."""
        return self.label_free in ("better", "worse") and self.label_free != self.labeled


def _logits(model: torch.nn.Module, inputs: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.from_numpy(inputs.astype(np.float32))).float()


def run_case(
    case: object,
    seed: int,
    name: str,
    shift: Shift,
    calibration_samples: int | None = None,
    classes: tuple[int, ...] | None = None,
) -> Case:
    """One model under one shift (``case``: a :class:`worker.digits.DigitsCase`); the target
    keeps only ``classes`` (a label shift), calibration only its first ``calibration_samples``."""
    source_x, source_y = case.calibration  # type: ignore[attr-defined]
    eval_x, eval_y = case.evaluation  # type: ignore[attr-defined]
    calib_x = source_x
    if classes is not None:
        calib_x = source_x[np.isin(source_y, classes)]
        keep = np.isin(eval_y, classes)
        eval_x, eval_y = eval_x[keep], eval_y[keep]
    target_calib = shift(calib_x, 1).astype(np.float32)[:calibration_samples]
    target_eval = shift(eval_x, 2).astype(np.float32)
    original = case.model.eval()  # type: ignore[attr-defined]
    adapted = copy.deepcopy(original)
    batches = torch.from_numpy(target_calib).split(64)  # population statistics: batch-free
    recalibrate(adapted, batches)
    adapted.eval()
    before_logits, after_logits = _logits(original, target_eval), _logits(adapted, target_eval)
    right_before = before_logits.argmax(1).numpy() == eval_y
    right_after = after_logits.argmax(1).numpy() == eval_y
    verdict, significance = top1_from_counts(
        int((right_before & ~right_after).sum()),
        int((right_after & ~right_before).sum()),
        len(eval_y),
    )
    source_scores = scores_of(_logits(original, source_x))
    estimate = estimate_from_scores(
        (*source_scores, source_y),
        scores_of(before_logits),
        scores_of(after_logits),
        int(before_logits.shape[1]),
    )
    reference = SourceReference.fit(*source_scores, source_y, int(before_logits.shape[1]))
    return Case(
        seed=seed,
        shift=name,
        true_before=float(right_before.mean()),
        true_after=float(right_after.mean()),
        labeled=verdict.value,
        p_value=float(significance.p_value or 1.0),
        estimate_before=estimate.before.top1,
        estimate_after=estimate.after.top1,
        bound_before=estimate.before.upper_bound,
        bound_after=estimate.after.upper_bound,
        reliable_before=estimate.before.reliable,
        reliable_after=estimate.after.reliable,
        label_free=estimate_verdict(estimate).value,
        naive_atc=_naive_atc(reference, scores_of(before_logits)[1], scores_of(after_logits)[1]),
    )


def _naive_atc(reference: SourceReference, before: np.ndarray, after: np.ndarray) -> str:
    """ATC's verdict with nothing else: the Wilson intervals of the two estimates apart."""
    low_high = [
        wilson_interval(int((s > reference.threshold).sum()), len(s)) for s in (before, after)
    ]
    if low_high[1].low > low_high[0].high:
        return "better"
    if low_high[0].low > low_high[1].high:
        return "worse"
    return "unknown"


def run_cases(seeds: list[int], epochs: int = 30) -> list[Case]:
    """Every shift for every seed's model."""
    cases = []
    for seed in seeds:
        digits = make_digits_case(seed=seed, epochs=epochs)
        for name, (shift, samples, classes) in VARIANTS.items():
            cases.append(run_case(digits, seed, name, SHIFTS[shift], samples, classes))
    return cases


def _fmt(value: float | None) -> str:
    return "unreliable" if value is None else f"{value:.3f}"


def markdown(cases: list[Case]) -> str:
    rows = [
        "| seed | case | top-1 before → after | labeled | estimate before (bound) | "
        "estimate after (bound) | label-free | ATC alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        rows.append(
            f"| {c.seed} | {c.shift} | {c.true_before:.3f} → {c.true_after:.3f} | {c.labeled} | "
            f"{_fmt(c.estimate_before)} (≤ {c.bound_before:.2f}) | "
            f"{_fmt(c.estimate_after)} (≤ {c.bound_after:.2f}) | {c.label_free} | "
            f"{c.naive_atc} |"
        )
    return "\n".join(rows)


def summary(cases: list[Case]) -> dict[str, object]:
    """Estimate errors (reliable estimates only), agreement, the misleading cases."""

    def errors(pairs: list[tuple[float | None, float]]) -> dict[str, float | int]:
        diffs = [abs(e - t) for e, t in pairs if e is not None]
        if not diffs:
            return {"reliable": 0}
        return {"reliable": len(diffs), "mean_abs": float(np.mean(diffs)), "max_abs": max(diffs)}

    agree = sum(
        1 for c in cases if c.label_free == c.labeled or c.label_free == Verdict.unknown.value
    )
    return {
        "cases": len(cases),
        "error_before": errors([(c.estimate_before, c.true_before) for c in cases]),
        "error_after": errors([(c.estimate_after, c.true_after) for c in cases]),
        "same_verdict": sum(1 for c in cases if c.label_free == c.labeled),
        "unknown": sum(1 for c in cases if c.label_free == "unknown"),
        "not_contradicting": agree,
        "labeled_worse": sum(1 for c in cases if c.labeled == "worse"),
        "naive_atc_misled": sum(
            1 for c in cases if c.naive_atc in ("better", "worse") and c.naive_atc != c.labeled
        ),
        "naive_atc_better_where_worse": sum(
            1 for c in cases if c.naive_atc == "better" and c.labeled == "worse"
        ),
        "misled": [asdict(c) for c in cases if c.misled and not c.label_shift],
        "misled_under_label_shift": [asdict(c) for c in cases if c.misled and c.label_shift],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    cases = run_cases(args.seeds)
    print(markdown(cases) if args.markdown else "\n".join(json.dumps(asdict(c)) for c in cases))
    print(json.dumps(summary(cases), indent=2))


if __name__ == "__main__":
    main()
