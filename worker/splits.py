"""Which samples calibrate and which evaluate: the seeded split of a job's data.

Which samples serve what, as :func:`plan_data` decides (recorded in ``report.data``):

- an eval file is given: it is evaluated in full; every calibration sample may calibrate.
  ``options.holdout`` is then an :class:`InvalidOptionError` (two eval sets would be ambiguous).
- no eval file, labeled calibration data: a seeded random ``holdout`` fraction (default 0.5) of it
  is held out for evaluation, the rest calibrates (``evaluated_on = "holdout"``).
- no eval file, unlabeled calibration data: the model is evaluated before and after on the
  calibration samples themselves (``evaluated_on = "calibration"``): the label-free metrics
  (entropy, confidence, prediction change) only, top-1/top-5/loss are null, the verdict is
  ``unknown`` (or, with a labeled source set, the label-free estimate's). ``options.holdout``
  is an :class:`InvalidOptionError` here.

``options.max_samples`` then keeps a seeded random subset of the calibration part. The seed fixes
the split, the subset and the calibration order, so a job is deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recalib import defaults
from recalib.contract import JobOptions
from recalib.errors import InvalidDataError, InvalidOptionError
from worker.formats.data import SampleSet


@dataclass
class DataPlan:
    """Which samples calibrate and which evaluate (indices into their files)."""

    calibration: SampleSet
    calibration_indices: list[int]  # in calibration order (seeded shuffle)
    available_samples: int
    eval_set: SampleSet
    eval_indices: list[int]  # in file order
    labeled: bool
    evaluated_on: str  # "eval_file" | "holdout" | "calibration"
    holdout_fraction: float | None = None


def plan_data(calibration: SampleSet, eval_set: SampleSet | None, options: JobOptions) -> DataPlan:
    """Split and subsample the data as described in the module docstring (seeded)."""
    rng = np.random.default_rng(options.seed)
    n = calibration.num_samples
    holdout: float | None = None
    if eval_set is not None:
        if options.holdout is not None:
            raise InvalidOptionError(
                "holdout splits the calibration data for evaluation, but an eval file is given; "
                "drop one of them",
                field="options.holdout",
            )
        pool, evaluated_on = np.arange(n), "eval_file"
        eval_indices, labeled = list(range(eval_set.num_samples)), eval_set.has_labels
    elif calibration.has_labels:
        holdout = options.holdout if options.holdout is not None else defaults.HOLDOUT
        order = rng.permutation(n)
        n_eval = round(holdout * n)
        if n_eval < 1 or n - n_eval < 2:
            raise InvalidDataError(
                f"holdout {holdout} of {n} calibration samples leaves {n_eval} to evaluate and "
                f"{n - n_eval} to calibrate; need ≥ 1 and ≥ 2: give more data or an eval file",
                file=str(calibration.path),
            )
        pool, evaluated_on, labeled = order[n_eval:], "holdout", True
        eval_indices = sorted(int(i) for i in order[:n_eval])
    else:
        if options.holdout is not None:
            raise InvalidOptionError(
                "holdout needs labeled calibration data, and this calibration file has no "
                "labels; give a labeled eval file or drop holdout",
                field="options.holdout",
            )
        pool, evaluated_on, labeled, eval_indices = np.arange(n), "calibration", False, []
    chosen = [int(i) for i in pool[rng.permutation(len(pool))][: options.max_samples]]
    if evaluated_on == "calibration":
        eval_indices = sorted(chosen)
    return DataPlan(
        calibration=calibration,
        calibration_indices=chosen,
        available_samples=len(pool),
        eval_set=eval_set if eval_set is not None else calibration,
        eval_indices=eval_indices,
        labeled=labeled,
        evaluated_on=evaluated_on,
        holdout_fraction=holdout,
    )
